"""The options of one teacher pass: ``kdcache precompute`` builds a :class:`PrecomputeConfig`.

Each field carries its command-line option (:mod:`kdcache.options`); the fixed teacher mode and
``kdcache ablate`` build one from a ``TrainConfig`` (``TrainConfig.teacher_pass``). This module
imports neither torch nor zarr.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field

from kdcache.errors import KdcacheError
from kdcache.options import (
    DEVICE_HELP,
    MAX_PIXELS_HELP,
    PLAN_SEED_HELP,
    RENDERER_HELP,
    VIEWS_HELP,
    WEIGHTS_HELP,
    WORKERS_HELP,
    mean_help,
    num_classes_help,
    option,
)
from kdcache.views import get_spec

# Epochs per block of a new cache: docs/benchmarks.md measures B = 1, 4, 16 side by side.
DEFAULT_EPOCHS_PER_BLOCK = 16

STRICT_HELP = (
    "an unusable image (no image, undecodable, too large, a mixing partner that does not "
    "decode) or a shard cut short (no end-of-archive blocks) is an error; by default such rows "
    "are marked bad in the cache with their reason, counted, and skipped by training, and a cut "
    "shard is a warning. Labels are never needed"
)


@dataclass
class PrecomputeConfig:
    """Everything ``kdcache precompute`` needs; the CLI builds one from its options."""

    data: str = option(help="training shards (see `kdcache index`)")
    teacher: str = option(help="model spec, e.g. torchvision:resnet50")
    out: str = option(help="cache path (a directory, conventionally .zarr)")
    epochs: int = option(help="epochs of views to store")
    teacher_weights: str | None = option(None, help=WEIGHTS_HELP)
    topk: int | None = option(None, help="logits kept per view", shown="min(10, C)")
    views: str = option("function_matching", help=VIEWS_HELP, metavar="SPEC")
    plan_seed: int = option(0, help=PLAN_SEED_HELP)
    teacher_image_size: int | str = option(
        224, help="teacher input px, or auto (the data's median short side)"
    )
    batch_size: int = option(256, help="views per teacher batch")
    workers: int = option(2, help=WORKERS_HELP)
    device: str = option("auto", help=DEVICE_HELP)
    compile: bool = option(False, help="torch.compile the teacher")
    num_classes: int | None = option(
        None, help=num_classes_help("the teacher's own head; built-in nets: the data's label count")
    )
    teacher_mean: tuple[float, float, float] | None = option(
        None, help=mean_help("teacher"), metavar="R,G,B"
    )
    teacher_std: tuple[float, float, float] | None = option(
        None, help="[as the mean]", metavar="R,G,B"
    )
    max_image_pixels: int | None = option(None, help=MAX_PIXELS_HELP, metavar="N")
    renderer: str = option("pillow", help=RENDERER_HELP, choices=("pillow", "ffcv"))
    epochs_per_block: int | None = option(
        None,
        help="epochs whose views of a unit are rendered from one decode and stored as one file "
        "per array (a new cache's layout; an existing cache keeps its own)",
        metavar="B",
        shown=f"{DEFAULT_EPOCHS_PER_BLOCK}",
    )
    avatars: int = option(
        0,
        help="also store, per view, the ensemble of N avatars of the teacher (Avatar KD): the "
        "teacher runs once up to --avatar-site, then N times through the rest with elementwise "
        "dropout on that layer's input, masks drawn from the view's stream; the ensemble's "
        "top-k log-probabilities and each view's uncertainty (train with --avatar-weight)",
        metavar="N",
    )
    avatar_drop: float = option(0.1, help="the avatars' dropout probability", metavar="P")
    avatar_site: str | None = option(
        None,
        help="the teacher layer whose input the avatars perturb (a module path; `kdcache "
        "models --layers SPEC`)",
        metavar="LAYER",
        shown="the last top-level layer with a spatial output: the input of the last stage",
    )
    chunk_rows: int | None = None
    limit: int | None = None  # only the units holding the first N samples (--smoke: 256)
    strict: bool = option(False, help=STRICT_HELP)
    limit_units: int | None = None  # only the first N units
    command: str = field(default_factory=lambda: shlex.join(sys.argv))

    def validate(self) -> None:
        """Check every number before any work starts; report every problem at once."""
        problems = [
            f"--{name.replace('_', '-')} must be at least {low}, got {value}"
            for name, value, low in (
                ("epochs", self.epochs, 1),
                ("epochs_per_block", self.epochs_per_block, 1),
                ("topk", self.topk, 1),
                ("batch_size", self.batch_size, 1),
                ("workers", self.workers, 0),
                ("num_classes", self.num_classes, 2),
                ("plan_seed", self.plan_seed, 0),
                ("limit", self.limit, 1),
                ("max_image_pixels", self.max_image_pixels, 1),
                ("avatars", self.avatars, 0),
            )
            if value is not None and value < low
        ]
        if not 0 <= self.avatar_drop < 1:
            problems.append(f"--avatar-drop must be in [0, 1), got {self.avatar_drop}")
        try:
            get_spec(self.views)
        except KdcacheError as e:
            problems.append(str(e))
        if problems:
            raise KdcacheError("; ".join(problems))
