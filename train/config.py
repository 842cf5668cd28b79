"""The options of one training run; ``kdcache train`` builds a :class:`TrainConfig`."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field

from kdcache.errors import KdcacheError

TEACHER_MODES = ("cached", "online", "none")


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
    image_size: int = 224
    teacher_image_size: int | None = None  # default: the cache's, or image_size
    batch_size: int = 256  # global, split over ranks
    lr: float = 1e-3
    weight_decay: float = 1e-4  # AdamW's (multiplied by lr, as in PyTorch)
    warmup: float = 1.0  # epochs of linear warm-up
    clip_grad: float = 1.0
    temperature: float = 1.0
    window: int = 4  # units shuffled together inside an epoch
    workers: int = 2
    device: str = "auto"
    num_classes: int | None = None
    resume: bool = False
    command: str = field(default_factory=lambda: shlex.join(sys.argv))

    def validate(self) -> None:
        """Check the options against each other; report every problem at once."""
        problems = []
        if self.teacher_mode not in TEACHER_MODES:
            problems.append(f"--teacher-mode must be one of {', '.join(TEACHER_MODES)}")
        if self.teacher_mode == "cached" and not self.cache:
            problems.append("--teacher-mode cached needs --cache CACHE (make one with "
                            "`kdcache precompute`)")
        if self.teacher_mode == "online" and not self.teacher:
            problems.append("--teacher-mode online needs --teacher MODEL (and --teacher-weights)")
        if self.epochs < 1:
            problems.append(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be positive, got {self.batch_size}")
        if self.temperature <= 0:
            problems.append(f"--temperature must be positive, got {self.temperature}")
        if problems:
            raise KdcacheError("; ".join(problems))
