"""gtr-run's own PyTorch code for MAR: model definitions (`mar`), the diffusion process
(`diffusion`) and a reference sampler (`reference_sampler`).

Import it as `models.torch.…` with the repository root on `sys.path`. Do not put `models/`
itself on `sys.path` (a script inside `models/` has it there by default): this folder would
then shadow PyTorch's own `torch` package. The scripts in `models/` remove their own folder
from `sys.path` before importing torch.
"""
