"""FFCV's renderer (``ffcv-turbojpeg-area-v1``): views decoded and resized the way FFCV's image
decoders do it, with kdcache's boxes, flips and mixing instead of FFCV's random draws.

FFCV (``RandomResizedCropRGBImageDecoder``) decodes a JPEG whole with libjpeg-turbo and crops
and resizes it with OpenCV's ``cv2.resize(..., INTER_AREA)``, both in its C extension
(``ffcv/_libffcv``: ``imdecode`` and ``resize``). This renderer calls those two functions, on
each sample's own JPEG bytes (the image field of a kdcache ``.beton``, or a tar shard's), so
its crops are the pixels FFCV's loader would make of the same box; a flip mirrors the crop, and
the mix, the scaling and the normalisation follow as for every renderer (:mod:`kdcache.pixels`).
Its arithmetic is not Pillow's (another IDCT, area averaging instead of Pillow's antialiased
bilinear filter), so a cache records the renderer that made it and is replayed by that one only
(the ``renderer`` identity attribute); ``kdcache verify --renderer`` measures how far the two
are apart on the same data.

What it renders: JPEG images (others, PNG say, are rows that do not decode: FFCV's image field
holds only JPEG or raw pixels) and the pipelines of crop ops, ``flip`` and the mixing ops
(``mixup``, ``cutmix``, ``mix``). The other view ops (``randaugment``, ``color_jitter``,
``erase``, ``interpolation``) are Pillow or numpy code on 8-bit images and are refused here.

The C library is loaded from the installed ffcv package without importing it (its import pulls
in numba and takes seconds), so each worker pays only for the ``dlopen``.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdcache.errors import KdcacheError
from kdcache.render import Renderer, SourceImage
from kdcache.views import ViewSpec

RENDERER = "ffcv-turbojpeg-area-v1"
# The view ops this renderer renders (by op name); the rest of a pipeline is refused.
SUPPORTED_OPS = ("inception_crop", "center_crop", "flip", "mixup", "cutmix", "mix")
_JPEG = b"\xff\xd8"


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    try:
        spec = importlib.util.find_spec("ffcv")
    except (ImportError, ValueError):  # ValueError: a module object without a spec
        spec = None
    found = glob.glob(os.path.join(os.path.dirname(spec.origin), "_libffcv*.so")) if spec else []
    if not found:
        raise KdcacheError(
            "the ffcv renderer needs the ffcv extra (pip install 'kdcache[ffcv]', which builds "
            "against OpenCV and libjpeg-turbo); or render with --renderer pillow"
        )
    lib = ctypes.CDLL(found[0])
    lib.imdecode.argtypes = [
        ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p,
        ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32,
        ctypes.c_uint32, ctypes.c_bool, ctypes.c_bool,
    ]  # fmt: skip
    lib.resize.argtypes = 11 * [ctypes.c_int64]
    return lib


def available() -> bool:
    """Whether FFCV's C library can be loaded here."""
    try:
        _lib()
    except (KdcacheError, OSError):
        return False
    return True


def imdecode(data: bytes, height: int, width: int) -> np.ndarray:
    """JPEG bytes of an image of (height, width) -> (height, width, 3) uint8 RGB, decoded by
    FFCV's libjpeg-turbo call (full scale). Raises ``ValueError`` when it does not decode."""
    if not data.startswith(_JPEG):
        raise ValueError("not a JPEG (the ffcv renderer decodes JPEG only)")
    if height <= 0 or width <= 0:
        raise ValueError("no image size in the index")
    src = np.frombuffer(data, dtype=np.uint8)
    out = np.empty((height, width, 3), dtype=np.uint8)
    rc = _lib().imdecode(
        src.ctypes.data, src.size, height, width, out.ctypes.data, height, width, 0, 0, 1, 1,
        False, False,
    )  # fmt: skip
    if rc != 0:
        raise ValueError(f"libjpeg-turbo could not decode it (code {rc})")
    return out


def resize_crop(image: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 and a box (top, left, height, width) -> (size, size, 3) uint8: the box
    resized by FFCV's ``resize`` (OpenCV, INTER_AREA)."""
    top, left, height, width = (int(v) for v in box)
    image = np.ascontiguousarray(image, dtype=np.uint8)
    out = np.empty((size, size, 3), dtype=np.uint8)
    _lib().resize(
        0, image.ctypes.data, image.shape[0], image.shape[1], top, top + height, left,
        left + width, out.ctypes.data, size, size,
    )  # fmt: skip
    return out


@dataclass(frozen=True)
class FfcvRenderer(Renderer):
    """:class:`~kdcache.render.Renderer` with FFCV's decode and resize (see the module)."""

    name: str = RENDERER

    def decode(self, data: bytes, height: int, width: int) -> SourceImage:
        return imdecode(data, height, width)

    def crop_resize(
        self, image: SourceImage, box: np.ndarray, flip: bool, size: int, resample: str
    ) -> np.ndarray:
        out = resize_crop(np.asarray(image), box, size)
        return out[:, ::-1] if flip else out

    def check(self, spec: ViewSpec) -> None:
        other = [op.name for op in spec.ops if op.name not in SUPPORTED_OPS]
        if other:
            raise KdcacheError(
                f"the ffcv renderer renders crops, flips and mixing only ({', '.join(SUPPORTED_OPS)}"
                f"); views {spec.name!r} also have {', '.join(other)} (Pillow code): render them "
                "with --renderer pillow"
            )
        _lib()

    def check_data(self, index: Any, where: str) -> None:
        from kdcache.data.webdataset import read_unit

        samples = read_unit(index.units[0].url) if index.units else []
        first = next((s.data for s in samples if s.data), None)
        if first is not None and not first.startswith(_JPEG):
            kind = "a PNG" if first.startswith(b"\x89PNG") else "not a JPEG"
            raise KdcacheError(
                f"the ffcv renderer decodes JPEG only (FFCV's image field holds JPEG or raw "
                f"pixels), and the first image of {where} is {kind}: render it with "
                "--renderer pillow"
            )


FFCV = FfcvRenderer()
