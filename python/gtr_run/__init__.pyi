"""Type stubs of gtr_run, the Python API of gtr-run (the Rust engine in ``gtr_run._native``)."""

import os
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

ScheduleSource = Union[str, "os.PathLike[str]"]
"""A .gtr file's path, or the schedule's text (a ``str`` holding a newline or a ``{``)."""

class GtrRunError(RuntimeError):
    """A failure of gtr-run (bundle, runtime, model); the message is the command line's."""

class ScheduleError(GtrRunError):
    """A schedule that cannot be read, parsed or planned.

    The message is what ``gtr-run`` prints: for a diagnostic, the message, ``--> file:line:col``,
    the line and a caret under the problem, and a help line when there is one.
    """

    line: Optional[int]
    """1-based line of the problem (None when the file could not be read)."""
    column: Optional[int]
    """1-based column of the problem (None when the file could not be read)."""
    file: Optional[str]
    """The schedule's name: its path, or ``<string>`` for text (None when the file could not be
    read: the message names it)."""
    help: Optional[str]
    """What would be right, when gtr-run can tell."""

class Step:
    """One MAR step of a plan."""

    stage: str
    """The stage's name."""
    tokens: npt.NDArray[np.int64]
    """Indices of the tokens predicted at this step (row * width + column)."""
    known_before: int
    """Tokens known before this step."""
    diffusion_steps: int
    """Diffusion steps of each token (FTS detail tokens get ``detail["steps"]``)."""
    clip_timesteps: Optional[int]
    """The schedule's ``clip_timesteps``: no chain of the step keeps a timestep above it; None
    when the chains keep every timestep."""
    cfg: Optional[float]
    """Guidance scale; None when the step runs no unconditional pass."""
    temperature: float
    detail: Optional[dict[str, Any]]
    """The FTS rule: ``fraction``, ``steps``, ``selector``, ``count``; None without FTS."""

class Plan:
    """A schedule planned on a grid with a seed, as ``gtr-run plan`` shows it."""

    @property
    def steps(self) -> list[Step]:
        """The MAR steps in execution order."""
    @property
    def stages(self) -> list[dict[str, Any]]:
        """Each stage's ``name``, number of ``steps`` and ``tokens``."""
    @property
    def params(self) -> dict[str, float]:
        """The schedule's parameters with the values used."""
    @property
    def grid(self) -> Tuple[int, int]:
        """(height, width) of the token grid."""
    @property
    def seed(self) -> int: ...
    @property
    def schedule(self) -> str:
        """The schedule's name: its path, or ``<string>``."""
    @property
    def reveal(self) -> npt.NDArray[np.int64]:
        """[height, width]: the 0-based step that reveals each cell."""
    @property
    def stage_of_token(self) -> npt.NDArray[np.int64]:
        """[height, width]: the 0-based stage that reveals each cell."""
    def cost(self, model_spec: Union[str, "os.PathLike[str]"]) -> dict[str, Any]:
        """Analytic cost per image on ``"mar-b"``, ``"mar-l"``, ``"mar-h"`` or a bundle's path
        (``gtr-run plan --cost``): passes, diffusion evaluations and FLOPs. On a bundle the
        schedule is planned again as a run on it plans it (the bundle's grid, its guidance and
        temperature defaults, this plan's seed); a plan made with another ``grid=`` is a
        ValueError, and one the bundle cannot run (a chain longer than its training chain) a
        ScheduleError, as a run on it would be."""
    def to_json(self) -> dict[str, Any]:
        """The object ``gtr-run plan --json`` prints."""
    def picture(self) -> npt.NDArray[np.uint8]:
        """The picture of the order (``gtr-run plan --png``), [H, W, 3]."""
    def __len__(self) -> int: ...

def plan(
    schedule: ScheduleSource,
    grid: Union[None, Tuple[int, int], str] = None,
    seed: int = 0,
    **params: float,
) -> Plan:
    """Plans ``schedule`` on ``grid`` (default: the schedule's ``grid``, else 16x16) with
    ``seed``; keyword arguments set parameters as ``--set name=value`` does.

    Raises ScheduleError (with line and column) for a bad schedule, ValueError for a bad or
    wrong-typed argument (a parameter the schedule does not declare included), TypeError for
    a ``seed`` that is not an int."""

class Model:
    """A model bundle loaded on a device, ready to generate.

    A Model runs one ``generate`` or ``eval`` call at a time: a second call while one runs (from
    another thread, or from the first call's ``progress`` function) raises GtrRunError saying
    the Model is busy; use one Model per thread. Its properties can be read at any time."""

    def __init__(
        self,
        bundle: Union[str, "os.PathLike[str]"],
        device: str = "cpu",
        precision: Optional[str] = None,
        threads: Optional[int] = None,
        sampler: str = "auto",
        head: str = "auto",
        backbone: str = "auto",
        vae: str = "auto",
    ) -> None:
        """Opens the bundle (its folder, manifest.yaml or any .onnx in it) and loads its graphs.

        ``device``: ``cpu``, ``cuda``, ``tensorrt`` (strict) or ``auto``; ``precision``: fp32,
        tf32, fp16, bf16 or int8 (default: the manifest's, else fp32); ``threads``: intra-op
        threads per graph, and for gtr-run's own parallel work when no ``generate`` or ``eval``
        has run in the process yet (that pool keeps its first size; default: ONNX Runtime's,
        and one per core); ``sampler``: where diffusion
        chains run, as ``--sampler``: ``auto``, ``host``, ``graph`` (the bundle's sampler graph) or
        ``ticks`` (its tick graph; CUDA graphs on ``cuda``); ``head``: how the host chains run the
        diffusion head, as ``--head``: ``auto``, ``whole`` or ``split`` (the bundle's two parts of
        models/split_head.py in every step; ``auto`` uses them in steps of at most 32 head rows a
        tick; the same images in fp32); ``backbone``: as ``--backbone``: ``auto`` (the bundle's
        backbone graph on a GPU provider, the encoder and decoder on the CPU), ``fused`` or
        ``split``; ``vae``: when each batch's VAE decode runs, as ``--vae``: ``auto`` (beside the
        next batch's sampling on a GPU provider, after it on the CPU), ``overlap`` or ``inline``
        (the same images either way; with ``overlap`` a batch's progress is reported once the next
        batch has sampled, and a stop there drops that batch; ``eval`` and ``sweep`` decode so too, and
        time a batch by its sampling and the part of its decode they waited for). Raises GtrRunError with the command
        line's message when the bundle or the runtime fails. What the command line would print
        once about the loaded model (e.g. that the chains run on the host because the bundle has
        no sampler graph) is a ``UserWarning``."""
    @property
    def name(self) -> str: ...
    @property
    def classes(self) -> int:
        """Number of classes (0: unconditional)."""
    @property
    def grid(self) -> Tuple[int, int]: ...
    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """(height, width, channels) of one image."""
    @property
    def execution_provider(self) -> str: ...
    @property
    def settings(self) -> dict[str, Any]:
        """Precision, graph files and provider settings (``runtime_settings`` in run.json)."""
    def generate(
        self,
        schedule: ScheduleSource,
        num_images: int,
        seed: int = 0,
        classes: Union[None, int, Sequence[int]] = None,
        cfg: Optional[float] = None,
        temperature: Optional[float] = None,
        batch: Optional[int] = None,
        params: Optional[Mapping[str, float]] = None,
        progress: Union[bool, Callable[[int, int], Any]] = True,
    ) -> Tuple[npt.NDArray[np.uint8], dict[str, Any]]:
        """Generates ``num_images`` images; image i has the bytes of ``i:05.png`` from
        ``gtr-run MODEL SCHEDULE --seed seed`` with the same options.

        ``classes``: None (balanced over all classes), one class, or a list to cycle through;
        ``cfg``/``temperature`` replace the schedule's and the model's; ``batch`` (default 8)
        never changes an image (except in int8, unless its variants quantize activations per
        row: ``convert_precision.py --per-row-activations``); ``params`` sets schedule
        parameters; ``progress``: a bar on stderr (drawn only when stderr is a terminal: pass a
        function in a notebook), False, or a function called with (images done, total) after
        each batch. Numbers out of range (``num_images`` from 1 to 10**7,
        ``seed`` from 0 to 2**64 - 1, ``batch`` from 1 to 4096), an unknown parameter, or more
        images than memory holds raise ValueError before any work.

        Returns the images as uint8 [N, H, W, C] and the run record (seed, schedule, model,
        labels, provider, ``images_sha256`` of the PNGs the command line would write, …); its
        graph calls and seconds are this call's (the first call on a Model also counts loading).
        The GIL is released while generating; Ctrl-C (KeyboardInterrupt) stops the call at
        the end of the current batch."""
    def eval(
        self,
        schedules: Sequence[Union[str, "os.PathLike[str]"]],
        num_images: int = 100,
        seed: int = 0,
        batch: int = 25,
        repeats: int = 1,
        cfg: Optional[float] = None,
        temperature: Optional[float] = None,
        params: Optional[Mapping[str, float]] = None,
        progress: Union[bool, Callable[[int, int], Any]] = True,
        as_frame: bool = False,
    ) -> Any:
        """Compares schedules (.gtr paths; the first is the baseline) as ``gtr-run eval`` does:
        speed measured side by side (schedules take turns batch by batch), FLOPs, and quality
        on the bundle's evaluator (Fréchet distance, class accuracy, classifier score).

        Returns the rows of ``eval.csv`` as a list of dicts (counts as int, measurements as
        float, None where empty), or with ``as_frame=True`` a pandas DataFrame of them
        (ImportError naming pandas when it is not installed).
        ``params`` applies to every schedule that declares the parameter; ``progress`` counts
        batches (called with 0 before the first). A Ctrl-C or an exception of ``progress`` stops
        the comparison after the batch it came in, and is raised."""
    def sweep(
        self,
        schedule: Union[str, "os.PathLike[str]"],
        axes: Mapping[str, Sequence[float]],
        num_images: int = 100,
        seed: int = 0,
        batch: int = 25,
        repeats: int = 1,
        cfg: Optional[float] = None,
        temperature: Optional[float] = None,
        progress: Union[bool, Callable[[int, int], Any]] = True,
        as_frame: bool = False,
    ) -> Any:
        """Runs one schedule over a grid of parameter values as ``gtr-run sweep`` does: ``axes``
        maps each parameter to its values (``{"beta": [0.05, 0.1], "t_max": [20, 50]}``; the
        first axis varies slowest, the first setting is the baseline; at most 64 settings). Each
        setting is a row named by its values (``beta=0.05 t_max=20``), compared as ``eval``
        compares schedules, and the rows are returned as ``eval`` returns them (no picture:
        draw ``seconds_per_image`` against ``frechet_distance`` yourself). A parameter the
        schedule does not declare, one given twice or a value that is not finite is a
        ValueError naming ``axes``."""
