"""Rendering: realised view parameters + decoded images -> the model's input tensor.

Precompute (the teacher's input) and training (the student's) both call :func:`render_views`;
with the same parameters, images and size the two tensors are bit-identical, which is what the
replay tests check. Each side renders at its own resolution from the same source-pixel box.

Order of operations, fixed because floating point is not associative:
crop + resize on uint8 (bilinear, antialiased) -> flip -> scale to [0, 1] float32 -> mixup
``lam * own + (1 - lam) * partner`` with ``lam`` taken from its float16 value -> normalise.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from kdcache.views import Views

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded image bytes -> (3, H, W) uint8 RGB. Raises ``OSError``/``ValueError`` when broken."""
    with Image.open(io.BytesIO(data)) as im:
        array = np.asarray(im.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def crop_resize(image: torch.Tensor, box: np.ndarray, flip: bool, size: int) -> torch.Tensor:
    """(3, H, W) uint8, box (top, left, height, width) -> (3, size, size) float32 in [0, 1]."""
    top, left, height, width = (int(v) for v in box)
    out = F.resized_crop(
        image,
        top,
        left,
        height,
        width,
        [size, size],
        interpolation=InterpolationMode.BILINEAR,
        antialias=True,
    )
    if flip:
        out = out.flip(-1)
    return out.float().div_(255.0)


def render_views(
    views: Views,
    rows: np.ndarray,
    images: Mapping[int, torch.Tensor],
    size: int,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> torch.Tensor:
    """Render ``views`` rows for samples ``rows`` (global indices) -> (B, 3, size, size) float32.

    images: decoded (3, H, W) uint8 images by global index; partners must be present too.
    """
    out = torch.empty(len(rows), 3, size, size, dtype=torch.float32)
    for b, i in enumerate(rows):
        x = crop_resize(images[int(i)], views.box[b], bool(views.flip[b]), size)
        partner = int(views.partner[b])
        if partner >= 0:
            lam = float(views.lam[b])  # exact: every float16 is a float32
            y = crop_resize(
                images[partner], views.partner_box[b], bool(views.partner_flip[b]), size
            )
            x = x.mul_(lam).add_(y, alpha=1.0 - lam)
        out[b] = x
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return out.sub_(m).div_(s)
