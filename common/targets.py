"""Sparse teacher targets and the distillation losses.

A cached target is the teacher's top-k logits plus the log-sum-exp of all its logits: the top-k
probabilities ``exp(logit - lse)`` are exact, and the mass left over, ``1 - sum``, is spread
evenly over the other ``C - k`` classes (as TinyViT does). Nothing here builds a dense (B, C)
target: the KL divergence is computed from gathers and a row sum of the student's log-softmax.

For temperature ``T != 1`` the tail classes are treated as ``C - k`` classes of equal logit
``lse + log(tail / (C - k))``; that is exact at ``T = 1`` and the natural reading of a truncated
target otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Labels:
    """A batch's hard labels in the student's classes, mixed as its views were.

    label, partner: (B,) int64, -1 where the row's sample (or its mixing partner) has no label
    the student can use; lam: (B,) float32, the weight of ``label`` (1 on unmixed rows, whose
    partner is ignored)."""

    label: torch.Tensor
    partner: torch.Tensor
    lam: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Labels:
        return Labels(
            self.label.to(device, non_blocking=non_blocking),
            self.partner.to(device, non_blocking=non_blocking),
            self.lam.to(device, non_blocking=non_blocking),
        )

    @property
    def known(self) -> torch.Tensor:
        """(B,) bool: the rows whose label (and partner's label, when mixed) are known."""
        return (self.label >= 0) & ((self.lam >= 1) | (self.partner >= 0))


@dataclass
class SparseTarget:
    """index: (B, K) int64 class ids; logp: (B, K) float32 log-probabilities at T = 1;
    tail_logp: (B,) float32 log-probability of each one of the ``num_classes - K`` other classes
    (``-inf`` when there is no tail mass); labels: the rows' hard labels where the trainer has
    them in the student's classes (:class:`Labels`), for the losses that use them."""

    index: torch.Tensor
    logp: torch.Tensor
    tail_logp: torch.Tensor
    num_classes: int
    labels: Labels | None = None
    # A cache made with --avatars: the avatar ensemble's target and each row's uncertainty u.
    avatar: SparseTarget | None = None
    avatar_u: torch.Tensor | None = None  # (B,) float32

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SparseTarget:
        return SparseTarget(
            self.index.to(device, non_blocking=non_blocking),
            self.logp.to(device, non_blocking=non_blocking),
            self.tail_logp.to(device, non_blocking=non_blocking),
            self.num_classes,
            None if self.labels is None else self.labels.to(device, non_blocking),
            None if self.avatar is None else self.avatar.to(device, non_blocking),
            None if self.avatar_u is None else self.avatar_u.to(device, non_blocking=non_blocking),
        )

    def rows(self, keep: torch.Tensor) -> SparseTarget:
        """The target of the rows ``keep`` (a (B,) bool mask) only."""
        labels = self.labels
        if labels is not None:
            labels = Labels(labels.label[keep], labels.partner[keep], labels.lam[keep])
        return SparseTarget(
            self.index[keep],
            self.logp[keep],
            self.tail_logp[keep],
            self.num_classes,
            labels,
            None if self.avatar is None else self.avatar.rows(keep),
            None if self.avatar_u is None else self.avatar_u[keep],
        )

    @property
    def tail_count(self) -> int:
        return self.num_classes - self.index.shape[1]

    def dense(self) -> torch.Tensor:
        """(B, C) probabilities; for tests and small C only."""
        out = self.tail_logp.exp()[:, None].expand(-1, self.num_classes).clone()
        out.scatter_(1, self.index, 0.0)  # the named classes hold no tail mass
        return out.scatter_add_(1, self.index, self.logp.exp())  # an index may repeat


def from_topk(
    topk_logits: torch.Tensor, topk_index: torch.Tensor, lse: torch.Tensor, num_classes: int
) -> SparseTarget:
    """Cached rows -> target. topk_logits (B, K) float16/32, topk_index (B, K) int, lse (B,)."""
    logp = topk_logits.float() - lse.float()[:, None]
    tail_count = num_classes - logp.shape[1]
    if tail_count == 0:
        tail_logp = torch.full_like(lse, float("-inf"), dtype=torch.float32)
    else:
        # fp16 logits can make the top-k sum overshoot 1 by an ulp: clamp the tail at zero.
        tail = (1.0 - logp.exp().sum(1)).clamp_min(0.0)
        tail_logp = (tail / tail_count).log()
    return SparseTarget(topk_index.long(), logp, tail_logp, num_classes)


def from_labels(
    label: torch.Tensor, partner_label: torch.Tensor, lam: torch.Tensor, num_classes: int
) -> SparseTarget:
    """Hard labels, mixed: weight ``lam`` (B,) on ``label`` (B,), the rest on ``partner_label``.

    Rows that are not mixed have ``lam == 1``; their partner label is ignored. When both labels
    are the same class, all the mass goes to the first entry (the second is ``-inf``), so no
    class is named twice with mass and the target's entropy stays right.
    """
    lam = lam.float()
    single = (lam >= 1) | (partner_label == label)
    index = torch.stack([label, torch.where(single, label, partner_label)], 1).long()
    with torch.no_grad():
        own = torch.where(single, torch.zeros_like(lam), lam.log())
        other = torch.where(single, torch.full_like(lam, float("-inf")), (1 - lam).log())
    tail = torch.full_like(lam, float("-inf"))
    return SparseTarget(index, torch.stack([own, other], 1), tail, num_classes)


def from_logits(logits: torch.Tensor, k: int | None = None) -> SparseTarget:
    """A live teacher's (B, C) logits -> target (all classes when ``k`` is None)."""
    k = logits.shape[1] if k is None else min(k, logits.shape[1])
    top, index = logits.float().topk(k, dim=1)
    return from_topk(top, index, logits.float().logsumexp(1), logits.shape[1])


def _tempered(target: SparseTarget, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher log-probs at temperature T: ((B, K), (B,) per tail class)."""
    if temperature == 1.0:
        return target.logp, target.tail_logp
    z_top = target.logp / temperature
    z_tail = target.tail_logp / temperature
    parts = [z_top]
    if target.tail_count:
        parts.append((z_tail + torch.log(torch.tensor(float(target.tail_count))))[:, None])
    log_norm = torch.cat(parts, 1).logsumexp(1)
    return z_top - log_norm[:, None], z_tail - log_norm


def _xlogy_exp(logp: torch.Tensor) -> torch.Tensor:
    """p * log p from log p, with 0 log 0 = 0."""
    return torch.where(torch.isfinite(logp), logp.exp() * logp, torch.zeros_like(logp))


def cross_entropy(
    student_logits: torch.Tensor, target: SparseTarget, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over the batch of H(teacher, student) at temperature T; (B, C) logits -> scalar."""
    t_top, t_tail = _tempered(target, temperature)
    logq = F.log_softmax(student_logits.float() / temperature, dim=1)
    logq_top = logq.gather(1, target.index)
    ce = -(t_top.exp() * logq_top).sum(1)
    if target.tail_count:
        logq_tail_sum = logq.sum(1) - logq_top.sum(1)
        tail_p = torch.where(torch.isfinite(t_tail), t_tail.exp(), torch.zeros_like(t_tail))
        ce = ce - tail_p * logq_tail_sum
    return ce.mean()


def kl_divergence(
    student_logits: torch.Tensor, target: SparseTarget, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher || student) at temperature T, times T^2 (Hinton's scaling); mean over batch."""
    t_top, t_tail = _tempered(target, temperature)
    neg_entropy = _xlogy_exp(t_top).sum(1)
    if target.tail_count:
        neg_entropy = neg_entropy + target.tail_count * _xlogy_exp(t_tail)
    kl = cross_entropy(student_logits, target, temperature) + neg_entropy.mean()
    return kl * temperature**2


# The floor of the teacher's log-probabilities in the reverse KL: a class the cache gives no
# mass (the tail of an fp16 top-k whose sum reached 1) would make it infinite.
LOGP_FLOOR = math.log(torch.finfo(torch.float32).tiny)


def reverse_kl(
    student_logits: torch.Tensor, target: SparseTarget, temperature: float = 1.0
) -> torch.Tensor:
    """KL(student || teacher) at temperature T, times T^2; mean over batch.

    Each tail class holds ``tail_logp``; teacher log-probabilities are floored at
    :data:`LOGP_FLOOR` (a class without teacher mass would make the divergence infinite)."""
    t_top, t_tail = _tempered(target, temperature)
    t_top, t_tail = t_top.clamp_min(LOGP_FLOOR), t_tail.clamp_min(LOGP_FLOOR)
    logq = F.log_softmax(student_logits.float() / temperature, dim=1)
    q_top = logq.gather(1, target.index).exp()
    kl = (logq.exp() * logq).sum(1) - (q_top * t_top).sum(1)
    if target.tail_count:
        kl = kl - (1.0 - q_top.sum(1)).clamp_min(0.0) * t_tail
    return kl.mean() * temperature**2


def _log_diff(total: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """log(exp(total) - exp(part)), -inf where that is not positive."""
    diff = -torch.expm1(part - total)
    return torch.where(diff > 0, total + torch.log(diff.clamp_min(1e-45)), -math.inf)


def dkd_rows(
    student_logits: torch.Tensor,
    target: SparseTarget,
    gt: torch.Tensor,
    alpha: float,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022) per row, times T^2: (B,) float32.

    gt: (B,) int64, the row's target class. TCKD is the KL between the binary (target, the
    rest) distributions of teacher and student, NCKD the KL between their distributions over the
    other classes, renormalised; -> ``alpha * TCKD + beta * NCKD``. On a top-k target the
    teacher's non-target distribution is its top-k (less the target class) plus the evenly
    spread tail, as everywhere in kdcache; with K = C it is the dense loss exactly."""
    t_top, t_tail = _tempered(target, temperature)
    logq = F.log_softmax(student_logits.float() / temperature, dim=1)
    match = target.index == gt[:, None]  # (B, K): where the target class is in the top-k
    in_top = match.any(1)
    n_tail = target.tail_count - (~in_top).long()  # tail classes other than the target
    neg = torch.full_like(t_top, -math.inf)
    p_gt = torch.where(in_top, torch.where(match, t_top, neg).logsumexp(1), t_tail)
    others = [torch.where(match, neg, t_top)]
    if target.tail_count:
        tail_sum = torch.where(n_tail > 0, t_tail + n_tail.clamp_min(1).float().log(), -math.inf)
        others.append(tail_sum[:, None])
    p_rest = torch.cat(others, 1).logsumexp(1)  # log(1 - p_gt), summed rather than subtracted
    q_gt = logq.gather(1, gt[:, None])[:, 0]
    q_rest = logq.scatter(1, gt[:, None], -math.inf).logsumexp(1)
    tckd = _xlogy_exp(p_gt) - p_gt.exp() * q_gt.where(torch.isfinite(p_gt), 0.0)
    tckd = tckd + _xlogy_exp(p_rest) - p_rest.exp() * q_rest.where(torch.isfinite(p_rest), 0.0)
    # NCKD over the classes other than gt: p_i / (1 - p_gt) against q_i / (1 - q_gt).
    has_rest = torch.isfinite(p_rest)
    norm = torch.where(has_rest, p_rest, 0.0)
    hat_top = torch.where(match, neg, t_top - norm[:, None])
    logq_hat_top = logq.gather(1, target.index) - q_rest[:, None]
    finite = torch.isfinite(hat_top)
    nckd = (_xlogy_exp(hat_top) - hat_top.exp() * logq_hat_top.where(finite, 0.0)).sum(1)
    if target.tail_count:
        hat_tail = t_tail - norm
        logq_top_sum = logq.gather(1, target.index).where(~match, 0.0).sum(1)
        tail_logq = logq.sum(1) - logq_top_sum - q_gt  # over the tail classes other than gt
        tail_logq_hat = tail_logq - n_tail.float() * q_rest
        ok = torch.isfinite(hat_tail) & (n_tail > 0)
        tail = n_tail.float() * _xlogy_exp(hat_tail) - hat_tail.exp() * tail_logq_hat
        nckd = nckd + torch.where(ok, tail, 0.0)
    nckd = torch.where(has_rest, nckd, 0.0)
    return (alpha * tckd + beta * nckd) * temperature**2


def kl_rows(
    student_logits: torch.Tensor, target: SparseTarget, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher || student) of each row at temperature T, times T^2: (B,) float32 (the
    batch mean of :func:`kl_divergence` computed per row)."""
    t_top, t_tail = _tempered(target, temperature)
    logq = F.log_softmax(student_logits.float() / temperature, dim=1)
    logq_top = logq.gather(1, target.index)
    kl = (_xlogy_exp(t_top) - t_top.exp() * logq_top).sum(1)
    if target.tail_count:
        tail_p = torch.where(torch.isfinite(t_tail), t_tail.exp(), torch.zeros_like(t_tail))
        kl = kl + target.tail_count * _xlogy_exp(t_tail) - tail_p * (logq.sum(1) - logq_top.sum(1))
    return kl * temperature**2


def uncertainty_weight(u: torch.Tensor) -> torch.Tensor:
    """Avatar KD's weight of each row, 1 / (1 + u / mean u) over the batch: (B,) in (0, 1]; all
    ones when the batch's u are all zero (avatars without dropout)."""
    mean = u.float().mean()
    if not bool(mean > 0):
        return torch.ones_like(u, dtype=torch.float32)
    return 1.0 / (1.0 + u.float().clamp_min(0) / mean)
