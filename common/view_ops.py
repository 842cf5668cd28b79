"""View ops: the steps a view is made of, one object each, with one interface.

A view spec is a pipeline of ops, written ``inception_crop(min_area=0.08)|flip|randaugment(2, 9)
|mixup|erase(p=0.25)`` (:mod:`kdcache.grammar`; :class:`kdcache.views.ViewSpec` runs it). An op
(:class:`ViewOp`):

- ``sample(d)`` draws its parameters for every row of a unit from its own stream
  (:class:`OpDraws`) and returns them in the dtypes the cache stores (``fields()``), so the
  teacher's render at precompute and the student's replay start from the same numbers;
- ``apply(x, p)`` applies them to one rendered image (``p``: that row's parameters);
- ``kind`` says where it may stand: ``crop`` (first; it picks the source box that is resized to
  the model's size), ``flip``, ``image`` (8-bit ops, before any mix), ``pixels`` (8-bit or
  float images, before or after a mix), ``mix`` (combines the row with a partner of its unit)
  and ``resample`` (the resize filter of each side, no draws).

Ops before the mix op apply to the row's own image and to its partner's, each with its own
draws (the partner's crop and flip are drawn as they always were, its other ops from the op's
partner stream); ops after it apply to the mixed image. A user's own op is a class
``pkg.module:Class`` with this interface (docs/extending.md).

Coordinates that must mean the same region at the teacher's and the student's size (erasing
and CutMix boxes) are relative: uint16 units of 1/65535 of the rendered side.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np

from kdcache import draws
from kdcache.draws import CROP_POS, FLIP, INCEPTION_TRIES, LAM, PARTNER, PICK_PARTNER
from kdcache.errors import KdcacheError

REL = 65535  # relative coordinates: uint16 units of 1/REL of the rendered side
# 8-bit fill of erasing's ``const`` mode and RandAugment's geometric ops: ImageNet's mean,
# round(255 * mean), which is what timm fills with for ImageNet-normalised models. A fixed
# pixel value (not 0 of a normalised tensor, as timm erases) keeps teacher and student with
# different normalisations on the same pixels.
MEAN_PIXEL = (124, 116, 104)
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
_IMAGENET_STD = np.array([0.229, 0.224, 0.225])


@dataclass(frozen=True)
class OpField:
    """A row array an op stores: its name (the pipeline prefixes the op's), dtype, fill and
    per-row shape."""

    name: str
    dtype: str
    fill: Any
    shape: tuple[int, ...] = ()
    doc: str = ""


@dataclass
class OpDraws:
    """The draws of one op for the ``n`` rows of a unit.

    keys: (n,) uint64 view keys; position: the op's place in the pipeline; partner: drawing for
    the mixing partners (then ``hw`` are the partners' image sizes); hw: (n, 2) int64 (height,
    width) of the source image each row's op works on.
    """

    keys: np.ndarray
    position: int
    partner: bool
    hw: np.ndarray

    def __post_init__(self) -> None:
        self.op = draws.op_keys(self.keys, self.position, self.partner)

    def __len__(self) -> int:
        return len(self.keys)

    def uniform(self, slot: int) -> np.ndarray:
        """(n,) float64 on [0, 1): draw ``slot`` of this op's stream."""
        return draws.uniform(self.op, slot)

    def normal(self, slot: int) -> np.ndarray:
        """(n,) float64 standard normals from slots ``slot`` and ``slot + 1``."""
        return draws.normal(self.op, slot)

    def generator(self, row: int) -> np.random.Generator:
        """Row ``row``'s own generator, for a variable number of draws."""
        return draws.generator(self.op[row])

    def base(self, slot: int) -> np.ndarray:
        """Draw ``slot`` of the view's base stream, the partner's block when drawing for it
        (the original presets' layout: crop, flip and mixup keep their draws)."""
        return draws.uniform(self.keys, slot + (PARTNER if self.partner else 0))


class ViewOp:
    """The interface of a view op (subclasses are frozen dataclasses of their arguments)."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    kind: ClassVar[str] = "pixels"

    def fields(self) -> tuple[OpField, ...]:
        return ()

    def sample(self, d: OpDraws) -> dict[str, np.ndarray]:
        return {}

    def apply(self, x: np.ndarray, p: Mapping[str, Any]) -> np.ndarray:
        return x

    def check(self) -> None:
        """Raise ValueError on arguments out of range."""

    def describe(self) -> str:
        """The op as a spec term, with the arguments that differ from the defaults."""
        args = {
            f.name: getattr(self, f.name)
            for f in fields(self)  # type: ignore[arg-type]
            if getattr(self, f.name) != f.default
        }
        return _format(self.name, args)


def _format(name: str, args: Mapping[str, Any]) -> str:
    from kdcache.grammar import format_term

    return format_term(name, dict(args))


OPS: dict[str, type] = {}


def register_op(cls: type) -> type:
    """Class decorator: ``cls.name(...)`` in a view spec makes ``cls(...)``."""
    if cls.name in OPS and OPS[cls.name] is not cls:
        raise ValueError(f"a view op called {cls.name!r} is already registered")
    OPS[cls.name] = cls
    return cls


# -- crops ---------------------------------------------------------------------------------


@register_op
@dataclass(frozen=True)
class InceptionCrop(ViewOp):
    """RandomResizedCrop's box: an area fraction in [min_area, max_area] of the image and an
    aspect ratio (log-uniform) in [min_aspect, max_aspect], 10 tries, then torchvision's
    fallback. Stored as ``box`` (``partner_box``): (top, left, height, width) source pixels."""

    min_area: float = 0.05
    max_area: float = 1.0
    min_aspect: float = 3 / 4
    max_aspect: float = 4 / 3
    name: ClassVar[str] = "inception_crop"
    kind: ClassVar[str] = "crop"

    def check(self) -> None:
        if not 0 < self.min_area <= self.max_area <= 1:
            raise ValueError("needs 0 < min_area <= max_area <= 1")
        if not 0 < self.min_aspect <= self.max_aspect:
            raise ValueError("needs 0 < min_aspect <= max_aspect")

    def sample(self, d: OpDraws) -> dict[str, np.ndarray]:
        hw = d.hw
        h_img, w_img = hw[:, 0].astype(np.float64), hw[:, 1].astype(np.float64)
        n = len(d)
        box_h, box_w = np.zeros(n), np.zeros(n)
        done = np.zeros(n, dtype=bool)
        log_lo, log_hi = math.log(self.min_aspect), math.log(self.max_aspect)
        for t in range(INCEPTION_TRIES):
            area = h_img * w_img * (self.min_area + (self.max_area - self.min_area) * d.base(2 * t))
            aspect = np.exp(log_lo + (log_hi - log_lo) * d.base(2 * t + 1))
            w = np.round(np.sqrt(area * aspect))
            h = np.round(np.sqrt(area / aspect))
            ok = ~done & (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
            box_h[ok], box_w[ok] = h[ok], w[ok]
            done |= ok
        # Fallback, as torchvision: the whole image, aspect clamped into range.
        ratio = w_img / np.maximum(h_img, 1)
        fb_w = np.where(
            ratio < self.min_aspect,
            w_img,
            np.where(ratio > self.max_aspect, np.round(h_img * self.max_aspect), w_img),
        )
        fb_h = np.where(ratio < self.min_aspect, np.round(w_img / self.min_aspect), h_img)
        box_h = np.where(done, box_h, fb_h)
        box_w = np.where(done, box_w, fb_w)
        top = np.floor(d.base(CROP_POS) * (h_img - box_h + 1))
        left = np.floor(d.base(CROP_POS + 1) * (w_img - box_w + 1))
        return {"box": np.stack([top, left, box_h, box_w], axis=1).astype(np.int64)}


@register_op
@dataclass(frozen=True)
class CenterCrop(ViewOp):
    """A centred square of ``fraction`` x the short side (resize-256/crop-224 is 0.875)."""

    fraction: float = 0.875
    name: ClassVar[str] = "center_crop"
    kind: ClassVar[str] = "crop"

    def check(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError("needs 0 < fraction <= 1")

    def sample(self, d: OpDraws) -> dict[str, np.ndarray]:
        hw = d.hw
        side = np.maximum(np.round(hw.min(axis=1) * self.fraction), 1).astype(np.int64)
        top = (hw[:, 0] - side) // 2
        left = (hw[:, 1] - side) // 2
        return {"box": np.stack([top, left, side, side], axis=1)}


# -- flip and resampling -------------------------------------------------------------------


@register_op
@dataclass(frozen=True)
class Flip(ViewOp):
    """A horizontal flip with probability ``p``; stored as ``flip`` (``partner_flip``)."""

    p: float = 0.5
    name: ClassVar[str] = "flip"
    kind: ClassVar[str] = "flip"

    def check(self) -> None:
        if not 0 <= self.p <= 1:
            raise ValueError("needs 0 <= p <= 1")

    def sample(self, d: OpDraws) -> dict[str, np.ndarray]:
        return {"flip": d.base(FLIP) < self.p}

    def apply(self, x: np.ndarray, p: Mapping[str, Any]) -> np.ndarray:
        return x[:, ::-1] if p["flip"] else x


RESAMPLING = ("bilinear", "bicubic")


@register_op
@dataclass(frozen=True)
class Interpolation(ViewOp):
    """The resize filter of each side's crop: ``bilinear`` or ``bicubic``; unset, the filter
    each model's input convention names (timm's configs often say bicubic). Without this op
    every side resizes bilinearly, as kdcache always did."""

    teacher: str | None = None
    student: str | None = None
    name: ClassVar[str] = "interpolation"
    kind: ClassVar[str] = "resample"

    def check(self) -> None:
        for side in (self.teacher, self.student):
            if side is not None and side not in RESAMPLING:
                raise ValueError(f"teacher and student take {' or '.join(RESAMPLING)}")

    def resample(self, side: str, convention: str) -> str:
        chosen = self.teacher if side == "teacher" else self.student
        return chosen or (convention if convention in RESAMPLING else "bilinear")


# -- 8-bit image ops -----------------------------------------------------------------------


@register_op
@dataclass(frozen=True)
class RandAugment(ViewOp):
    """timm's RandAugment, ``rand-m{m}-mstd{mstd}-inc1``: ``n`` layers, each an op of timm's
    increasing set chosen uniformly (with replacement), applied with probability 0.5, at a
    magnitude ~ N(m, mstd) clipped to [0, 10], negated half the time for signed ops, resampled
    bilinear or bicubic at random for geometric ones, filled with :data:`MEAN_PIXEL`.

    Stored per layer: ``op`` uint8 (bits 0-3 the op of :data:`kdcache.randaugment.OPS`, bit 4
    negate, bit 5 bicubic; 255: not applied) and ``mag`` float16 (the magnitude as applied)."""

    n: int = 2
    m: float = 9.0
    mstd: float = 0.5
    name: ClassVar[str] = "randaugment"
    kind: ClassVar[str] = "image"
    SKIP: ClassVar[int] = 255

    def check(self) -> None:
        if not (isinstance(self.n, int) and 1 <= self.n <= 16):
            raise ValueError("n is 1 to 16 layers")
        if not 0 <= self.m <= 10 or self.mstd < 0:
            raise ValueError("needs 0 <= m <= 10 and mstd >= 0")

    def fields(self) -> tuple[OpField, ...]:
        return (
            OpField("op", "uint8", self.SKIP, (self.n,), "per layer: op | negate<<4 | bicubic<<5"),
            OpField("mag", "float16", 0.0, (self.n,), "per layer: the magnitude applied"),
        )

    def sample(self, d: OpDraws) -> dict[str, np.ndarray]:
        from kdcache.randaugment import MAGNITUDE_MAX, OPS

        n = len(d)
        op = np.full((n, self.n), self.SKIP, dtype=np.uint8)
        mag = np.zeros((n, self.n), dtype=np.float16)
        for layer in range(self.n):
            s = 8 * layer
            which = np.minimum((d.uniform(s) * len(OPS)).astype(np.int64), len(OPS) - 1)
            applied = d.uniform(s + 1) <= 0.5  # timm: skipped when random() > prob
            noise = d.normal(s + 2) if self.mstd > 0 else np.zeros(n)
            magnitude = np.clip(self.m + self.mstd * noise, 0.0, MAGNITUDE_MAX)
            negate = d.uniform(s + 4) > 0.5  # timm's _randomly_negate
            bicubic = d.uniform(s + 5) < 0.5  # timm's random choice of the two filters
            code = which | (negate.astype(np.int64) << 4) | (bicubic.astype(np.int64) << 5)
            op[:, layer] = np.where(applied, code, self.SKIP).astype(np.uint8)
            mag[:, layer] = np.where(applied, magnitude, 0.0).astype(np.float16)
        return {"op": op, "mag": mag}

    def apply(self, x: np.ndarray, p: Mapping[str, Any]) -> np.ndarray:
        from PIL import Image

        from kdcache.randaugment import apply_op

        if (p["op"] == self.SKIP).all():
            return x
        image = Image.fromarray(np.ascontiguousarray(x))
        for code, magnitude in zip(p["op"], p["mag"], strict=True):
            if code == self.SKIP:
                continue
            code = int(code)
            image = apply_op(
                image,
                code & 0xF,
                float(magnitude),
                negate=bool(code >> 4 & 1),
                bicubic=bool(code >> 5 & 1),
                fill=MEAN_PIXEL,
            )
        return np.asarray(image)


_PERMUTATIONS = tuple(
    (a, b, c, d)
    for a in range(4)
    for b in range(4)
    for c in range(4)
    for d in range(4)
    if len({a, b, c, d}) == 4
)


@register_op
@dataclass(frozen=True)
class ColorJitter(ViewOp):
    """torchvision's ColorJitter(brightness=b, contrast=c, saturation=s, hue=h) on the 8-bit
    image: factors uniform in [max(0, 1 - b), 1 + b] (and so on; hue in [-h, h]), the four
    adjustments in a random order. Stored: ``factors`` float16 (4,) (brightness, contrast,
    saturation, hue) and ``order`` uint8 (the permutation's index)."""

    b: float = 0.4
    c: float = 0.4
    s: float = 0.4
    h: float = 0.0
    name: ClassVar[str] = "color_jitter"
    kind: ClassVar[str] = "image"

    def check(self) -> None:
        if min(self.b, self.c, self.s) < 0 or not 0 <= self.h <= 0.5:
            raise ValueError("needs b, c, s >= 0 and 0 <= h <= 0.5")

    def fields(self) -> tuple[OpField, ...]:
        return (
            OpField("factors", "float16", 0.0, (4,), "brightness, contrast, saturation, hue"),
            OpField("order", "uint8", 0, doc="which of the 24 orders the four are applied in"),
        )

    def sample(self, d: OpDraws) -> dict[str, np.ndarray]:
        lo = [max(0.0, 1 - v) for v in (self.b, self.c, self.s)] + [-self.h]
        hi = [1 + v for v in (self.b, self.c, self.s)] + [self.h]
        factors = np.stack(
            [lo[i] + (hi[i] - lo[i]) * d.uniform(i) for i in range(4)], axis=1
        ).astype(np.float16)
        ranks = np.argsort(np.stack([d.uniform(4 + i) for i in range(4)], axis=1), axis=1)
        index = {perm: i for i, perm in enumerate(_PERMUTATIONS)}
        order = np.array([index[tuple(int(v) for v in r)] for r in ranks], dtype=np.uint8)
        return {"factors": factors, "order": order}

    def apply(self, x: np.ndarray, p: Mapping[str, Any]) -> np.ndarray:
        import torchvision.transforms.functional as F
        from PIL import Image

        image = Image.fromarray(np.ascontiguousarray(x))
        factors = [float(v) for v in p["factors"]]
        adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
        active = (self.b > 0, self.c > 0, self.s > 0, self.h > 0)
        for i in _PERMUTATIONS[int(p["order"])]:
            if active[i]:  # as torchvision: a jitter of 0 is not applied at all
                image = adjust[i](image, factors[i])
        return np.asarray(image)


# -- pixel ops (8-bit or float) ---------------------------------------------------------------


def rel_to_px(rel: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """A relative (top, left, height, width) box -> pixel rows/cols (y0, y1, x0, x1) at
    ``size``; edges are rounded, so adjacent boxes tile."""
    top, left, height, width = (int(v) for v in rel)
    y0, y1 = round(top * size / REL), round((top + height) * size / REL)
    x0, x1 = round(left * size / REL), round((left + width) * size / REL)
    return y0, min(y1, size), x0, min(x1, size)


@register_op
@dataclass(frozen=True)
class Erase(ViewOp):
    """timm's RandomErasing box, in pixel space: with probability ``p`` a box of area fraction
    U(min_area, max_area) and log-uniform aspect in [min_aspect, 1/min_aspect], 10 tries, at a
    uniform position; filled with :data:`MEAN_PIXEL` (``const``) or per-pixel noise
    (``pixel``: N(0, 1) in ImageNet-normalised units, as timm draws it, made 8-bit), drawn at
    render time from a stored key so it replays without storing pixels.

    Stored: ``box`` uint16 (4,) relative (top, left, height, width) (zeros: not erased) and, in
    ``pixel`` mode, ``noise`` uint32 (the noise's key)."""

    p: float = 0.25
    mode: str = "const"
    min_area: float = 0.02
    max_area: float = 1 / 3
    min_aspect: float = 0.3
    name: ClassVar[str] = "erase"
    kind: ClassVar[str] = "pixels"

    def check(self) -> None:
        if not 0 <= self.p <= 1:
            raise ValueError("needs 0 <= p <= 1")
        if self.mode not in ("const", "pixel"):
            raise ValueError("mode is const or pixel")
        if not 0 < self.min_area <= self.max_area < 1 or not 0 < self.min_aspect <= 1:
            raise ValueError("needs 0 < min_area <= max_area < 1 and 0 < min_aspect <= 1")

    def fields(self) -> tuple[OpField, ...]:
        box = OpField("box", "uint16", 0, (4,), "relative (top, left, height, width)")
        if self.mode == "pixel":
            return (box, OpField("noise", "uint32", 0, doc="key of the fill noise"))
        return (box,)

    def sample(self, d: OpDraws) -> dict[str, np.ndarray]:
        n = len(d)
        height, width = np.zeros(n), np.zeros(n)
        done = d.uniform(0) > self.p  # not erased: nothing to find
        erased = ~done
        log_lo, log_hi = math.log(self.min_aspect), math.log(1 / self.min_aspect)
        for t in range(10):
            area = self.min_area + (self.max_area - self.min_area) * d.uniform(1 + 2 * t)
            aspect = np.exp(log_lo + (log_hi - log_lo) * d.uniform(2 + 2 * t))
            h, w = np.sqrt(area * aspect), np.sqrt(area / aspect)
            ok = ~done & (h < 1) & (w < 1)
            height[ok], width[ok] = h[ok], w[ok]
            done |= ok
        found = erased & (height > 0)
        top = d.uniform(30) * (1 - height)
        left = d.uniform(31) * (1 - width)
        rel = np.stack([top, left, height, width], axis=1)
        box = np.where(found[:, None], np.round(rel * REL), 0).astype(np.uint16)
        out = {"box": box}
        if self.mode == "pixel":
            out["noise"] = draws.key_bits(draws.op_keys(d.op, 99))
        return out

    def apply(self, x: np.ndarray, p: Mapping[str, Any]) -> np.ndarray:
        box = p["box"]
        if not box[2] or not box[3]:
            return x
        y0, y1, x0, x1 = rel_to_px(box, x.shape[0])
        if y1 <= y0 or x1 <= x0:
            return x
        if self.mode == "const":
            fill = np.broadcast_to(np.array(MEAN_PIXEL, dtype=np.uint8), (y1 - y0, x1 - x0, 3))
        else:
            z = draws.generator(int(p["noise"])).standard_normal((y1 - y0, x1 - x0, 3))
            fill = np.clip(np.round(255 * (_IMAGENET_MEAN + _IMAGENET_STD * z)), 0, 255)
            fill = fill.astype(np.uint8)
        x = x.copy()
        x[y0:y1, x0:x1] = fill if x.dtype == np.uint8 else fill.astype(np.float32) / 255
        return x


# -- mixing ----------------------------------------------------------------------------------


class MixOp(ViewOp):
    """A mixing op: picks a partner in the unit (uniformly, another sample) and the weight
    ``lam`` of the row's own image (stored as ``partner`` and ``lam``), and combines the two
    rendered images. The target mixes the teacher's (or the labels') the same way."""

    kind: ClassVar[str] = "mix"

    def draw_lam(self, d: OpDraws) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """-> (lam (n,) float16, the op's own fields)."""
        raise NotImplementedError

    def mix(self, own: np.ndarray, other: np.ndarray, lam: float, p: Mapping[str, Any]) -> Any:
        """Images (S, S, 3): uint8 or float32 in [0, 1] -> the mixed float32 image."""
        raise NotImplementedError

    # Whether :meth:`paste_box` says how a row mixes, so that views leave the workers as 8-bit
    # pixels and the blend runs on the training device (kdcache.pixels); an op that leaves
    # this False is mixed in the workers, on floats, by :meth:`mix`.
    mixes_8bit: ClassVar[bool] = False

    def paste_box(self, p: Mapping[str, Any]) -> np.ndarray | None:
        """A row's mix as 8-bit work: the relative box (4,) uint16 pasted from the partner, or
        None when the row is blended ``lam * own + (1 - lam) * partner`` (on the device)."""
        raise NotImplementedError


def pick_partners(keys: np.ndarray) -> np.ndarray:
    """A partner other than the row itself, drawn uniformly in the unit: (n,) local index."""
    n = len(keys)
    step = 1 + np.floor(draws.uniform(keys, PICK_PARTNER) * (n - 1)).astype(np.int64)
    return (np.arange(n) + step) % n


def _beta(d: OpDraws, alpha: float, slot: int) -> np.ndarray:
    """lam ~ Beta(alpha, alpha) per row; alpha = 1 is the uniform draw ``slot`` itself."""
    if alpha == 1.0:
        return d.uniform(slot) if slot != LAM else draws.uniform(d.keys, LAM)
    return np.array([d.generator(i).beta(alpha, alpha) for i in range(len(d))])


def _as_float(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        y = x.astype(np.float32)
        y /= np.float32(255.0)
        return y
    return x


@register_op
@dataclass(frozen=True)
class Mixup(MixOp):
    """Mixup with a partner: lam ~ Beta(alpha, alpha), the row keeps max(lam, 1 - lam)
    (alpha = 1: the uniform draw the function-matching preset always used)."""

    alpha: float = 1.0
    name: ClassVar[str] = "mixup"

    def check(self) -> None:
        if not self.alpha > 0:
            raise ValueError("needs alpha > 0")

    def draw_lam(self, d: OpDraws) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        lam = _beta(d, self.alpha, LAM)
        return np.maximum(lam, 1.0 - lam).astype(np.float16), {}

    mixes_8bit: ClassVar[bool] = True

    def paste_box(self, p: Mapping[str, Any]) -> np.ndarray | None:
        return None

    def mix(self, own: np.ndarray, other: np.ndarray, lam: float, p: Mapping[str, Any]) -> Any:
        x, y = _as_float(own), _as_float(other)
        lam32 = np.float32(lam)  # exact: float16 -> float32
        return x * lam32 + y * (np.float32(1.0) - lam32)


def _cut_box(d: OpDraws, lam: np.ndarray, slot: int) -> tuple[np.ndarray, np.ndarray]:
    """timm's rand_bbox on the unit square: side sqrt(1 - lam), a uniform centre, clipped.
    -> (box (n, 4) uint16 relative, lam (n,) float16: 1 - the clipped box's area)."""
    cut = np.sqrt(1.0 - lam)
    cy, cx = d.uniform(slot), d.uniform(slot + 1)
    y0, y1 = np.clip(cy - cut / 2, 0, 1), np.clip(cy + cut / 2, 0, 1)
    x0, x1 = np.clip(cx - cut / 2, 0, 1), np.clip(cx + cut / 2, 0, 1)
    top, left = np.round(y0 * REL), np.round(x0 * REL)
    height, width = np.round(y1 * REL) - top, np.round(x1 * REL) - left
    box = np.stack([top, left, height, width], axis=1).astype(np.uint16)
    area = (height / REL) * (width / REL)
    return box, (1.0 - area).astype(np.float16)


@register_op
@dataclass(frozen=True)
class CutMix(MixOp):
    """CutMix with a partner: lam ~ Beta(alpha, alpha), a box of side sqrt(1 - lam) at a
    uniform centre, clipped, is the partner's; the row keeps 1 - the box's area (timm's
    correction). Stored: ``box`` uint16 (4,) relative (top, left, height, width)."""

    alpha: float = 1.0
    name: ClassVar[str] = "cutmix"

    def check(self) -> None:
        if not self.alpha > 0:
            raise ValueError("needs alpha > 0")

    def fields(self) -> tuple[OpField, ...]:
        return (OpField("box", "uint16", 0, (4,), "relative box pasted from the partner"),)

    def draw_lam(self, d: OpDraws) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        box, lam = _cut_box(d, _beta(d, self.alpha, 0), 1)
        return lam, {"box": box}

    mixes_8bit: ClassVar[bool] = True

    def paste_box(self, p: Mapping[str, Any]) -> np.ndarray | None:
        return p["box"]

    def mix(self, own: np.ndarray, other: np.ndarray, lam: float, p: Mapping[str, Any]) -> Any:
        return _paste(own, other, p["box"])


def _paste(own: np.ndarray, other: np.ndarray, box: np.ndarray) -> np.ndarray:
    x = _as_float(own).copy()
    y0, y1, x0, x1 = rel_to_px(box, x.shape[0])
    x[y0:y1, x0:x1] = _as_float(other[y0:y1, x0:x1])
    return x


@register_op
@dataclass(frozen=True)
class Mix(MixOp):
    """timm's per-sample choice between the two (Mixup(mixup_alpha, cutmix_alpha,
    switch_prob, mode='elem')): CutMix with probability ``switch``, else Mixup. Stored as
    CutMix (``box``; zeros on the Mixup rows)."""

    mixup: float = 0.8
    cutmix: float = 1.0
    switch: float = 0.5
    name: ClassVar[str] = "mix"

    def check(self) -> None:
        if not (self.mixup > 0 and self.cutmix > 0 and 0 <= self.switch <= 1):
            raise ValueError("needs mixup > 0, cutmix > 0 and 0 <= switch <= 1")

    def fields(self) -> tuple[OpField, ...]:
        return (OpField("box", "uint16", 0, (4,), "relative CutMix box (zeros: mixup)"),)

    def draw_lam(self, d: OpDraws) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        cut = d.uniform(0) < self.switch
        mixup_lam = Mixup(self.mixup).draw_lam(OpDraws(d.keys, d.position + 64, False, d.hw))[0]
        box, cut_lam = _cut_box(d, _beta(d, self.cutmix, 1), 2)
        lam = np.where(cut, cut_lam, mixup_lam).astype(np.float16)
        return lam, {"box": np.where(cut[:, None], box, 0).astype(np.uint16)}

    mixes_8bit: ClassVar[bool] = True

    def paste_box(self, p: Mapping[str, Any]) -> np.ndarray | None:
        return p["box"] if p["box"][2] and p["box"][3] else None

    def mix(self, own: np.ndarray, other: np.ndarray, lam: float, p: Mapping[str, Any]) -> Any:
        if p["box"][2] and p["box"][3]:
            return _paste(own, other, p["box"])
        return Mixup(self.mixup).mix(own, other, lam, p)


# Ops that the kinds allow once per view, and the kind each op class declares.
ONCE = ("crop", "flip", "mix", "resample")


def op_class(name: str, what: str) -> Callable[..., ViewOp]:
    """A registered op by name, or a user's ``pkg.module:Class``."""
    if ":" in name:
        from kdcache.grammar import user_object

        source, _, attr = name.partition(":")
        return user_object(source, attr, f"{what} op {name}", kind="class")
    try:
        return OPS[name]
    except KeyError:
        raise KdcacheError(
            f"{what}: unknown view op {name!r}; choose one of {', '.join(OPS)}, or write "
            "pkg.module:Class for your own"
        ) from None
