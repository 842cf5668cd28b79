"""Feature losses: what the student's intermediate features owe the teacher's.

A feature loss is an ``nn.Module`` built for the layer pairs of ``--features`` (their output
shapes known from one forward pass) and called on each step with the student's and the
teacher's captured features, pair by pair (:mod:`kdcache.features`):
``loss(student: list[(B, ...)], teacher: list[(B, ...)]) -> scalar``, summed over the pairs.
Its trainable parts (FitNets' regressors) are the module's parameters: the trainer optimises
them with the student and keeps them in ``checkpoint.pt``. Spatial sizes that differ are
average-pooled to the smaller one. The teacher's features come without gradients.

Names are written in ``--loss`` (or ``--feature-loss``) like the logit losses, and their
terms add to them: ``kl+at(w=1000)`` (:data:`kdcache.losses.FEATURE_LOSSES`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.errors import KdcacheError
from kdcache.grammar import Term, bind, format_term, format_terms

Shape = tuple[int, ...]  # one sample's feature shape: (C, H, W) or (D,)


def _pool_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return x if tuple(x.shape[2:]) == tuple(size) else F.adaptive_avg_pool2d(x, size)


def match_spatial(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (B, C, H, W) maps with their spatial sizes made equal (the larger pooled)."""
    if s.dim() != 4 or t.dim() != 4 or s.shape[2:] == t.shape[2:]:
        return s, t
    size = [min(a, b) for a, b in zip(s.shape[2:], t.shape[2:], strict=True)]
    return _pool_to(s, size), _pool_to(t, size)


def _check_weight(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


class FeatureLoss(nn.Module):
    """A feature loss over the pairs ``shapes`` [(teacher shape, student shape), ...]."""

    name: ClassVar[str] = ""
    needs_4d: ClassVar[bool] = False  # compares spatial maps: (C, H, W) features only

    def __init__(self, shapes: Sequence[tuple[Shape, Shape]]):
        super().__init__()
        self.shapes = [(tuple(t), tuple(s)) for t, s in shapes]
        if self.needs_4d:
            for t, s in self.shapes:
                if len(t) != 3 or len(s) != 3:
                    raise ValueError(
                        f"{self.name} compares spatial maps, and a pair has shapes {t} "
                        f"(teacher) and {s} (student); name convolutional layers"
                    )

    def pair(self, i: int, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        total = None
        for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
            value = self.pair(i, s.float(), t.detach().float())
            total = value if total is None else total + value
        return total

    def arguments(self) -> dict[str, object]:
        return {}

    def describe(self) -> str:
        return format_term(self.name, self.arguments())


class MSE(FeatureLoss):
    """Mean squared error between maps of the same shape, with no regressor (InDistill
    compares a pruned teacher layer with the student's this way)."""

    name = "mse"

    def __init__(self, shapes: Sequence[tuple[Shape, Shape]]):
        super().__init__(shapes)
        for t, s in self.shapes:
            if t[:1] != s[:1]:
                raise ValueError(
                    f"mse needs the same width on both sides and a pair has {t[0]} teacher and "
                    f"{s[0]} student channels; use fitnet (a regressor), or --prune-teacher"
                )

    def pair(self, i: int, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s, t = match_spatial(s, t)
        return F.mse_loss(s, t)


class FitNet(FeatureLoss):
    """FitNets' hint (Romero et al. 2015): MSE between the teacher's map and the student's
    through a regressor trained with it, a 1x1 convolution (a linear layer for vectors)."""

    name = "fitnet"

    def __init__(self, shapes: Sequence[tuple[Shape, Shape]]):
        super().__init__(shapes)
        regressors = []
        for t, s in self.shapes:
            if len(t) != len(s):
                raise ValueError(f"fitnet cannot regress {s} (student) onto {t} (teacher)")
            regressors.append(nn.Conv2d(s[0], t[0], 1) if len(s) == 3 else nn.Linear(s[0], t[0]))
        self.regressors = nn.ModuleList(regressors)

    def pair(self, i: int, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s, t = match_spatial(self.regressors[i](s), t)
        return F.mse_loss(s, t)


class AT(FeatureLoss):
    """Attention transfer (Zagoruyko & Komodakis 2017): the squared distance between the
    L2-normalised spatial attention maps mean_c(|x|^p), averaged over the batch and positions
    (the reference code's form; its weight, 1000 by default, is theirs)."""

    name = "at"
    needs_4d = True

    def __init__(self, shapes: Sequence[tuple[Shape, Shape]], p: float = 2.0):
        super().__init__(shapes)
        self.p = _check_weight("p", p)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs().pow(self.p).mean(1, keepdim=True)

    def pair(self, i: int, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a_s, a_t = match_spatial(self.attention(s), self.attention(t))
        a_s, a_t = F.normalize(a_s.flatten(1), dim=1), F.normalize(a_t.flatten(1), dim=1)
        return (a_s - a_t).pow(2).mean()

    def arguments(self) -> dict[str, object]:
        return {"p": self.p}


def _pdist(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(B, D) -> (B, B) Euclidean distances, zero on the diagonal."""
    sq = x.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * x @ x.t()).clamp_min(eps).sqrt()
    return d * (1 - torch.eye(len(x), device=x.device, dtype=x.dtype))


class RKD(FeatureLoss):
    """Relational KD (Park et al. 2019) on the flattened features: Huber loss between the
    batch's pairwise distances (each side divided by its mean distance), weighted
    ``w_dist``, and between the angles of its triplets, weighted ``w_angle`` (the paper's 25
    and 50)."""

    name = "rkd"

    def __init__(
        self, shapes: Sequence[tuple[Shape, Shape]], w_dist: float = 25.0, w_angle: float = 50.0
    ):
        super().__init__(shapes)
        self.w_dist, self.w_angle = (
            _check_weight("w_dist", w_dist),
            _check_weight("w_angle", w_angle),
        )

    @staticmethod
    def _distances(x: torch.Tensor) -> torch.Tensor:
        d = _pdist(x)
        positive = d[d > 0]
        return d / (positive.mean() if len(positive) else 1.0)

    @staticmethod
    def _angles(x: torch.Tensor) -> torch.Tensor:
        e = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=2)  # (B, B, D)
        return torch.bmm(e, e.transpose(1, 2)).flatten()

    def pair(self, i: int, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s, t = s.flatten(1), t.flatten(1)
        loss = s.new_zeros(())
        if self.w_dist:
            loss = loss + self.w_dist * F.smooth_l1_loss(self._distances(s), self._distances(t))
        if self.w_angle:
            loss = loss + self.w_angle * F.smooth_l1_loss(self._angles(s), self._angles(t))
        return loss

    def arguments(self) -> dict[str, object]:
        return {"w_dist": self.w_dist, "w_angle": self.w_angle}


class PKT(FeatureLoss):
    """Probabilistic knowledge transfer (Passalis & Tefas 2018) as InDistill's
    ``methods/pkt.py`` computes it: each sample's conditional probabilities over the batch from
    a cosine kernel, (cos + 1) / 2, and from a distance kernel, 1 / (1 + d), each row
    normalised; the two Jeffreys divergences (p - q)(log p - log q), averaged, added."""

    name = "pkt"
    eps: ClassVar[float] = 1e-6

    @classmethod
    def _kernels(cls, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sq = x.pow(2).sum(1)
        d = (sq[:, None] + sq[None, :] - 2 * x @ x.t()).clamp_min(0).add(cls.eps).sqrt()
        distance = 1.0 / (1.0 + d)
        unit = x / (x.pow(2).sum(1, keepdim=True).sqrt() + cls.eps)
        cosine = (unit @ unit.t() + 1.0) / 2.0
        return (
            cosine / cosine.sum(1, keepdim=True),
            distance / distance.sum(1, keepdim=True),
        )

    def pair(self, i: int, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        total = s.new_zeros(())
        for p, q in zip(self._kernels(t.flatten(1)), self._kernels(s.flatten(1)), strict=True):
            p, q = p.clamp_min(self.eps), q.clamp_min(self.eps)
            total = total + ((p - q) * (p.log() - q.log())).mean()
        return total


CLASSES: dict[str, type[FeatureLoss]] = {c.name: c for c in (MSE, FitNet, AT, RKD, PKT)}


class FeatureSum(nn.Module):
    """Weighted feature terms added; ``describe()`` is their resolved spec."""

    def __init__(self, terms: Sequence[tuple[float, FeatureLoss]]):
        super().__init__()
        self.weights = [w for w, _ in terms]
        self.terms = nn.ModuleList([loss for _, loss in terms])

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        total = None
        for w, loss in zip(self.weights, self.terms, strict=True):
            value = loss(student, teacher)
            value = value if w == 1.0 else value * w
            total = value if total is None else total + value
        return total

    def describe(self) -> str:
        resolved = []
        for w, loss in zip(self.weights, self.terms, strict=True):
            kwargs = loss.arguments() | ({"w": w} if w != 1.0 else {})
            resolved.append(Term(loss.name, kwargs, 0))
        return format_terms(resolved)


def create_feature_loss(
    terms: Sequence[Term], shapes: Sequence[tuple[Shape, Shape]], what: str = "--loss"
) -> FeatureSum:
    """Feature terms of a loss spec, built for the pairs' ``shapes``."""
    built = []
    for term in terms:
        cls = CLASSES[term.name]
        params = [
            p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "shapes")
        ]
        kwargs = bind(term, [*params, "w"], f"{what} term {term}")
        w = float(kwargs.pop("w", 1.0))
        try:
            built.append((w, cls(shapes, **kwargs)))
        except (TypeError, ValueError) as e:
            raise KdcacheError(f"{what} term {term} cannot be made: {e}") from None
    return FeatureSum(built)
