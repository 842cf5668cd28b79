"""Rendering: realised view parameters + decoded images -> the model's input tensor.

Precompute (the teacher's input) and training (the student's) both call :func:`render_views`;
with the same parameters, images and size the two tensors are bit-identical, which is what the
replay tests check. Each side renders at its own resolution from the same source-pixel box.

Order of operations, fixed because floating point is not associative:
crop + resize in one Pillow call on the 8-bit image (bilinear, antialiased when shrinking; Pillow
computes 8-bit resampling in fixed point, so the bytes do not depend on the CPU) -> flip ->
scale to [0, 1] float32 -> mixup ``lam * own + (1 - lam) * partner`` with ``lam`` taken from its
float16 value -> normalise. :data:`RENDERER` names this recipe; caches record it and the trainer
refuses a cache rendered by another recipe.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image

from kdcache.views import Views

RENDERER = "pil-bilinear-v1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SourceImage = Image.Image | torch.Tensor | np.ndarray


def decode_image(data: bytes) -> Image.Image:
    """Encoded image bytes -> decoded RGB image. Raises ``OSError``/``ValueError`` when broken."""
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")  # a new, fully loaded image


def _as_pil(image: SourceImage) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    array = image.permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else image
    return Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), "RGB")


def crop_resize(image: SourceImage, box: np.ndarray, flip: bool, size: int) -> np.ndarray:
    """Image (PIL, or (3, H, W) / (H, W, 3) uint8), box (top, left, height, width) ->
    (size, size, 3) uint8."""
    top, left, height, width = (int(v) for v in box)
    out = _as_pil(image).resize(
        (size, size), Image.Resampling.BILINEAR, box=(left, top, left + width, top + height)
    )
    array = np.asarray(out)
    return array[:, ::-1] if flip else array


def render_views(
    views: Views,
    rows: np.ndarray,
    images: Mapping[int, SourceImage],
    size: int,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> torch.Tensor:
    """Render ``views`` of samples ``rows`` (global indices) -> (B, 3, size, size) float32.

    images: decoded images by global index; mixing partners must be present too.
    """
    n = len(rows)
    own = np.empty((n, size, size, 3), dtype=np.uint8)
    other = np.zeros((n, size, size, 3), dtype=np.uint8)
    for b, i in enumerate(rows):
        own[b] = crop_resize(images[int(i)], views.box[b], bool(views.flip[b]), size)
        partner = int(views.partner[b])
        if partner >= 0:
            other[b] = crop_resize(
                images[partner], views.partner_box[b], bool(views.partner_flip[b]), size
            )
    # numpy, single-threaded: these small element-wise ops are slower under torch's thread
    # pool on a busy CPU, and IEEE float32 arithmetic gives the same bytes either way.
    x = own.astype(np.float32)
    x /= np.float32(255.0)
    mixed = views.partner >= 0
    if mixed.any():
        lam = views.lam[mixed].astype(np.float32).reshape(-1, 1, 1, 1)  # exact: f16 -> f32
        y = other[mixed].astype(np.float32)
        y /= np.float32(255.0)
        x[mixed] = x[mixed] * lam + y * (np.float32(1.0) - lam)
    x -= np.asarray(mean, dtype=np.float32)
    x /= np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
