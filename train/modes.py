"""The teacher modes: where a student's targets come from, one object per mode.

``get_mode(name)`` looks a mode up in :data:`MODES`; the trainer, ``TrainConfig.validate``, the
CLI and ``kdcache ablate`` ask the object what the mode needs and does, never its name:

- its default student views (``None``: the cache's) and whether it refuses mixing presets;
- what it needs: ``--cache`` (and whether that is a one-epoch center cache), ``--teacher``;
- where the student's views come from (replayed from the cache, or fresh from the plan), whether
  the teacher's input is rendered and from which view stream (``None``: the student's views);
- how a batch's target is made (cache rows, a live teacher, labels) and its default loss
  spec (``--loss`` overrides it; :mod:`kdcache.losses`).

This module imports neither torch nor zarr (``kdcache --help`` reads the mode names); the
target and loss functions import torch when they are first called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kdcache.errors import KdcacheError
from kdcache.losses import create_loss
from kdcache.views import INDEPENDENT_STREAM, ViewSpec


def _cache_rows(item: dict, run: Any, device: Any) -> Any:
    """The teacher's top-k rows from the cache, carried in the batch."""
    from kdcache import targets as T

    target = T.from_topk(item["topk_logits"], item["topk_index"], item["lse"], run.num_classes)
    if "avatar_topk_logits" in item:  # a cache made with --avatars
        target.avatar = T.from_topk(
            item["avatar_topk_logits"], item["avatar_topk_index"], item["avatar_lse"],
            run.num_classes,
        )  # fmt: skip
        target.avatar_u = item["avatar_u"].float()
    return target.to(device, non_blocking=True)


def _live_teacher(item: dict, run: Any, device: Any) -> Any:
    """The teacher, run now on the batch's teacher input (:func:`kdcache.pixels.teacher_name`)."""
    from kdcache import pixels
    from kdcache import targets as T
    from kdcache.runtime import teacher_logits

    x = pixels.take(item, pixels.teacher_name(item), run.teacher_input, device)
    return T.from_logits(teacher_logits(run.teacher.module, x, device))


def _labels(item: dict, run: Any, device: Any) -> Any:
    """Hard labels, mixed as the views were (``lam`` and the partner's label)."""
    from kdcache import targets as T

    target = T.from_labels(item["label"], item["partner_label"], item["lam"], run.num_classes)
    target.labels = T.Labels(item["label"].long(), item["partner_label"].long(), item["lam"])
    return target.to(device, non_blocking=True)


def _kl_at(temperature: float) -> str:
    return f"kl(t={float(temperature)!r})"


def _hard_ce(temperature: float) -> str:
    return "ce()"  # hard labels: no temperature


@dataclass(frozen=True)
class TeacherMode:
    """One teacher mode. ``target(item, run, device)`` makes a batch's ``SparseTarget``
    (``run`` gives ``num_classes`` and ``teacher``); ``default_loss(temperature)`` is the loss
    spec (:mod:`kdcache.losses`) the mode trains with when no ``--loss`` is given."""

    name: str
    default_views: str | None  # the student's views without --views; None: the cache's
    target: Callable[[dict, Any, Any], Any]
    default_loss: Callable[[float], str]  # --temperature -> the loss spec without --loss
    cache_hint: str | None = None  # needs --cache; the sentence saying what it must hold
    needs_center_cache: bool = False  # the cache holds the teacher on center views, 1 epoch
    replays_cache_views: bool = False  # the student's views (and targets) are the cache's
    runs_teacher: bool = False  # a live --teacher: its input is rendered with each batch
    teacher_stream: int | None = None  # the teacher's own view stream; None: the student's
    unmixed_only: bool = False  # refuses mixing presets (the teacher never sees the mix)
    trains_on_labels: bool = False  # hard labels, every sample needs one

    @property
    def reads_cache(self) -> bool:
        """Opens ``--cache``: its views and targets (cached) or its targets only (fixed)."""
        return self.cache_hint is not None

    @property
    def sees_student_views(self) -> bool:
        """The teacher's targets are on the student's exact views (function matching)."""
        return not (
            self.trains_on_labels or self.needs_center_cache or self.teacher_stream is not None
        )

    def loss(self, logits: Any, target: Any, temperature: float) -> Any:
        """The default loss at ``temperature`` on one batch (the trainer creates it once)."""
        return create_loss(self.default_loss(temperature))(logits, target)

    def allows(self, spec: ViewSpec) -> bool:
        """Whether the student may train on ``spec``'s views in this mode."""
        return not (self.unmixed_only and spec.mixes)

    def problems(self, cache: str | None, teacher: str | None) -> list[str]:
        """What ``--cache`` / ``--teacher`` this mode lacks, as sentences for ``validate``."""
        out = []
        if self.cache_hint is not None and not cache:
            out.append(f"--teacher-mode {self.name} needs --cache CACHE{self.cache_hint}")
        if self.runs_teacher and not teacher:
            out.append(f"--teacher-mode {self.name} needs --teacher MODEL (and --teacher-weights)")
        return out


# The fixed and independent teachers of Beyer et al. 2022 are shown crop + flip, no mixing.
MODES: dict[str, TeacherMode] = {
    m.name: m
    for m in (
        TeacherMode(
            "cached",
            None,
            _cache_rows,
            _kl_at,
            cache_hint=" (make one with `kdcache precompute`)",
            replays_cache_views=True,
        ),
        TeacherMode("online", "function_matching", _live_teacher, _kl_at, runs_teacher=True),
        TeacherMode(
            "fixed",
            "consistent",
            _cache_rows,
            _kl_at,
            cache_hint=": a one-epoch cache of center views (`kdcache train` makes it when "
            "--teacher is given)",
            needs_center_cache=True,
            unmixed_only=True,
        ),
        TeacherMode(
            "independent",
            "consistent",
            _live_teacher,
            _kl_at,
            runs_teacher=True,
            teacher_stream=INDEPENDENT_STREAM,
            unmixed_only=True,
        ),
        TeacherMode("none", "function_matching", _labels, _hard_ce, trains_on_labels=True),
    )
}


def get_mode(name: str) -> TeacherMode:
    """The mode called ``name``; a :class:`KdcacheError` listing the modes otherwise."""
    try:
        return MODES[name]
    except (KeyError, TypeError):
        raise KdcacheError(
            f"unknown teacher mode {name!r}: choose one of {', '.join(MODES)}"
        ) from None
