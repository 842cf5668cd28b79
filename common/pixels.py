"""Pixels on their way from the workers to a model: 8-bit out of the workers, then mixed, scaled
to [0, 1] and normalised on the device that runs the model.

A worker renders a batch's views (:func:`kdcache.render.render_8bit`: crops, 8-bit view ops,
CutMix pastes) and :func:`ship` puts them in the batch under a name (``pixels``, or
``teacher_pixels``): the rows' own crops as (B, S, S, 3) uint8, the partners of the rows that
mixup blends as (M, S, S, 3) uint8 (``NAME_partner``), and those rows and their weights
(``blend_rows``/``blend_lam``, or ``teacher_blend_...``). That is a quarter of the float32
bytes without mixing and half with it. :func:`take` finishes them on the device, in this order,
fixed on both stages:

    x = own / 255 (float32);  x[rows] = x[rows] * lam + (partner / 255) * (1 - lam);
    x = (x - mean) / std;  x as (B, 3, S, S) (channels-last on CUDA, a view: no copy)

These are the very float32 operations of :func:`kdcache.render.render_raw` and
:func:`kdcache.render.normalize` in the same order, each correctly rounded, so on the CPU the
tensor is bit-identical to the worker-side render that caches were made with
(``tests/test_pixels.py``). Divisions are by tensors, never by a Python scalar: CUDA turns a
division by a scalar into a multiplication by its reciprocal, which is not the same float. On a
GPU "exact" therefore means the same IEEE operations in the same order: bit-identical where the
device rounds as the standard says (it does for these elementwise ops unless a build enables
fast math); see docs/cache-format.md.

A pipeline with ops after the mixing op (``erase`` after ``mixup``, timm's order) runs those on
the mixed floats: its batch ships (B, S, S, 3) float32 in [0, 1] and only the normalisation runs
on the device (:func:`kdcache.render.renders_8bit` says which).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np
import torch

from kdcache.render import (
    PILLOW,
    InputConvention,
    Pixels8,
    Renderer,
    SourceImage,
    render_8bit,
    render_raw,
    renders_8bit,
)
from kdcache.views import Views


def _keys(name: str) -> tuple[str, str, str]:
    """The batch keys of ``name``'s partners, blended rows and weights; the last two have no
    ``pixels`` in them, so they travel packed with the batch's other small fields."""
    base = name.replace("pixels", "blend")
    return f"{name}_partner", f"{base}_rows", f"{base}_lam"


def ship(
    item: dict,
    name: str,
    views: Views,
    rows: np.ndarray,
    images: Mapping[int, SourceImage],
    size: int,
    resample: str = "bilinear",
    renderer: Renderer = PILLOW,
) -> None:
    """Render ``views`` of ``rows`` into ``item`` under ``name``, as 8-bit pixels when the
    pipeline allows (:func:`kdcache.render.renders_8bit`), else as [0, 1] floats."""
    if renders_8bit(views.spec):
        put(item, name, render_8bit(views, rows, images, size, resample, renderer))
    else:
        raw = render_raw(views, rows, images, size, resample, renderer)
        item[name] = torch.from_numpy(raw)


def put(item: dict, name: str, r: Pixels8) -> None:
    """8-bit views made elsewhere (:func:`kdcache.render.mix_8bit`) into ``item`` as
    :func:`ship` puts them."""
    partner, blend, lam = _keys(name)
    item[name], item[partner] = torch.from_numpy(r.own), torch.from_numpy(r.partner)
    item[blend], item[lam] = torch.from_numpy(r.blend), torch.from_numpy(r.lam)


def take(
    item: Mapping, name: str, convention: InputConvention, device: torch.device | str
) -> torch.Tensor:
    """The model's input from what :func:`ship` put under ``name``: (B, 3, S, S) float32 on
    ``device``, normalised by ``convention`` (channels-last on CUDA, contiguous elsewhere).
    ``item`` is not changed: the same pixels can be taken again with another convention."""
    device = torch.device(device)
    partner, blend, lam = _keys(name)
    scale, mean, std = _constants(convention.mean, convention.std, device)
    x = item[name].to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = x.float().div_(scale)
        if len(item[blend]):
            rows = item[blend].to(device, non_blocking=True)
            w = item[lam].to(device, non_blocking=True).view(-1, 1, 1, 1)
            y = item[partner].to(device, non_blocking=True).float().div_(scale)
            x[rows] = x[rows] * w + y * (1.0 - w)
    else:
        x = x.clone()  # the shipped floats stay as they were
    x.sub_(mean).div_(std)
    x = x.permute(0, 3, 1, 2)
    return x if device.type == "cuda" else x.contiguous()


@functools.lru_cache(maxsize=16)
def _constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(255, mean, std) as (3,) float32 tensors on ``device``, made once: a tensor built from
    a list on CUDA is a copy from pageable memory, which waits for the stream, every batch."""
    return (
        torch.full((3,), 255.0, device=device),
        torch.tensor(mean, dtype=torch.float32, device=device),
        torch.tensor(std, dtype=torch.float32, device=device),
    )


def teacher_name(item: Mapping) -> str:
    """Where a batch's teacher input is: its own render, or the student's very render (the
    same views, size and filter), which :func:`take` normalises the teacher's way."""
    return "teacher_pixels" if "teacher_pixels" in item else "pixels"


def shipped_bytes(item: Mapping, name: str = "pixels") -> int:
    """Bytes of ``name``'s pixels in a batch (own, partners, rows, weights)."""
    return sum(item[k].numel() * item[k].element_size() for k in (name, *_keys(name)) if k in item)
