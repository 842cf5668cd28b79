"""Feature distillation in the trainer: hooks on the ``--features`` layers of the live teacher
and of the student, the feature terms of the loss built for their shapes, InDistill's pruned
teacher layers and its layer curriculum.

The teacher's layers are captured while the mode's target runs it (``online``: on the
student's very views, under ``no_grad``), the student's during its own forward; the feature
loss then compares them pair by pair (:mod:`kdcache.feature_losses`). Its trainable parts
(FitNets' regressors) are optimised with the student and saved in ``checkpoint.pt``.

``--prune-teacher`` replaces each teacher layer whose width differs from its student layer's by
a copy pruned to that width (:mod:`kdcache.prune`). ``--curriculum "A:3,B:4,embed:rest"``
distils one pair at a time, named by its teacher layer, for so many epochs each (``rest``: to
the end), before the run's own loss: MSE on intermediate maps, PKT on the embedding, and
nothing else (InDistill's "critical period"); the stage is a function of the epoch, so a
resumed run continues mid-stage exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kdcache.errors import KdcacheError
from kdcache.feature_losses import MSE, PKT, FeatureLoss, FeatureSum, create_feature_loss
from kdcache.features import EMBED, Tap, layer_shapes, parse_pairs
from kdcache.losses import feature_terms
from kdcache.prune import prune_layer

log = logging.getLogger(__name__)

# InDistill's CIFAR-10 schedule, in its shape: three intermediate stages of 3, 4 and 5 epochs,
# then the embedding (with PKT) to the end.
CURRICULUM_EXAMPLE = "layer1:3,layer2:4,layer3:5,embed:rest"


def parse_curriculum(spec: str, teacher_layers: list[str]) -> list[tuple[int, int | None]]:
    """``"A:3,B:4,embed:rest"`` -> [(pair index, epochs or None for the rest), ...]; stages
    name pairs by their teacher layer (the left side of ``--features``)."""
    stages: list[tuple[int, int | None]] = []
    parts = [p.strip() for p in spec.split(",")]
    for n, part in enumerate(parts):
        name, colon, length = (x.strip() for x in part.rpartition(":"))
        if not colon or not name:
            raise KdcacheError(
                f"--curriculum {spec!r}: {part!r} is not LAYER:EPOCHS; e.g. {CURRICULUM_EXAMPLE}"
            )
        if name not in teacher_layers:
            raise KdcacheError(
                f"--curriculum {spec!r}: {name!r} is not a teacher layer of --features "
                f"({', '.join(teacher_layers)})"
            )
        if length == "rest":
            if n != len(parts) - 1:
                raise KdcacheError(f"--curriculum {spec!r}: only the last stage can be 'rest'")
            epochs = None
        elif length.isdigit() and int(length) > 0:
            epochs = int(length)
        else:
            raise KdcacheError(
                f"--curriculum {spec!r}: {name} lasts {length!r}; write a number of epochs, or rest"
            )
        stages.append((teacher_layers.index(name), epochs))
    return stages


@dataclass
class FeatureDistill:
    """The taps, the feature loss and the curriculum of one run."""

    teacher_tap: Tap
    student_tap: Tap
    loss: FeatureSum | None  # the loss's feature terms; its parameters are trained
    call: nn.Module | None  # what computes it: ``loss``, or its DDP wrapper under torchrun
    stages: list[tuple[int, int | None]] = field(default_factory=list)
    stage_losses: list[FeatureLoss] = field(default_factory=list)  # per pair: MSE, or PKT
    spec: str = ""

    def stage(self, epoch: int) -> int | None:
        """The pair distilled alone at ``epoch`` (0-based), or None after the curriculum."""
        start = 0
        for pair, epochs in self.stages:
            if epochs is None or epoch < start + epochs:
                return pair
            start += epochs
        return None

    def __call__(self, epoch: int) -> torch.Tensor | None:
        """The feature loss of the step whose teacher and student forwards just ran: the
        curriculum stage's alone, or the run's feature terms (None when it has none)."""
        student, teacher = self.student_tap.take(), self.teacher_tap.take()
        pair = self.stage(epoch)
        if pair is not None:
            return self.stage_losses[pair]([student[pair]], [teacher[pair]])
        return None if self.call is None else self.call(student, teacher)

    def describe(self) -> str:
        return self.loss.describe() if self.loss is not None else ""

    def parameters(self) -> list[nn.Parameter]:
        return [] if self.loss is None else list(self.loss.parameters())

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
    prune: bool = False,
    curriculum: str | None = None,
) -> FeatureDistill | None:
    """The run's feature distillation, or None when nothing uses ``--features``.

    spec: the run's whole loss spec (``TrainConfig.loss_spec``); pairs_spec: ``--features``;
    teacher, student: the bare modules on ``device``; shapes are measured with one forward
    pass of each (a (1, 3, S, S) zero input, in eval mode); seed: the student's ``--seed``,
    which initialises the loss's own parts (every rank the same; resume-exact)."""
    if not pairs_spec:
        return None
    terms = feature_terms(spec)
    pairs = parse_pairs(pairs_spec)
    if not terms and not curriculum:
        log.warning(
            "--features %s: no feature term in the loss %s uses them (add one, e.g. +fitnet)",
            pairs_spec,
            spec,
        )
        return None
    assert teacher is not None  # TrainConfig.validate: --features needs a live teacher
    t_paths, s_paths = [t for t, _ in pairs], [s for _, s in pairs]
    t_shapes = _shapes(teacher, teacher_size, t_paths)
    s_shapes = _shapes(student, student_size, s_paths)
    substitutes = {}
    if prune:
        for i, (t, _) in enumerate(pairs):
            if t == EMBED or len(t_shapes[i]) != 3 or t_shapes[i][0] == s_shapes[i][0]:
                continue  # an embedding, or already the student's width
            pruned = prune_layer(teacher, t, s_shapes[i][0])
            substitutes[t] = (pruned.source, pruned.module.to(device))
            t_shapes[i] = (s_shapes[i][0], *t_shapes[i][1:])
            log.info("--prune-teacher: %s keeps %d of its filters", t, s_shapes[i][0])
    shapes = list(zip(t_shapes, s_shapes, strict=True))
    for (t, s), (ts, ss) in zip(pairs, shapes, strict=True):
        log.info("features: teacher %s %s -> student %s %s", t, ts, s, ss)
    loss, call = None, None
    if terms:
        with torch.random.fork_rng(devices=[]):  # leaves the global RNG as it was
            torch.manual_seed(seed)
            loss = create_feature_loss(terms, shapes).to(device)
        call = loss
        if distributed and any(p.requires_grad for p in loss.parameters()):
            call = DistributedDataParallel(
                loss, device_ids=[device.index] if device.type == "cuda" else None
            )
    stages, stage_losses = [], []
    if curriculum:
        stages = parse_curriculum(curriculum, t_paths)
        for (t, _), shape in zip(pairs, shapes, strict=True):
            try:  # built for every pair; only the staged ones are used
                stage_losses.append(PKT([shape]) if t == EMBED else MSE([shape]))
            except ValueError as e:
                if any(pairs[i][0] == t for i, _ in stages):
                    raise KdcacheError(f"--curriculum stage {t}: {e}") from None
                stage_losses.append(PKT([shape]))  # never used
    return FeatureDistill(
        Tap(teacher, t_paths, "--features (teacher)", substitutes),
        Tap(student, s_paths, "--features (student)"),
        loss,
        call,
        stages,
        stage_losses,
    )


def _shapes(model: nn.Module, size: int, paths: list[str]) -> list[tuple[int, ...]]:
    shapes = layer_shapes(model, size, paths)
    missing = [p for p in paths if p not in shapes]
    if missing:
        raise KdcacheError(
            f"--features: layers {', '.join(missing)} do not return a tensor in the forward "
            "pass; `kdcache models --layers SPEC` lists the layers that do"
        )
    return [shapes[p] for p in paths]
