"""The options of one training run; ``kdcache train`` builds a :class:`TrainConfig`."""

from __future__ import annotations

import math
import re
import shlex
import sys
from dataclasses import dataclass, field

from kdcache.errors import KdcacheError
from kdcache.losses import Sum, create_loss, parse_loss
from kdcache.train.modes import MODES, TeacherMode, get_mode
from kdcache.views import MIN_IMAGE_SIZE

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")
# Aliases derived from the mode registry (kdcache.train.modes), kept for their importers.
TEACHER_MODES = tuple(MODES)
# The student's views when --views is not given (cached mode: the cache decides).
DEFAULT_VIEWS = {name: m.default_views for name, m in MODES.items() if m.default_views}


@dataclass
class TrainConfig:
    data: str
    val: str
    student: str
    out: str
    epochs: int
    teacher_mode: str = "cached"
    cache: str | None = None
    teacher: str | None = None
    teacher_weights: str | None = None
    student_weights: str | None = None
    views: str | None = None  # default: the cache's preset, or function_matching
    plan_seed: int | None = None  # default: the cache's, or 0
    seed: int = 0
    image_size: int | str = 224  # or "auto": the data's median short side
    teacher_image_size: int | str | None = None  # default: the cache's, or image_size
    batch_size: int = 256  # global, split over ranks
    lr: float = 1e-3
    weight_decay: float = 1e-4  # AdamW's (multiplied by lr, as in PyTorch)
    warmup: float = 1.0  # epochs of linear warm-up
    clip_grad: float = 1.0
    temperature: float = 1.0
    loss: str | None = None  # a loss spec (kdcache.losses); None: the teacher mode's default
    window: int = 4  # units shuffled together inside an epoch
    workers: int = 2
    device: str = "auto"
    num_classes: int | None = None  # default: the teacher's (the cache's); none mode: labels
    student_mean: tuple[float, float, float] | None = None  # default: the student's own
    student_std: tuple[float, float, float] | None = None
    teacher_mean: tuple[float, float, float] | None = None  # default: the teacher's own
    teacher_std: tuple[float, float, float] | None = None
    label_map: str | None = None  # JSON file: data label -> teacher class, for val accuracy
    max_image_pixels: int | None = None  # larger images are unusable rows; None: Pillow's limit
    resume: bool = False
    limit: int | None = None  # train on the first N samples only
    strict: bool = False  # unusable rows are errors instead of skipped and counted
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0: at epoch ends only
    extend: bool = False  # --resume with more --epochs: the schedule is recomputed over them
    command: str = field(default_factory=lambda: shlex.join(sys.argv))

    @property
    def mode(self) -> TeacherMode:
        """The :class:`~kdcache.train.modes.TeacherMode` that ``teacher_mode`` names."""
        return get_mode(self.teacher_mode)

    def create_loss(self) -> Sum:
        """The run's loss: ``--loss``, or the mode's default (``kl(t=TEMPERATURE)`` with a
        teacher, ``ce()`` on labels). With ``--loss``, a ``--temperature`` other than 1 is the
        ``t`` of each term that takes one and names none (``validate`` refuses a term naming
        its own ``t`` then: which would win is not obvious)."""
        if self.loss is None:
            return create_loss(self.mode.default_loss(self.temperature))
        defaults = {"t": float(self.temperature)} if self.temperature != 1 else {}
        return create_loss(self.loss, defaults)

    def validate(self) -> None:
        """Check the options against each other; report every problem at once."""
        problems = []
        mode = MODES.get(self.teacher_mode)
        if mode is None:
            problems.append(f"--teacher-mode must be one of {', '.join(TEACHER_MODES)}")
        else:
            problems += mode.problems(self.cache, self.teacher)
        problems += [
            f"--{name.replace('_', '-')} must be at least {low}, got {value}"
            for name, value, low in (
                ("epochs", self.epochs, 1),
                ("batch_size", self.batch_size, 1),
                ("checkpoint_every", self.checkpoint_every, 0),
                ("limit", self.limit, 1),
                ("workers", self.workers, 0),
                ("num_classes", self.num_classes, 2),
                ("window", self.window, 1),
                ("max_image_pixels", self.max_image_pixels, 1),
                ("seed", self.seed, 0),
                ("plan_seed", self.plan_seed, 0),
            )
            if value is not None and value < low
        ]
        for name, low, positive in (
            ("lr", 0.0, True),
            ("weight_decay", 0.0, False),
            ("warmup", 0.0, False),
            ("clip_grad", 0.0, False),
            ("temperature", 0.0, True),
        ):
            value = getattr(self, name)
            option = "--" + name.replace("_", "-")
            if not math.isfinite(value):
                problems.append(f"{option} must be a finite number, got {value}")
            elif value < low or (positive and value == low):
                problems.append(
                    f"{option} must be {'positive' if positive else 'at least 0'}, got {value}"
                )
        if self.loss is not None:
            problems += _loss_problems(self.loss, self.temperature)
        if not _DEVICE.fullmatch(str(self.device)):
            problems.append(f"--device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        for name in ("image_size", "teacher_image_size"):
            value = getattr(self, name)
            if value not in (None, "auto") and int(value) < MIN_IMAGE_SIZE:
                option = "--" + name.replace("_", "-")
                problems.append(
                    f"{option} must be at least {MIN_IMAGE_SIZE} px or auto, got {value}"
                )
        if problems:
            raise KdcacheError("; ".join(problems))


def _loss_problems(spec: str, temperature: float) -> list[str]:
    """``--loss`` checked without importing a user's module: grammar, names, weights, and no
    ``t`` given twice (in a term and by ``--temperature``)."""
    try:
        terms = parse_loss(spec)
    except KdcacheError as e:
        return [str(e)]
    named = [str(t) for t in terms if "t" in t.kwargs]
    if temperature != 1 and named:
        return [
            f"--temperature {temperature} and --loss {spec!r} both set a temperature "
            f"({', '.join(named)}): drop --temperature, or the t= of the --loss terms"
        ]
    return []
