"""``train_step``: the one student step of ``fit`` and ``tools/bench.py``."""

from __future__ import annotations

import torch

from kdcache import targets as T
from kdcache.losses import create_loss
from kdcache.train.step import train_step, zero_pixels

DEVICE = torch.device("cpu")


def _student(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5)
    ).train()


def test_step_is_forward_loss_backward_clip_step_by_hand():
    pixels = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    teacher = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    target = T.from_logits(teacher)
    loss = create_loss("kl(t=2.0)")
    a, b = _student(), _student()
    a(pixels), b(pixels)  # materialise the lazy layer
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.AdamW(a.parameters(), lr=0.1)
    opt_b = torch.optim.AdamW(b.parameters(), lr=0.1)
    for _ in range(3):
        got = train_step(a, opt_a, pixels, target, loss, 0.5, DEVICE)
        want = T.kl_divergence(b(pixels).float(), target, 2.0)
        opt_b.zero_grad(set_to_none=True)
        want.backward()
        torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
        opt_b.step()
        assert torch.equal(got, want)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_a_batch_without_rows_steps_with_an_exact_zero_loss():
    student = _student()
    student(zero_pixels(8, DEVICE))
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    before = [p.detach().clone() for p in student.parameters()]
    loss = train_step(student, opt, zero_pixels(8, DEVICE), None, create_loss("ce"), 1.0, DEVICE)
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    for p, old in zip(student.parameters(), before, strict=True):
        assert p.grad is not None and not p.grad.any()  # every parameter was touched
        assert torch.equal(p, old)
