"""The KD loss family (kdcache.losses): each at its minimum when the student is the teacher,
DKD equal to its dense form at K = C, the hard-label ce weighted as the views were mixed, and
the runs that cannot give a loss what it needs refused before work."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdcache import targets as T
from kdcache.losses import create_loss

C = 7


def pair(seed: int = 0, rows: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, C, generator=g) * 3, torch.randn(rows, C, generator=g) * 3


def dense_dkd(zs, teacher_p, gt, alpha, beta, t):
    """DKD as the paper's code writes it, on dense (B, C) teacher probabilities at T = 1."""
    zt = teacher_p.log()
    ps, pt = F.softmax(zs / t, 1), F.softmax(zt / t, 1)
    m = F.one_hot(gt, zs.shape[1]).bool()
    bs = torch.stack([(ps * m).sum(1), (ps * ~m).sum(1)], 1)
    bt = torch.stack([(pt * m).sum(1), (pt * ~m).sum(1)], 1)
    tckd = (bt * (bt.log() - bs.log())).sum(1)
    pt2, ls2 = F.softmax(zt / t - 1000 * m, 1), F.log_softmax(zs / t - 1000 * m, 1)
    nckd = (pt2 * (pt2.clamp_min(1e-30).log() - ls2)).sum(1)
    return (alpha * tckd + beta * nckd) * t * t


@pytest.mark.parametrize("spec", ["kl(t=1)", "kl(t=4)", "reverse_kl", "reverse_kl(t=3)",
                                  "dkd", "dkd(alpha=2, beta=0.5, t=1)"])  # fmt: skip
def test_a_divergence_is_zero_when_the_student_is_the_teacher(spec):
    _, teacher = pair()
    target = T.from_logits(teacher)
    assert abs(float(create_loss(spec)(teacher, target))) < 1e-4
    student = teacher.clone().requires_grad_()
    create_loss(spec)(student, target).backward()
    assert float(student.grad.abs().max()) < 1e-4  # a minimum, not only a zero


def test_soft_ce_is_at_its_minimum_the_teachers_entropy():
    _, teacher = pair(1)
    target = T.from_logits(teacher)
    p = F.softmax(teacher, 1)
    entropy = -(p * p.log()).sum(1).mean()
    assert torch.allclose(create_loss("soft_ce")(teacher, target), entropy, atol=1e-5)
    student = teacher + 0.5 * torch.randn_like(teacher)
    assert float(create_loss("soft_ce")(student, target)) > float(entropy)


@pytest.mark.parametrize("t", [1.0, 4.0])
@pytest.mark.parametrize("k", [C, 3])
def test_dkd_is_its_dense_form(t, k):
    """At K = C it is the paper's loss; at K < C the same loss on the target's dense form
    (top-k plus the spread tail), which is the approximation docs/methods.md measures."""
    zs, zt = pair(2)
    gt = torch.tensor([0, 3, 6, 2, 2, 5])
    target = T.from_logits(zt, k)
    want = dense_dkd(zs, target.dense(), gt, 1.0, 8.0, t)
    got = T.dkd_rows(zs, target, gt, 1.0, 8.0, t)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got, want)


def test_dkd_takes_the_labels_mixed_and_the_teachers_top1_without_one():
    zs, zt = pair(3)
    target = T.from_logits(zt)
    label = torch.tensor([1, 2, 3, -1, 4, 5])
    partner = torch.tensor([0, 6, 3, 1, -1, 2])
    lam = torch.tensor([1.0, 0.3, 0.6, 1.0, 0.5, 1.0])
    target.labels = T.Labels(label, partner, lam)
    p = target.dense()
    top1 = zt.argmax(1)
    rows = lambda gt: dense_dkd(zs, p, gt, 1.0, 8.0, 4.0)  # noqa: E731
    # row 3 has no label and row 4 no partner label: the teacher's top-1 for the whole row
    known = torch.tensor([True, True, True, False, False, True])
    own = rows(torch.where(known, label, top1))
    other = rows(torch.where(known & (lam < 1), partner, top1))
    weight = torch.where(known, lam, torch.ones_like(lam))
    want = (weight * own + (1 - weight) * other).mean()
    assert torch.allclose(create_loss("dkd")(zs, target), want, rtol=1e-5)
    target.labels = None
    assert torch.allclose(create_loss("dkd")(zs, target), rows(top1).mean(), rtol=1e-5)


def test_ce_is_the_hard_label_cross_entropy_mixed_as_the_views():
    zs, zt = pair(4)
    target = T.from_logits(zt, 3)
    label = torch.tensor([1, 2, 3, -1, 4, 5])
    partner = torch.tensor([0, 6, 3, 1, -1, 2])
    lam = torch.tensor([1.0, 0.3, 0.6, 1.0, 0.5, 1.0])
    target.labels = T.Labels(label, partner, lam)
    logq = F.log_softmax(zs, 1)
    rows = [0, 1, 2, 5]  # rows 3 and 4 miss a label: they do not count
    want = torch.stack(
        [-(lam[r] * logq[r, label[r]] + (1 - lam[r]) * logq[r, partner[r]]) for r in rows]
    ).mean()
    assert torch.allclose(create_loss("ce")(zs, target), want, rtol=1e-6)
    target.labels = T.Labels(torch.full((6,), -1), partner, lam)
    assert float(create_loss("ce")(zs, target)) == 0.0  # a batch without labels
    # kl+ce(w=...): the two terms add, the teacher's part untouched by the labels
    target.labels = T.Labels(label, partner, lam)
    both = create_loss("kl(t=2)+ce(w=0.25)")(zs, target)
    assert torch.allclose(both, T.kl_divergence(zs, target, 2.0) + 0.25 * want, rtol=1e-6)


def test_reverse_kl_is_its_dense_form_and_finite_without_tail_mass():
    zs, zt = pair(5)
    target = T.from_logits(zt, 3)
    q, p = F.softmax(zs, 1), target.dense()
    want = (q * (q.log() - p.log())).sum(1).mean()
    assert torch.allclose(T.reverse_kl(zs, target), want, rtol=1e-5)
    hard = T.SparseTarget(target.index, target.logp, torch.full((6,), -float("inf")), C)
    assert torch.isfinite(T.reverse_kl(zs, hard))  # the floor: a cache whose top-k sums to 1


def test_a_run_that_cannot_give_a_loss_what_it_needs_is_refused(train_dir, val_dir, tmp_path):
    from types import SimpleNamespace

    from conftest import small_run

    from kdcache.errors import KdcacheError
    from kdcache.losses import LOSSES, register_loss
    from kdcache.train.trainer import fit

    for spec, needle in (("dkd", "needs a teacher's distribution"),
                         ("kl+reverse_kl(w=0.5)", "--teacher-mode none trains on labels")):  # fmt: skip
        with pytest.raises(KdcacheError, match=needle):
            fit(small_run(train_dir, val_dir, tmp_path / "r", loss=spec))
    assert not (tmp_path / "r" / "config.json").exists()

    # a loss that needs the whole distribution, against a top-3 cache of 10 classes
    from kdcache.train import trainer

    @register_loss("needs_all")
    class NeedsAll:
        needs = frozenset({"full"})

        def __call__(self, logits, target):
            return logits.sum() * 0

    try:
        cfg = small_run(train_dir, val_dir, tmp_path / "f", loss="needs_all", teacher_mode="cached")
        mode, loss = cfg.mode, cfg.create_loss()
        with pytest.raises(KdcacheError, match="holds its top 3 of 10 classes; precompute with"):
            trainer._check_needs(cfg, loss, mode, SimpleNamespace(topk=3), 10, "labels", None)
        trainer._check_needs(cfg, loss, mode, SimpleNamespace(topk=10), 10, "labels", None)
    finally:
        LOSSES.pop("needs_all")
