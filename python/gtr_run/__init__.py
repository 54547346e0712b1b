"""gtr-run from Python: plan ``.gtr`` schedules and generate images with
Masked Autoregressive models, on the same Rust engine as the ``gtr-run``
command line (same seeds, same bytes).

>>> import gtr_run
>>> p = gtr_run.plan("schedules/gtr.gtr")
>>> model = gtr_run.Model("models/mar-tiny")
>>> images, record = model.generate("schedules/gtr.gtr", 10, seed=0)
"""

import os

# ONNX Runtime's Linux builds keep a telemetry store and a device id under
# ~/.cache/Microsoft unless this is set; gtr-run writes nothing but what it
# is asked to (a value already set is kept).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from ._native import (  # noqa: E402
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
