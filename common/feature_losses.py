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


def channel_wise_divergence(s: torch.Tensor, t: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021): each channel's map a distribution over
    the spatial positions (softmax of x / tau); KL(teacher || student) summed over positions,
    times tau², averaged over batch and channels. (B, C, H, W) both -> scalar."""
    t = t.flatten(2) / tau
    s = s.flatten(2) / tau
    p = F.softmax(t, dim=2)
    kl = (p * (F.log_softmax(t, dim=2) - F.log_softmax(s, dim=2))).sum(2)
    return kl.mean() * tau**2


class AKD(FeatureLoss):
    """Avatar knowledge distillation (Zhang et al., ACM MM 2023), as Gumpest/AvatarKD's
    ``mmrazor/models/losses/akd_*.py`` computes it: an avatar of each teacher map by inverted
    elementwise dropout (``p``; a fresh mask per map and call), the avatar and the student's map
    (through a 1x1 connector where the widths differ) standardised by one parameter-free
    ``BatchNorm2d(affine=False)`` per pair, each call with its own batch statistics, then the
    base loss: ``cwd`` (channel-wise distillation at ``tau``) or ``mse``. The released CWD
    variant computes the standardised avatar and then compares the raw one; this follows its
    MGD and MasKD variants, which compare the standardised one.

    Masks come from a generator seeded by the run's ``--seed`` (drawn when the loss is built)
    and a call counter kept in the module's state (``checkpoint.pt``), so a resumed run draws
    the same masks; under torchrun each rank adds its rank."""

    name = "akd"
    needs_4d = True
    BASES: ClassVar[tuple[str, ...]] = ("cwd", "mse")

    def __init__(
        self,
        shapes: Sequence[tuple[Shape, Shape]],
        p: float = 0.1,
        base: str = "cwd",
        tau: float = 1.0,
    ):
        super().__init__(shapes)
        self.p, self.tau = _check_weight("p", p), _check_weight("tau", tau)
        if not 0 <= self.p < 1:
            raise ValueError(f"the avatar dropout p must be in [0, 1), got {p!r}")
        if base not in self.BASES:
            raise ValueError(f"base must be one of {', '.join(self.BASES)}, got {base!r}")
        self.base = base
        self.connectors = nn.ModuleList(
            [nn.Identity() if t[0] == s[0] else nn.Conv2d(s[0], t[0], 1) for t, s in self.shapes]
        )
        self.norms = nn.ModuleList(
            [nn.BatchNorm2d(t[0], affine=False, track_running_stats=False) for t, _ in self.shapes]
        )
        self.seed = int(torch.randint(0, 2**62, ()))  # from the run's seeded RNG (the trainer)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def avatars(self, teacher: list[torch.Tensor]) -> list[torch.Tensor]:
        """One avatar per teacher map: ``t * mask / (1 - p)``, mask ~ Bernoulli(1 - p)."""
        if self.p == 0:
            return list(teacher)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        g = torch.Generator(device=teacher[0].device)
        g.manual_seed((self.seed + 1_000_003 * int(self.calls) + 7919 * rank) % 2**63)
        out = []
        for t in teacher:
            keep = torch.rand(t.shape, generator=g, device=t.device, dtype=torch.float32)
            out.append(t * (keep >= self.p).to(t.dtype) / (1 - self.p))
        return out

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        avatars = self.avatars([t.detach().float() for t in teacher])
        self.calls += 1
        total = None
        for i, (s, a) in enumerate(zip(student, avatars, strict=True)):
            s, a = match_spatial(self.connectors[i](s.float()), a)
            s, a = self.norms[i](s), self.norms[i](a)
            value = (
                channel_wise_divergence(s, a, self.tau) if self.base == "cwd" else F.mse_loss(s, a)
            )
            total = value if total is None else total + value
        return total

    def arguments(self) -> dict[str, object]:
        return {"p": self.p, "base": self.base, "tau": self.tau}


CLASSES: dict[str, type[FeatureLoss]] = {c.name: c for c in (MSE, FitNet, AT, RKD, PKT, AKD)}


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
