"""Logit losses on sparse targets, one small interface, found by name: ``create_loss(spec)``.

A loss takes the student's logits and the batch's :class:`~kdcache.targets.SparseTarget` and
returns a scalar. A spec is written in :mod:`kdcache.grammar`: ``name(k=v, ...)`` terms joined
by ``+``, each with an optional weight ``w`` (1 by default) that kdcache applies, so
``kl(t=2)+ce(w=0.1)`` is ``KL at T = 2 + 0.1 * hard-label cross-entropy``. A name is one of
:data:`LOSSES` (``kl``, ``soft_ce``, ``reverse_kl``, ``dkd``, ``ce``, or one a module
registered with :func:`register_loss`) or a user's own class, ``pkg.module:Class``, imported
with the current directory on the path and called with the term's other arguments. A loss
says what it needs from the run (``needs``: labels, a teacher, the whole distribution); the
trainer refuses a run that cannot give it before any work.

This module imports neither torch nor a user's module until a loss is created or called
(``kdcache --help`` reads the teacher modes, which name their default losses).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from kdcache.errors import KdcacheError
from kdcache.grammar import Term, bind, format_term, format_terms, parse, user_object

if TYPE_CHECKING:
    from torch import Tensor

    from kdcache.targets import SparseTarget

EXAMPLE = "kl(t=2)+ce(w=0.1)"  # KL at T = 2 plus 0.1 x hard-label cross-entropy


class Loss(Protocol):
    """``loss(student_logits, target)``: student_logits (B, C) float32, ``target`` the batch's
    SparseTarget (with its ``labels`` where the trainer has them) -> a scalar tensor (a mean
    over the batch). The built-ins also carry ``name`` and ``describe()`` (the spec that makes
    them again); a user's own class needs only ``__call__``. Optional class attributes:

    - ``needs``: a set of :data:`NEEDS` the trainer checks before any work;
    - ``inherits``: the arguments ``--temperature`` may fill in (default: every argument the
      class takes, which is ``t`` only for the trainer).
    """

    def __call__(self, student_logits: Tensor, target: SparseTarget) -> Tensor: ...


LOSSES: dict[str, Callable[..., Loss]] = {}

# The feature losses (kdcache.feature_losses), named here without importing torch: their terms
# are written in the same spec as the logit losses and add to them, on the --features pairs.
FEATURE_LOSSES: dict[str, str] = {
    "fitnet": "FitNets hint: MSE through a 1x1-conv regressor trained with the student",
    "at": "attention transfer: normalised spatial attention maps, p = 2",
    "rkd": "relational KD: distances (w_dist) and angles (w_angle) within the batch",
    "pkt": "probabilistic knowledge transfer: cosine and distance kernels, Jeffreys divergence",
    "mse": "MSE between maps of the same shape, no regressor (InDistill's pruned teacher)",
    "akd": "avatar KD: dropout avatars of the teacher's maps, standardised, CWD or MSE",
}

# What a loss can need from a run, checked before the first step (``needs_of``):
NEEDS = {
    "labels": "hard labels in the student's classes",
    "teacher": "a teacher's distribution (not --teacher-mode none)",
    "full": "the teacher's whole distribution (a live teacher, or a cache with k = classes)",
    "avatars": "avatar ensembles: --teacher-mode cached with a cache made with --avatars N",
}


def register_loss(name: str) -> Callable[[Callable[..., Loss]], Callable[..., Loss]]:
    """Class (or factory) decorator: ``name(k=v)`` in a spec calls it with ``k=v``."""

    def add(factory: Callable[..., Loss]) -> Callable[..., Loss]:
        if name in LOSSES and LOSSES[name] is not factory:
            raise ValueError(f"a loss called {name!r} is already registered")
        LOSSES[name] = factory
        return factory

    return add


def _check_temperature(t: Any) -> None:
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"the temperature t must be a positive number, got {t!r}")


@dataclass(frozen=True)
class AtTemperature:
    """A loss of the student's logits and the target at temperature ``t``, computed by the
    :mod:`kdcache.targets` function named ``fn``; the base of the built-ins that take only ``t``."""

    t: float = 1.0
    name: ClassVar[str] = ""
    fn: ClassVar[str] = ""

    def __post_init__(self) -> None:
        _check_temperature(self.t)

    def __call__(self, student_logits: Tensor, target: SparseTarget) -> Tensor:
        from kdcache import targets as T

        return getattr(T, self.fn)(student_logits, target, self.t)

    def describe(self) -> str:
        return format_term(self.name, {"t": self.t})


@register_loss("kl")
@dataclass(frozen=True)
class KL(AtTemperature):
    """KL(teacher || student) at temperature ``t``, times t² (Hinton's scaling); batch mean."""

    name: ClassVar[str] = "kl"
    fn: ClassVar[str] = "kl_divergence"


@register_loss("ce")
@dataclass(frozen=True)
class CE(AtTemperature):
    """Cross-entropy on the hard labels, mixed as the views were (``lam`` on the label, the rest
    on the partner's); ``t`` divides the logits (1: plain cross-entropy; ``--temperature`` is
    not passed to it). Rows without a label in the student's classes do not count; a batch
    without any gives zero. With ``--teacher-mode none`` it is the mode's own loss."""

    name: ClassVar[str] = "ce"
    needs: ClassVar[frozenset[str]] = frozenset({"labels"})
    inherits: ClassVar[tuple[str, ...]] = ()

    def __call__(self, student_logits: Tensor, target: SparseTarget) -> Tensor:
        from kdcache import targets as T

        labels = target.labels
        if labels is None:
            raise KdcacheError("the ce loss needs the batch's labels, and this target has none")
        known = labels.known
        if not bool(known.all()):
            if not bool(known.any()):
                return student_logits.sum() * 0.0
            student_logits, labels = student_logits[known], target.rows(known).labels
        hard = T.from_labels(labels.label, labels.partner, labels.lam, target.num_classes)
        return T.cross_entropy(student_logits, hard, self.t)


@register_loss("soft_ce")
@dataclass(frozen=True)
class SoftCE(AtTemperature):
    """Soft cross-entropy H(teacher, student) at temperature ``t``: KL plus the teacher's
    entropy, so its gradient is KL's divided by T² (no T² scaling here)."""

    name: ClassVar[str] = "soft_ce"
    fn: ClassVar[str] = "cross_entropy"


@register_loss("reverse_kl")
@dataclass(frozen=True)
class ReverseKL(AtTemperature):
    """KL(student || teacher) at temperature ``t``, times t²: mode-seeking, where KL is
    mass-covering. A top-k target's tail classes each hold the spread tail mass; the teacher's
    log-probabilities are floored at log(float32 tiny) so a class without mass stays finite."""

    name: ClassVar[str] = "reverse_kl"
    fn: ClassVar[str] = "reverse_kl"
    needs: ClassVar[frozenset[str]] = frozenset({"teacher"})


@register_loss("dkd")
@dataclass(frozen=True)
class DKD:
    """Decoupled KD (Zhao et al., CVPR 2022): ``alpha`` * TCKD + ``beta`` * NCKD at temperature
    ``t``, times t² (defaults: the paper's CIFAR-100 setting, alpha 1, beta 8, T 4; ImageNet
    used beta 0.5, T 1). The target class is the row's label, both labels weighted by ``lam``
    on a mixed row, and the teacher's top-1 on a row without a label. With a top-k target the
    non-target distribution is the top-k plus the evenly spread tail (docs/methods.md measures
    the difference from the dense loss)."""

    alpha: float = 1.0
    beta: float = 8.0
    t: float = 4.0
    name: ClassVar[str] = "dkd"
    needs: ClassVar[frozenset[str]] = frozenset({"teacher"})

    def __post_init__(self) -> None:
        _check_temperature(self.t)
        for key in ("alpha", "beta"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{key} must be a number at least 0, got {value!r}")

    def __call__(self, student_logits: Tensor, target: SparseTarget) -> Tensor:
        import torch

        from kdcache import targets as T

        def rows(gt: Tensor) -> Tensor:
            return T.dkd_rows(student_logits, target, gt, self.alpha, self.beta, self.t)

        top1 = target.index.gather(1, target.logp.argmax(1, keepdim=True))[:, 0]
        labels = target.labels
        if labels is None or not bool((labels.label >= 0).any()):
            return rows(top1).mean()
        known = labels.known
        own = rows(torch.where(known, labels.label, top1))
        lam = torch.where(known, labels.lam, torch.ones_like(labels.lam))
        if not bool((lam < 1).any()):
            return own.mean()
        other = rows(torch.where(known & (lam < 1), labels.partner, top1))
        return (lam * own + (1 - lam) * other).mean()

    def describe(self) -> str:
        return format_term(self.name, {"alpha": self.alpha, "beta": self.beta, "t": self.t})


@register_loss("avatar_kl")
@dataclass(frozen=True)
class AvatarKL:
    """Avatar KD from the cache: KL(avatar ensemble || student) at ``t``, times t², of each
    row weighted by its uncertainty: ``inverse`` 1 / (1 + u / mean u) over the batch, ``none``
    1; the batch mean. ``--avatar-weight W`` adds it to the loss with weight W."""

    t: float = 1.0
    uncertainty: str = "inverse"
    name: ClassVar[str] = "avatar_kl"
    needs: ClassVar[frozenset[str]] = frozenset({"avatars"})

    def __post_init__(self) -> None:
        _check_temperature(self.t)
        if self.uncertainty not in ("inverse", "none"):
            raise ValueError(f"uncertainty must be inverse or none, got {self.uncertainty!r}")

    def __call__(self, student_logits: Tensor, target: SparseTarget) -> Tensor:
        from kdcache import targets as T

        if target.avatar is None:
            raise KdcacheError("avatar_kl needs a cache made with --avatars N")
        rows = T.kl_rows(student_logits, target.avatar, self.t)
        if self.uncertainty == "inverse":
            rows = rows * T.uncertainty_weight(target.avatar_u)
        return rows.mean()

    def describe(self) -> str:
        return format_term(self.name, {"t": self.t, "uncertainty": self.uncertainty})


@dataclass(frozen=True)
class Sum:
    """Weighted terms added: ``sum(w * loss(logits, target))``; what :func:`create_loss` makes.
    A weight of 1 is not multiplied in, so ``kl`` alone is exactly :class:`KL`'s value."""

    terms: tuple[tuple[float, Loss], ...]
    spec: str  # the resolved spec: every argument written out

    @property
    def name(self) -> str:
        return "+".join(getattr(loss, "name", type(loss).__name__) for _, loss in self.terms)

    def describe(self) -> str:
        return self.spec

    def __call__(self, student_logits: Tensor, target: SparseTarget) -> Tensor:
        total = None
        for w, loss in self.terms:
            value = loss(student_logits, target)
            if w != 1.0:
                value = value * w
            total = value if total is None else total + value
        return student_logits.sum() * 0.0 if total is None else total  # feature terms only


def parse_loss(spec: str, what: str = "--loss") -> list[Term]:
    """Check ``spec`` without importing anything: the grammar, the registered names, the
    weights. -> its terms; a :class:`KdcacheError` naming the column otherwise."""
    terms = parse(spec, "+", what, EXAMPLE)
    for term in terms:
        where = f"{what} {spec!r}, column {term.column}"
        if not term.is_user and term.name not in LOSSES and term.name not in FEATURE_LOSSES:
            raise KdcacheError(
                f"{where}: unknown loss {term.name!r}; choose one of {', '.join(LOSSES)}, a "
                f"feature loss ({', '.join(FEATURE_LOSSES)}) with --features, or write "
                "pkg.module:Class for your own"
            )
        w = term.kwargs.get("w", 1.0)
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
            raise KdcacheError(f"{where}: the weight w of {term.name} must be a number, got {w!r}")
    return terms


def create_loss(spec: str, defaults: Mapping[str, Any] | None = None, what: str = "--loss") -> Sum:
    """``spec`` -> the loss it names. ``defaults``: arguments given to each term whose class
    takes them and that does not name them (the trainer passes ``t`` from ``--temperature``)."""
    built, resolved = [], []
    for term in parse_loss(spec, what):
        if is_feature_term(term):
            continue  # built by the trainer for the --features pairs (feature_terms)
        factory = _user_class(term, what) if term.is_user else LOSSES[term.name]
        params = _parameters(factory)
        kwargs = bind(term, [p for p in params if p != "w"], f"{what} {spec!r}")
        w = float(kwargs.pop("w", 1.0))
        inherits = getattr(factory, "inherits", params)
        kwargs.update(
            {
                k: v
                for k, v in (defaults or {}).items()
                if k in params and k in inherits and k not in kwargs
            }
        )
        try:
            loss = factory(**kwargs)
        except (TypeError, ValueError) as e:
            raise KdcacheError(
                f"{what} {spec!r}, column {term.column}: {term} cannot be made ({e}); give it "
                f"the arguments {term.name} takes"
            ) from None
        if not term.is_user:  # the built-ins' defaults are written out: config.json says all
            kwargs = {k: p.default for k, p in params.items() if p.default is not p.empty} | kwargs
        built.append((w, loss))
        resolved.append(Term(term.name, kwargs | ({"w": w} if w != 1.0 else {}), term.column))
    return Sum(tuple(built), format_terms(resolved))


def is_feature_term(term: Term) -> bool:
    return not term.is_user and term.name in FEATURE_LOSSES


def feature_terms(spec: str | None, what: str = "--loss") -> list[Term]:
    """The feature-loss terms of ``spec`` (none when ``spec`` is None)."""
    return [t for t in parse_loss(spec, what) if is_feature_term(t)] if spec else []


def needs_of(loss: Sum) -> set[str]:
    """What the terms of ``loss`` need from the run (:data:`NEEDS`), together."""
    out: set[str] = set()
    for _, term in loss.terms:
        out |= set(getattr(term, "needs", ()))
    return out


def _parameters(factory: Callable[..., Any]) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return {}


def _user_class(term: Term, what: str) -> Callable[..., Loss]:
    """``pkg.module:Class`` -> the class (:func:`kdcache.grammar.user_object`)."""
    source, _, name = term.name.partition(":")
    return user_object(source, name, f"{what} term {term.name}", kind="class")
