"""Avatars of a teacher for the cache (Avatar KD, Zhang et al., ACM MM 2023).

An avatar is the teacher with elementwise inverted dropout on the input of one layer, the
*site*: the teacher runs once up to the site, then ``n`` times through the rest, each time with
a fresh mask (a forward pre-hook that stacks the site's input ``n + 1`` times, the first
unperturbed, so the rest runs once on the larger batch). Each row's masks are drawn from its
view's key (:func:`mask_keys`), so re-running the teacher on a cached view gives the cached
avatars bit for bit on the same machine and device.

Per view the cache stores the ensemble (the mean of the avatars' probabilities) as a target
like the teacher's (top-k log-probabilities and their log-sum-exp) and the uncertainty ``u``:
the variance over the avatars of KL(avatar || teacher). With ``p = 0`` every avatar is the
teacher and ``u = 0``.

Inverted dropout right before a linear layer leaves its expected output unchanged, so there the
ensemble differs from the teacher only through the softmax; the default site is therefore the
input of the last top-level layer with a spatial output (the last stage, or the last
conv-BN-ReLU's nonlinearity), where a nonlinearity follows (docs/methods.md measures
KL(ensemble || teacher) at several sites).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdcache.draws import mix64, times_gamma
from kdcache.errors import KdcacheError
from kdcache.features import layer_shapes, module_at

_AVATAR_STREAM = 0x617661  # "ava": keeps avatar masks apart from every view draw


def default_site(model: nn.Module, image_size: int) -> str:
    """The last top-level layer whose output has a spatial size above 1 (its input is perturbed)."""
    names = [name for name, _ in model.named_children()]
    shapes = layer_shapes(model, image_size, names)
    spatial = [n for n in names if n in shapes and len(shapes[n]) == 3 and shapes[n][1] > 1]
    if not spatial:
        raise KdcacheError(
            f"{type(model).__name__} has no top-level layer with a spatial output; name the "
            "avatar site with --avatar-site LAYER (`kdcache models --layers SPEC`)"
        )
    return spatial[-1]


def mask_keys(view_keys: np.ndarray, n: int) -> np.ndarray:
    """(R,) uint64 view keys -> (n, R) int64 seeds of each row's avatar masks."""
    salt = mix64(np.array([_AVATAR_STREAM], dtype=np.uint64))
    base = mix64(np.asarray(view_keys, dtype=np.uint64) ^ salt)
    seeds = np.stack([mix64(base + times_gamma(i + 1)) for i in range(n)])
    return (seeds >> np.uint64(1)).astype(np.int64)  # 63 bits: a torch manual_seed


def masks(
    shape: tuple[int, ...], seeds: np.ndarray, p: float, device: torch.device
) -> torch.Tensor:
    """(n, R) seeds -> (n, R, *shape) float32 inverted-dropout masks (0 or 1 / (1 - p)), each
    row's drawn by a generator of its own seed on ``device``."""
    n, rows = seeds.shape
    out = torch.empty(n, rows, *shape, device=device)
    g = torch.Generator(device=device)
    for i in range(n):
        for r in range(rows):
            g.manual_seed(int(seeds[i, r]))
            out[i, r] = torch.rand(shape, generator=g, device=device)
    return (out >= p).float() / (1 - p)


@contextmanager
def perturbed(model: nn.Module, site: str, seeds: np.ndarray, p: float) -> Iterator[None]:
    """While active, a forward of ``model`` on R rows returns (n + 1) * R rows of logits: the
    teacher's, then avatar 1's, ... (``seeds`` (n, R) from :func:`mask_keys`)."""
    module = module_at(model, site, "--avatar-site")

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        m = masks(tuple(x.shape[1:]), seeds, p, x.device).to(x.dtype)
        stacked = torch.cat([x[None], x[None] * m], 0)  # (n + 1, R, ...)
        return (stacked.flatten(0, 1), *args[1:])

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def ensemble(logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n + 1) * R logits from :func:`perturbed` -> (teacher logits (R, C), the ensemble's
    log-probabilities (R, C), the uncertainty u (R,)), all float32."""
    z = logits.float().unflatten(0, (n + 1, -1))
    teacher, avatars = z[0], z[1:]
    log_p = F.log_softmax(avatars, dim=2)  # (n, R, C)
    log_t = F.log_softmax(teacher, dim=1)
    log_ens = torch.logsumexp(log_p, 0) - np.log(n)
    kl = (log_p.exp() * (log_p - log_t[None])).sum(2)  # (n, R): KL(avatar || teacher)
    u = kl.var(0, unbiased=False)
    return teacher, log_ens, u


def teacher_and_avatars(
    teacher: nn.Module,
    pixels: torch.Tensor,
    device: torch.device,
    avatars: dict,
    keys: np.ndarray | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher on a batch, and its avatars as a cache's ``avatars`` attribute says:
    (teacher logits (R, C), the ensemble's log-probabilities (R, C), u (R,)), on ``device``.
    keys: (R,) the rows' view keys, uint64 or their int64 view (as they leave a worker)."""
    from kdcache.runtime import teacher_logits

    n = int(avatars["n"])
    keys = (keys.numpy() if torch.is_tensor(keys) else np.asarray(keys)).view(np.uint64)
    with perturbed(teacher, avatars["site"], mask_keys(keys, n), float(avatars["drop"])):
        logits = teacher_logits(teacher, pixels, device)
    return ensemble(logits, n)
