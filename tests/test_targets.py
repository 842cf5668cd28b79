"""Sparse teacher targets and the distillation losses against dense torch references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdcache.runtime import topk_rows
from kdcache.targets import cross_entropy, from_labels, from_logits, from_topk, kl_divergence

C = 10


def logits(seed: int, b: int = 6, c: int = C, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * scale


def cached(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What precompute stores: fp16 top-k logits, their indices, fp32 lse."""
    rows = topk_rows(x, k)
    return rows["topk_logits"], rows["topk_index"].to(torch.int16), rows["lse"]


def dense_kl(student: torch.Tensor, teacher_p: torch.Tensor, t: float) -> torch.Tensor:
    """KL(p_T || q_T) * T^2 with p_T proportional to p^(1/T); dense, by hand."""
    logp = teacher_p.clamp_min(1e-30).log() / t
    logp = logp - logp.logsumexp(1, keepdim=True)
    p = logp.exp()
    logq = F.log_softmax(student / t, dim=1)
    kl = (p * (logp - logq)).where(p > 0, torch.zeros_like(p)).sum(1)
    return kl.mean() * t * t


@pytest.mark.parametrize("k", [1, 3, 5, C])
def test_topk_probabilities_and_tail_sum_to_one(k):
    x = logits(0)
    target = from_topk(*cached(x, k), C)
    dense = target.dense()
    assert dense.shape == (6, C)
    assert torch.allclose(dense.sum(1), torch.ones(6), atol=2e-3)
    assert (dense >= 0).all()
    # the top-k classes carry exp(logit - lse); every other class the same share of the tail
    p = torch.softmax(x, 1)
    top = p.topk(k, 1)
    assert torch.allclose(dense.gather(1, top.indices), top.values, atol=2e-3)
    if k < C:
        tail = (1 - top.values.sum(1)) / (C - k)
        mask = torch.ones(6, C, dtype=torch.bool).scatter_(1, top.indices, False)
        assert torch.allclose(
            dense[mask].view(6, C - k), tail[:, None].expand(-1, C - k), atol=2e-3
        )


def test_float32_topk_sums_to_one_exactly():
    x = logits(1)
    top, index = x.topk(4, 1)
    dense = from_topk(top, index, x.logsumexp(1), C).dense()
    assert torch.allclose(dense.sum(1), torch.ones(6), atol=1e-6)


def test_full_k_equals_softmax():
    x = logits(2, scale=1.0)
    fp16 = from_topk(*cached(x, C), C)
    assert fp16.tail_count == 0
    assert torch.allclose(fp16.dense(), torch.softmax(x, 1), atol=1e-3)
    # in log space the only error is the fp16 rounding of each logit (half an ulp)
    wide = logits(2, scale=4.0)
    err = from_topk(*cached(wide, C), C).dense().log() - torch.log_softmax(wide, 1)
    assert err.abs().max() <= wide.abs().max() * 2.0**-11 + 1e-5
    top, index = x.topk(C, 1)
    fp32 = from_topk(top, index, x.logsumexp(1), C)
    assert torch.allclose(fp32.dense(), torch.softmax(x, 1), atol=1e-6)
    assert torch.allclose(from_logits(x).dense(), torch.softmax(x, 1), atol=1e-6)


def test_fp16_overshoot_leaves_no_negative_tail():
    # one dominant class: fp16 rounding of its logit can push exp(logit - lse) above 1
    x = torch.tensor([[20.0, -10.0, -10.0, -10.0]])
    target = from_topk(*cached(x, 2), 4)
    dense = target.dense()
    assert torch.isfinite(target.logp).all()
    assert (dense >= 0).all() and not torch.isnan(dense).any()


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_kl_zero_when_student_equals_teacher(t):
    x = logits(3)
    target = from_topk(*cached(x, C), C)
    assert kl_divergence(x, target, t).abs().item() < 1e-3
    assert kl_divergence(logits(4), target, t).item() > 0.05


@pytest.mark.parametrize("t", [1.0, 2.0, 0.5])
def test_kl_matches_dense_reference_full_k(t):
    teacher, student = logits(5), logits(6)
    top, index = teacher.topk(C, 1)
    target = from_topk(top, index, teacher.logsumexp(1), C)
    expected = dense_kl(student, torch.softmax(teacher, 1), t)
    assert torch.allclose(kl_divergence(student, target, t), expected, atol=1e-5, rtol=1e-5)
    # T^2 Hinton scaling: the same as F.kl_div on tempered distributions
    ref = (
        F.kl_div(
            F.log_softmax(student / t, 1),
            F.log_softmax(teacher / t, 1),
            log_target=True,
            reduction="batchmean",
        )
        * t
        * t
    )
    assert torch.allclose(kl_divergence(student, target, t), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t", [1.0, 3.0])
def test_kl_truncated_target_matches_dense_reference(t):
    teacher, student = logits(7), logits(8)
    target = from_logits(teacher, k=3)
    expected = dense_kl(student, target.dense(), t)
    assert torch.allclose(kl_divergence(student, target, t), expected, atol=1e-5, rtol=1e-5)


def test_kl_gradient_matches_dense_reference():
    teacher = logits(9)
    s1 = logits(10).requires_grad_()
    s2 = s1.detach().clone().requires_grad_()
    kl_divergence(s1, from_logits(teacher), 2.0).backward()
    dense_kl(s2, torch.softmax(teacher, 1), 2.0).backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)


def _accumulated(target) -> torch.Tensor:
    """Dense (B, C) probabilities, adding up entries that name the same class."""
    dense = torch.zeros(target.index.shape[0], target.num_classes)
    return dense.scatter_add_(1, target.index, target.logp.exp())


def _mixed_one_hot_case():
    label = torch.tensor([1, 2, 3, 4])
    partner = torch.tensor([5, 6, 3, 0])
    lam = torch.tensor([1.0, 0.75, 0.6, 0.5], dtype=torch.float16)
    expected = torch.zeros(4, C)
    expected[0, 1] = 1  # not mixed: the partner label is ignored
    expected[1, 2], expected[1, 6] = 0.75, 0.25
    expected[2, 3] = 1.0  # partner of the same class: the weights add up
    expected[3, 4], expected[3, 0] = 0.5, 0.5
    return from_labels(label, partner, lam, C), expected


def test_from_labels_is_the_mixed_one_hot():
    target, expected = _mixed_one_hot_case()
    assert torch.equal(target.tail_logp, torch.full((4,), float("-inf")))
    assert torch.allclose(_accumulated(target), expected, atol=1e-6)


def test_from_labels_dense_is_the_mixed_one_hot():
    target, expected = _mixed_one_hot_case()
    assert torch.allclose(target.dense(), expected, atol=1e-6)


def test_kl_against_labels_is_cross_entropy_minus_entropy():
    target, expected = _mixed_one_hot_case()
    student = logits(14, b=4)
    p = expected
    entropy = -(p * p.clamp_min(1e-30).log()).sum(1).mean()
    assert torch.allclose(
        kl_divergence(student, target), cross_entropy(student, target) - entropy, atol=1e-5
    )


def test_cross_entropy_with_hard_labels_equals_torch():
    student = logits(11)
    label = torch.tensor([0, 3, 9, 2, 2, 7])
    target = from_labels(label, label, torch.ones(6), C)
    assert torch.allclose(
        cross_entropy(student, target), F.cross_entropy(student, label), atol=1e-6
    )


def test_cross_entropy_with_mixed_labels_equals_torch():
    student = logits(12)
    label, partner = torch.tensor([0, 3, 9, 2, 2, 7]), torch.tensor([1, 1, 1, 5, 2, 0])
    lam = torch.tensor([0.5, 0.9, 1.0, 0.7, 0.6, 0.55])
    expected = (
        lam * F.cross_entropy(student, label, reduction="none")
        + (1 - lam) * F.cross_entropy(student, partner, reduction="none")
    ).mean()
    got = cross_entropy(student, from_labels(label, partner, lam, C))
    assert torch.allclose(got, expected, atol=1e-6)


def test_sparse_target_moves_between_devices():
    target = from_logits(logits(13), k=4).to("cpu")
    assert target.index.dtype == torch.int64 and target.num_classes == C
