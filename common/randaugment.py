"""RandAugment's ops (timm's ``rand-m9-mstd0.5-inc1``) as pure functions of explicit parameters.

timm's ``AugmentOp`` draws three things with Python's global ``random`` before it touches the
image: the magnitude (``gauss(m, mstd)`` clipped to ``[0, 10]``), the sign of the level for the
ops in :data:`SIGNED` and the resampling filter (bilinear or bicubic) for the ops in
:data:`GEOMETRIC`. Here the caller draws all three from its own counter-based stream and passes
them in, so that a view is reproducible whatever process renders it; :func:`apply_op` is then
exactly what ``AugmentOp`` does after its draws (the tests compare pixel for pixel with timm).

The rest of timm's policy is the caller's too: ``RandAugment`` applies ``n=2`` ops picked
uniformly from :data:`OPS` with replacement, each skipped with probability ``1 - p = 0.5``.

Level arithmetic keeps timm's order of float operations (``magnitude / 10 * 30``, not
``magnitude * 3``) because the results are compared bit for bit.

Only PIL is imported: timm (and torch) stay optional.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from PIL import Image, ImageEnhance, ImageOps

# timm's _RAND_INCREASING_TRANSFORMS, in timm's order: an op's index is its position here.
OPS: tuple[str, ...] = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
# Ops whose level timm's `_randomly_negate` flips with probability 1/2.
SIGNED: frozenset[str] = frozenset(
    {
        "Rotate",
        "ColorIncreasing",
        "ContrastIncreasing",
        "BrightnessIncreasing",
        "SharpnessIncreasing",
        "ShearX",
        "ShearY",
        "TranslateXRel",
        "TranslateYRel",
    }
)
# Ops that resample (timm's `_check_args_tf`): timm picks bilinear or bicubic uniformly for each
# call unless its hparams fix `interpolation`.
GEOMETRIC: frozenset[str] = frozenset(
    {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
)
# timm divides magnitudes by _LEVEL_DENOM = 10 and clips them to [0, magnitude_max or 10];
# the policy sets no `mmax`, so one constant serves as both.
MAGNITUDE_MAX = 10.0
# timm's `img_mean` for ImageNet's mean (0.485, 0.456, 0.406): min(255, round(255 * mean)).
FILL: tuple[int, int, int] = (124, 116, 104)

_ROTATE_DEGREES = 30.0
_SHEAR = 0.3
_TRANSLATE_PCT = 0.45  # timm's default `translate_pct` (its factory sets it only for AugMix)
_ENHANCE_SPAN = 0.9  # enhance factors 1 +- 0.9 * level, floored at _ENHANCE_MIN
_ENHANCE_MIN = 0.1
_SOLARIZE_ADD = 110  # at level 1; timm also caps it at 128, which 110 never reaches
_SOLARIZE_ADD_THRESHOLD = 128

# (image, magnitude, negate, resample, fill) -> image
_Op = Callable[[Image.Image, float, bool, Image.Resampling, tuple[int, int, int]], Image.Image]


def _level(magnitude: float) -> float:
    return magnitude / MAGNITUDE_MAX


def _signed(value: float, negate: bool) -> float:
    return -value if negate else value


def _affine(
    image: Image.Image,
    matrix: tuple[float, ...],
    resample: Image.Resampling,
    fill: tuple[int, int, int],
) -> Image.Image:
    # Pillow maps each output pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f).
    return image.transform(
        image.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill
    )


def _auto_contrast(image, magnitude, negate, resample, fill):
    return ImageOps.autocontrast(image)


def _equalize(image, magnitude, negate, resample, fill):
    return ImageOps.equalize(image)


def _invert(image, magnitude, negate, resample, fill):
    return ImageOps.invert(image)


def _rotate(image, magnitude, negate, resample, fill):
    # timm calls Image.rotate on Pillow >= 5.2 (its older branches build the same affine map).
    degrees = _signed(_level(magnitude) * _ROTATE_DEGREES, negate)
    return image.rotate(degrees, resample=resample, fillcolor=fill)


def _posterize_increasing(image, magnitude, negate, resample, fill):
    bits = 4 - int(_level(magnitude) * 4)  # 4 bits kept at magnitude 0, none at 10
    # Masking rather than ImageOps.posterize: recent Pillow rejects bits=0 with a ValueError
    # (so timm's op raises at magnitude 10), older Pillow gave black, as this mask does.
    mask = 0xFF & ~(2 ** (8 - bits) - 1)
    return image.point([i & mask for i in range(256)] * 3)


def _solarize_increasing(image, magnitude, negate, resample, fill):
    # Pixels at or above the threshold are inverted: none at magnitude 0, all at 10.
    threshold = 256 - min(256, int(_level(magnitude) * 256))
    return ImageOps.solarize(image, threshold)


def _solarize_add(image, magnitude, negate, resample, fill):
    add = min(128, int(_level(magnitude) * _SOLARIZE_ADD))
    lut = [min(255, i + add) if i < _SOLARIZE_ADD_THRESHOLD else i for i in range(256)]
    return image.point(lut * 3)


def _enhance(enhancer: type[ImageEnhance._Enhance]) -> _Op:
    def op(image, magnitude, negate, resample, fill):
        factor = max(_ENHANCE_MIN, 1.0 + _signed(_level(magnitude) * _ENHANCE_SPAN, negate))
        return enhancer(image).enhance(factor)

    return op


def _shear_x(image, magnitude, negate, resample, fill):
    factor = _signed(_level(magnitude) * _SHEAR, negate)
    return _affine(image, (1, factor, 0, 0, 1, 0), resample, fill)


def _shear_y(image, magnitude, negate, resample, fill):
    factor = _signed(_level(magnitude) * _SHEAR, negate)
    return _affine(image, (1, 0, 0, factor, 1, 0), resample, fill)


def _translate_x_rel(image, magnitude, negate, resample, fill):
    pixels = _signed(_level(magnitude) * _TRANSLATE_PCT, negate) * image.width
    return _affine(image, (1, 0, pixels, 0, 1, 0), resample, fill)


def _translate_y_rel(image, magnitude, negate, resample, fill):
    pixels = _signed(_level(magnitude) * _TRANSLATE_PCT, negate) * image.height
    return _affine(image, (1, 0, 0, 0, 1, pixels), resample, fill)


_IMPLEMENTATIONS: dict[str, _Op] = {
    "AutoContrast": _auto_contrast,
    "Equalize": _equalize,
    "Invert": _invert,
    "Rotate": _rotate,
    "PosterizeIncreasing": _posterize_increasing,
    "SolarizeIncreasing": _solarize_increasing,
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x_rel,
    "TranslateYRel": _translate_y_rel,
}
_BY_INDEX: tuple[_Op, ...] = tuple(_IMPLEMENTATIONS[name] for name in OPS)


def apply_op(
    image: Image.Image,
    op: int,
    magnitude: float,
    negate: bool,
    bicubic: bool,
    fill: tuple[int, int, int] = FILL,
) -> Image.Image:
    """Apply ``OPS[op]`` to an RGB image at a realised magnitude; returns a new image, same size.

    ``magnitude`` is the already drawn and clipped value in ``[0, MAGNITUDE_MAX]``. ``negate``
    flips the level of the ops in :data:`SIGNED` (ignored by the others); ``bicubic`` picks
    BICUBIC over BILINEAR resampling and ``fill`` colours the uncovered area for the ops in
    :data:`GEOMETRIC` (both ignored by the others).
    """
    if image.mode != "RGB":
        raise ValueError(f"apply_op takes 8-bit RGB images, got mode {image.mode!r}; convert first")
    if not 0 <= op < len(OPS):
        raise ValueError(f"op index {op} is outside 0..{len(OPS) - 1} (the positions in OPS)")
    if not (math.isfinite(magnitude) and 0 <= magnitude <= MAGNITUDE_MAX):
        raise ValueError(f"magnitude {magnitude} is outside [0, {MAGNITUDE_MAX}]: clip it first")
    if len(fill) != 3 or not all(0 <= c <= 255 for c in fill):
        raise ValueError(f"fill {fill!r} is not an RGB colour of three values in 0..255")
    resample = Image.Resampling.BICUBIC if bicubic else Image.Resampling.BILINEAR
    return _BY_INDEX[op](image, magnitude, negate, resample, tuple(fill))
