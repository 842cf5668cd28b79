"""Rendering: realised view parameters + decoded images -> the model's input tensor.

Precompute (the teacher's input) and training (the student's) both render through
:func:`render_8bit` in the workers and :func:`kdcache.pixels.take` on the device; with the same
parameters, images and size the two tensors are bit-identical, which is what the replay tests
check. Each side renders at its own resolution from the same source-pixel box.
:func:`render_views` (:func:`render_raw` + :func:`normalize`) is the same recipe in one call
on the CPU: the reference the tests hold the two-part path to, bit for bit.

Order of operations, fixed because floating point is not associative:
crop + resize in one Pillow call on the 8-bit image (bilinear, or what an ``interpolation`` op
says; antialiased when shrinking; Pillow computes 8-bit resampling in fixed point, so the bytes
do not depend on the CPU) -> the view ops before the mixing op on the 8-bit image (flip,
RandAugment, colour jitter, erasing; the partner's with its own parameters) -> scale to [0, 1]
float32 -> the mix (mixup ``lam * own + (1 - lam) * partner`` with ``lam`` taken from its
float16 value; CutMix pastes the partner's box) -> the ops after it, on the float image ->
normalise with the model's own mean and std (:class:`InputConvention`; teacher and student may
differ, and the cache records the teacher's). :data:`RENDERER` names this recipe (a
:class:`Renderer`; FFCV's decode and resize are another, :mod:`kdcache.ffcv_renderer`) and the
cache's view spec records every op's version; the trainer refuses a cache made another way.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from kdcache.errors import KdcacheError
from kdcache.view_ops import Mixup, rel_to_px
from kdcache.views import MIN_IMAGE_SIZE, PRESETS, Views, ViewSpec

# Views without a spec (made by hand) render as crop|flip|mixup: what every view was before
# view ops, whatever its crop was (the box is given).
LEGACY = PRESETS["function_matching"]

log = logging.getLogger(__name__)

RENDERER = "pil-bilinear-v1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputConvention:
    """How a model wants its input: ``(x - mean) / std`` per channel on [0, 1] RGB pixels.

    ``interpolation`` is what the model names (timm's ``bicubic``, torchvision's ``bilinear``);
    it is recorded, but the renderer resizes bilinearly (:data:`RENDERER`) until interpolation
    becomes a view op of its own.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def identity(self) -> dict[str, list[float]]:
        """What changes the input bytes: the cache attribute ``teacher_input``."""
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_identity(
        cls, d: Mapping[str, Any], interpolation: str = "bilinear"
    ) -> InputConvention:
        return cls(tuple(d["mean"]), tuple(d["std"]), interpolation)

    def describe(self) -> str:
        return f"mean {_fmt(self.mean)} / std {_fmt(self.std)}"


def _fmt(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


IMAGENET = InputConvention(IMAGENET_MEAN, IMAGENET_STD)

SourceImage = Image.Image | torch.Tensor | np.ndarray


def decode_image(data: bytes) -> Image.Image:
    """Encoded image bytes -> decoded RGB image. Raises ``OSError``/``ValueError`` when broken.

    16-bit grey (Pillow's modes ``I;16*``, and ``I``, in which Pillow gives 16-bit PGMs and
    older Pillows 16-bit PNGs) keeps its high byte, as Pillow does itself for 16-bit RGB, instead
    of being clipped at 255 by ``convert``; every other mode converts as Pillow does.
    """
    with Image.open(io.BytesIO(data)) as im:
        if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            wide = np.asarray(im).astype(np.int64)
            grey = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
            return Image.fromarray(grey).convert("RGB")
        return im.convert("RGB")  # a new, fully loaded image


def _as_pil(image: SourceImage) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    array = image.permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else image
    return Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), "RGB")


_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def crop_resize(
    image: SourceImage, box: np.ndarray, flip: bool, size: int, resample: str = "bilinear"
) -> np.ndarray:
    """Image (PIL, or (3, H, W) / (H, W, 3) uint8), box (top, left, height, width) ->
    (size, size, 3) uint8, resized with ``resample`` (bilinear or bicubic)."""
    top, left, height, width = (int(v) for v in box)
    out = _as_pil(image).resize(
        (size, size), _RESAMPLE[resample], box=(left, top, left + width, top + height)
    )
    array = np.asarray(out)
    return array[:, ::-1] if flip else array


@dataclass(frozen=True)
class Renderer:
    """How encoded images become 8-bit crops; ``name`` is what a cache records (``renderer``)
    and the trainer checks. This one is Pillow's (:data:`RENDERER`): decode with Pillow, crop
    and resize in one Pillow call (:func:`crop_resize`). Every view op runs on its output.
    :mod:`kdcache.ffcv_renderer` is FFCV's."""

    name: str = RENDERER

    def decode(self, data: bytes, height: int, width: int) -> SourceImage:
        """Encoded bytes of an image of the index's (height, width) -> the decoded image.
        Raises ``OSError``/``ValueError`` when it does not decode."""
        return decode_image(data)

    def crop_resize(
        self, image: SourceImage, box: np.ndarray, flip: bool, size: int, resample: str
    ) -> np.ndarray:
        """One decoded image's crop ``box``, flipped or not -> (size, size, 3) uint8."""
        return crop_resize(image, box, flip, size, resample)

    def check(self, spec: ViewSpec) -> None:
        """Refuse a pipeline this renderer cannot render (a :class:`KdcacheError`)."""

    def check_data(self, index: Any, where: str) -> None:
        """Refuse data (a ``DatasetIndex``, named ``where``) this renderer cannot decode,
        judged by its first image."""


PILLOW = Renderer()


def get_renderer(name: str) -> Renderer:
    """``pillow`` or ``ffcv`` (or a renderer id a cache records) -> its :class:`Renderer`."""
    if name in ("pillow", RENDERER):
        return PILLOW
    from kdcache import ffcv_renderer

    if name in ("ffcv", ffcv_renderer.RENDERER):
        return ffcv_renderer.FFCV
    raise KdcacheError(
        f"unknown renderer {name!r}: this kdcache has pillow ({RENDERER}) and ffcv "
        f"({ffcv_renderer.RENDERER})"
    )


def render_views(
    views: Views,
    rows: np.ndarray,
    images: Mapping[int, SourceImage],
    size: int,
    convention: InputConvention = IMAGENET,
    resample: str = "bilinear",
) -> torch.Tensor:
    """Render ``views`` of samples ``rows`` (global indices) -> (B, 3, size, size) float32,
    normalised by ``convention``.

    images: decoded images by global index; mixing partners must be present too.
    resample: the crop's resize filter (``ViewSpec.resample`` says which for each side).
    """
    return normalize(render_raw(views, rows, images, size, resample), convention)


def render_raw(
    views: Views,
    rows: np.ndarray,
    images: Mapping[int, SourceImage],
    size: int,
    resample: str = "bilinear",
    renderer: Renderer = PILLOW,
) -> np.ndarray:
    """The views before normalisation: (B, size, size, 3) float32 in [0, 1], mixed.

    Per row: the crop, resized; then the ops before the mixing op on the 8-bit image (on the
    partner's too, with its own parameters); then the mix; then the ops after it on the float
    image. A pipeline of crop, flip and mixup takes the vectorised path it always took.
    """
    spec = views.spec or LEGACY
    ops = spec.ops
    mix_at, after = _mix_position(spec), _after_mix(spec)
    own, other = _render_8bit(views, rows, images, size, resample, renderer)
    # numpy, single-threaded: these small element-wise ops are slower under torch's thread
    # pool on a busy CPU, and IEEE float32 arithmetic gives the same bytes either way.
    x = own.astype(np.float32)
    x /= np.float32(255.0)
    mixed = views.partner >= 0
    if mixed.any():
        if isinstance(ops[mix_at], Mixup):
            lam = views.lam[mixed].astype(np.float32).reshape(-1, 1, 1, 1)  # exact: f16 -> f32
            y = other[mixed].astype(np.float32)
            y /= np.float32(255.0)
            x[mixed] = x[mixed] * lam + y * (np.float32(1.0) - lam)
        else:
            op = ops[mix_at]
            for b in np.flatnonzero(mixed):
                params = views.params(b, mix_at, spec=spec)
                x[b] = op.mix(own[b], other[b], float(views.lam[b]), params)
    if after:
        for b in range(len(rows)):
            x[b] = _pipeline(x[b], spec, views, b, after)
    return x


@dataclass
class Pixels8:
    """A batch's views as 8-bit pixels, for the mix and normalisation on the training device
    (:mod:`kdcache.pixels`): what :func:`render_raw` computes, stopped before the floats.

    own: (B, S, S, 3) uint8, each row's crop after its 8-bit ops, with a CutMix box already
    pasted (a paste of 8-bit pixels is the paste of their floats); partner: (M, S, S, 3) uint8,
    the partners of the M rows ``blend`` (int64) that mixup blends with weight ``lam``
    ((M,) float32, exact from the stored float16).
    """

    own: np.ndarray
    partner: np.ndarray
    blend: np.ndarray
    lam: np.ndarray


def renders_8bit(spec: ViewSpec | None) -> bool:
    """Whether a pipeline's views leave the workers as 8-bit pixels (:func:`render_8bit`): no
    op after the mixing op (those run on the mixed floats), and a mixing op that says how it
    mixes 8-bit pixels (``MixOp.mixes_8bit``: mixup, cutmix and mix do)."""
    spec = spec or LEGACY
    if _after_mix(spec):
        return False
    at = _mix_position(spec)
    return at == len(spec.ops) or spec.ops[at].mixes_8bit


def render_8bit(
    views: Views,
    rows: np.ndarray,
    images: Mapping[int, SourceImage],
    size: int,
    resample: str = "bilinear",
    renderer: Renderer = PILLOW,
) -> Pixels8:
    """The views of ``rows`` as :class:`Pixels8`, for a pipeline that :func:`renders_8bit`."""
    own, other = _render_8bit(views, rows, images, size, resample, renderer)
    return mix_8bit(views, own, other)


def mix_8bit(views: Views, own: np.ndarray, other: np.ndarray) -> Pixels8:
    """Rows' own and partner crops ((B, S, S, 3) uint8 each; ``own`` is changed) -> the
    :class:`Pixels8` of their views: CutMix boxes pasted, mixup's rows and partners picked."""
    spec = views.spec or LEGACY
    size = own.shape[1]
    blend: list[int] = []
    mix_at = _mix_position(spec)
    for b in np.flatnonzero(views.partner >= 0):
        op = spec.ops[mix_at]
        box = op.paste_box(views.params(b, mix_at, spec=spec))
        if box is None:
            blend.append(int(b))
        else:
            y0, y1, x0, x1 = rel_to_px(box, size)
            own[b, y0:y1, x0:x1] = other[b, y0:y1, x0:x1]
    picked = np.asarray(blend, dtype=np.int64)
    return Pixels8(own, other[picked], picked, views.lam[picked].astype(np.float32))


def _mix_position(spec: ViewSpec) -> int:
    kinds = [getattr(op, "kind", "") for op in spec.ops]
    return kinds.index("mix") if "mix" in kinds else len(spec.ops)


def _after_mix(spec: ViewSpec) -> list[int]:
    kinds = [getattr(op, "kind", "") for op in spec.ops]
    return [i for i in range(_mix_position(spec) + 1, len(kinds)) if kinds[i] != "resample"]


def _render_8bit(
    views: Views,
    rows: np.ndarray,
    images: Mapping[int, SourceImage],
    size: int,
    resample: str,
    renderer: Renderer,
) -> tuple[np.ndarray, np.ndarray]:
    """-> (own, partner) (B, size, size, 3) uint8: each row's crop and its partner's (zeros
    when it has none), resized, then the ops before the mixing op on the 8-bit images."""
    spec = views.spec or LEGACY
    n = len(rows)
    kinds = [getattr(op, "kind", "") for op in spec.ops]
    before = [i for i in range(_mix_position(spec)) if kinds[i] not in ("crop", "resample")]
    # A flip right after the crop is done by the crop's own call, as it always was.
    flip_first = bool(before) and kinds[before[0]] == "flip"
    if flip_first:
        before = before[1:]
    own = np.empty((n, size, size, 3), dtype=np.uint8)
    other = np.zeros((n, size, size, 3), dtype=np.uint8)
    for b, i in enumerate(rows):
        flip = flip_first and bool(views.flip[b])
        image = renderer.crop_resize(images[int(i)], views.box[b], flip, size, resample)
        own[b] = _pipeline(image, spec, views, b, before) if before else image
        partner = int(views.partner[b])
        if partner >= 0:
            flip = flip_first and bool(views.partner_flip[b])
            image = renderer.crop_resize(
                images[partner], views.partner_box[b], flip, size, resample
            )
            other[b] = _pipeline(image, spec, views, b, before, partner=True) if before else image
    return own, other


def _pipeline(
    x: np.ndarray,
    spec: ViewSpec,
    views: Views,
    row: int,
    positions: list[int],
    partner: bool = False,
) -> np.ndarray:
    """Ops ``positions`` of ``spec`` applied in order to one image of row ``row``."""
    for i in positions:
        x = spec.ops[i].apply(x, views.params(row, i, partner, spec))
    return x


def normalize(x: np.ndarray, convention: InputConvention) -> torch.Tensor:
    """(B, S, S, 3) float32 in [0, 1] -> (B, 3, S, S) float32 ``(x - mean) / std``.

    ``x`` is normalised in place (a batch's pixels are not copied twice on the hot path): copy
    it first when one render must also feed a model of another convention."""
    x -= np.asarray(convention.mean, dtype=np.float32)
    x /= np.asarray(convention.std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def resolve_image_size(value: int | str, short_sides: np.ndarray, option: str) -> int:
    """A model's input size from its option: ``auto`` is the data's median short side rounded to
    a multiple of 8; a size that upscales that median more than 2x is said in one line.

    short_sides: (N,) int short side of each readable image of the data.
    """
    median = int(np.median(short_sides)) if len(short_sides) else 0
    if value == "auto":
        if not median:
            raise KdcacheError(f"{option} auto needs readable images in the data; give a size")
        size = max(MIN_IMAGE_SIZE, int(round(median / 8)) * 8)
        log.info("%s auto: %d px (the data's median short side is %d px)", option, size, median)
        return size
    size = int(value)
    if size < MIN_IMAGE_SIZE:
        raise KdcacheError(f"{option} must be at least {MIN_IMAGE_SIZE} px or auto, got {size}")
    if median and size > 2 * median:
        log.warning(
            "%s %d upscales the data's images %.1fx (their median short side is %d px), at about "
            "%.0fx the compute of their own size; pass %s auto (or a size) if that is not meant",
            option,
            size,
            size / median,
            median,
            (size / median) ** 2,
            option,
        )
    return size
