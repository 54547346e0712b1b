"""gtr-run from Python: plan ``.gtr`` schedules and generate images with
Masked Autoregressive models, on the same Rust engine as the ``gtr-run``
command line (same seeds, same bytes).

>>> import gtr_run
>>> p = gtr_run.plan("schedules/gtr.gtr")
>>> model = gtr_run.Model("models/mar-tiny")
>>> images, record = model.generate("schedules/gtr.gtr", 10, seed=0)
"""

from ._native import (
    GtrRunError,
    Model,
    Plan,
    ScheduleError,
    Step,
    __version__,
    plan,
)

__all__ = [
    "GtrRunError",
    "Model",
    "Plan",
    "ScheduleError",
    "Step",
    "__version__",
    "plan",
]
