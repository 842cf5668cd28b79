"""One optimizer step of the student, the same for every teacher mode and loss.

``fit`` (:mod:`kdcache.train.trainer`), ``tools/bench.py`` and the tests call
:func:`train_step`; the learning-rate schedule is stepped by the caller's loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kdcache.runtime import autocast
from kdcache.targets import SparseTarget

LossFn = Callable[[torch.Tensor, SparseTarget], torch.Tensor]


def zero_pixels(image_size: int, device: torch.device) -> torch.Tensor:
    """The input of a step without usable rows: (2, 3, S, S) float32 zeros on ``device``."""
    return torch.zeros(2, 3, image_size, image_size, device=device)


def train_step(
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    pixels: torch.Tensor,
    target: SparseTarget | None,
    loss: LossFn,
    clip_grad: float,
    device: torch.device,
) -> torch.Tensor:
    """One step: forward, loss, ``zero_grad``, backward, clip, ``optimizer.step()``.

    student: the student (or its DDP wrapper), in train mode, on ``device``.
    pixels: (B, 3, S, S) float32 on ``device`` (:func:`kdcache.pixels.take`), normalised with the
        student's input convention; the forward runs under :func:`kdcache.runtime.autocast`
        (bf16 on CUDA, plain fp32 on CPU).
    target: the batch's :class:`~kdcache.targets.SparseTarget` on ``device`` (B rows, the
        student's C classes); ``None``: a batch without usable rows, stepped with a loss of
        exactly zero that still touches every parameter (under DDP every rank must step; the
        step count and schedule then do not depend on which rows were usable). Pass
        :func:`zero_pixels` as its ``pixels``.
    loss: ``loss(logits, target)`` on the (B, C) logits cast to float32 -> a 0-dim tensor
        (:func:`kdcache.losses.create_loss` makes one); unused when ``target`` is None.
    clip_grad: clip the gradients' global L2 norm to this when > 0.

    Returns the 0-dim float32 loss tensor on ``device`` (not synced; call ``.detach()`` to
    keep it).
    """
    with autocast(device):
        logits = student(pixels)
    logits = logits.float()
    value = logits.sum() * 0.0 if target is None else loss(logits, target)
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(student.parameters(), clip_grad)
    optimizer.step()
    return value
