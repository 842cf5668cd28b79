"""Feature distillation in the trainer: hooks on the ``--features`` layers of the live teacher
and of the student, and the feature terms of the loss built for their shapes.

The teacher's layers are captured while the mode's target runs it (``online``: on the
student's very views, under ``no_grad``), the student's during its own forward; the feature
loss then compares them pair by pair (:mod:`kdcache.feature_losses`). Its trainable parts
(FitNets' regressors) are optimised with the student and saved in ``checkpoint.pt``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kdcache.feature_losses import FeatureSum, create_feature_loss
from kdcache.features import Tap, layer_shapes, parse_pairs
from kdcache.losses import feature_terms

log = logging.getLogger(__name__)


@dataclass
class FeatureDistill:
    """The taps and the feature loss of one run."""

    teacher_tap: Tap
    student_tap: Tap
    loss: FeatureSum  # its parameters are trained; the module is on the training device
    call: nn.Module  # what computes it: ``loss``, or its DDP wrapper under torchrun

    def __call__(self) -> torch.Tensor:
        """The feature loss of the step whose teacher and student forwards just ran."""
        return self.call(self.student_tap.take(), self.teacher_tap.take())

    def describe(self) -> str:
        return self.loss.describe()

    def close(self) -> None:
        self.teacher_tap.close()
        self.student_tap.close()


def build(
    spec: str,
    pairs_spec: str | None,
    teacher: nn.Module | None,
    teacher_size: int,
    student: nn.Module,
    student_size: int,
    device: torch.device,
    distributed: bool,
    seed: int = 0,
) -> FeatureDistill | None:
    """The run's feature distillation, or None when its loss has no feature term.

    spec: the run's whole loss spec (``TrainConfig.loss_spec``); pairs_spec: ``--features``;
    teacher, student: the bare modules on ``device``; shapes are measured with one forward
    pass of each (a (1, 3, S, S) zero input, in eval mode)."""
    terms = feature_terms(spec)
    if not pairs_spec:
        return None
    pairs = parse_pairs(pairs_spec)
    if not terms:
        log.warning(
            "--features %s: no feature term in the loss %s uses them (add one, e.g. +fitnet)",
            pairs_spec,
            spec,
        )
        return None
    assert teacher is not None  # TrainConfig.validate: --features needs a live teacher
    t_shapes = _shapes(teacher, teacher_size, [t for t, _ in pairs])
    s_shapes = _shapes(student, student_size, [s for _, s in pairs])
    with torch.random.fork_rng(devices=[]):  # leaves the global RNG as it was
        torch.manual_seed(seed)
        loss = create_feature_loss(terms, list(zip(t_shapes, s_shapes, strict=True)))
    loss = loss.to(device)
    for (t, s), ts, ss in zip(pairs, t_shapes, s_shapes, strict=True):
        log.info("features: teacher %s %s -> student %s %s", t, ts, s, ss)
    call: nn.Module = loss
    if distributed and any(p.requires_grad for p in loss.parameters()):
        call = DistributedDataParallel(
            loss, device_ids=[device.index] if device.type == "cuda" else None
        )
    return FeatureDistill(
        Tap(teacher, [t for t, _ in pairs], "--features (teacher)"),
        Tap(student, [s for _, s in pairs], "--features (student)"),
        loss,
        call,
    )


def _shapes(model: nn.Module, size: int, paths: list[str]) -> list[tuple[int, ...]]:
    shapes = layer_shapes(model, size, paths)
    return [shapes[p] for p in paths]
