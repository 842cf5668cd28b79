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

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SparseTarget:
    """index: (B, K) int64 class ids; logp: (B, K) float32 log-probabilities at T = 1;
    tail_logp: (B,) float32 log-probability of each one of the ``num_classes - K`` other classes
    (``-inf`` when there is no tail mass)."""

    index: torch.Tensor
    logp: torch.Tensor
    tail_logp: torch.Tensor
    num_classes: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SparseTarget:
        return SparseTarget(
            self.index.to(device, non_blocking=non_blocking),
            self.logp.to(device, non_blocking=non_blocking),
            self.tail_logp.to(device, non_blocking=non_blocking),
            self.num_classes,
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
