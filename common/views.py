"""Views: the exact input one training example sees, as a pure function of where it sits.

A view of sample ``i`` in epoch ``e`` is drawn from a counter-based generator keyed by
``(plan seed, stream, epoch, i)``: no global RNG state, no Python ``hash()``, so the same view
comes out whatever the worker count, world size, batch size or processing order.

Views are sampled a whole unit (tar shard) at a time because mixing partners are drawn inside the
unit, so a streaming reader holds both images. The realised parameters are returned already in
the dtypes the cache stores them in (``lam`` as float16 included): the teacher's render at
precompute and the student's replay from the cache therefore start from the very same numbers.

Boxes are ``(top, left, height, width)`` in pixels of the decoded source image, the argument
order of ``torchvision.transforms.v2.functional.resized_crop``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdcache.errors import KdcacheError

# Streams: the student's (and a consistent teacher's) views, and the second stream that
# `independent` mode gives the teacher.
STUDENT_STREAM = 0
INDEPENDENT_STREAM = 1

_GAMMA_INT = 0x9E3779B97F4A7C15  # golden-ratio increment of splitmix64
_GAMMA = np.uint64(_GAMMA_INT)
_INCEPTION_TRIES = 10  # as torchvision's RandomResizedCrop
MIN_IMAGE_SIZE = 8  # px: the smallest side views render to (the built-in nets need 8)

# Draw slots per view. Fixed offsets (not "the next draw") keep every parameter's draw
# independent of how many attempts another parameter needed.
_OWN, _PARTNER = 0, 32  # base slot of the own crop and of the partner's crop
_CROP_POS = 2 * _INCEPTION_TRIES  # two draws per attempt (area, log aspect), then y and x
_FLIP = _CROP_POS + 2
_PICK_PARTNER, _LAM = 64, 65


@dataclass(frozen=True)
class ViewSpec:
    """How views are drawn. Presets (Beyer et al. 2022): see :data:`PRESETS`.

    ``crop``: ``"inception"`` (random area/aspect box, as RandomResizedCrop) or ``"center"``
    (a centred square of ``crop_fraction`` x the short side, like resize-256/crop-224).
    ``mix``: ``"none"`` or ``"mixup"`` (partner in the same unit, ``lam ~ U(0,1)``, the sample
    keeps weight ``max(lam, 1 - lam)``).
    """

    name: str
    crop: str = "inception"
    min_area: float = 0.05
    max_area: float = 1.0
    min_aspect: float = 3 / 4
    max_aspect: float = 4 / 3
    flip: bool = True
    mix: str = "none"
    crop_fraction: float = 0.875

    @property
    def mixes(self) -> bool:
        return self.mix != "none"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViewSpec:
        return cls(**d)


PRESETS: dict[str, ViewSpec] = {
    "function_matching": ViewSpec("function_matching", mix="mixup"),
    "consistent": ViewSpec("consistent"),
    "center": ViewSpec("center", crop="center", flip=False),
}


def get_spec(name: str) -> ViewSpec:
    """The preset called ``name``; a :class:`KdcacheError` listing the presets otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KdcacheError(
            f"unknown view preset {name!r}; choose one of {', '.join(PRESETS)} with --views"
        ) from None


@dataclass
class Views:
    """Realised views of ``n`` rows, in cache dtypes.

    seed: (n,) uint16        low 16 bits of the view's generator key (a replay check)
    box: (n, 4) uint16       own crop (top, left, height, width), source pixels
    flip: (n,) bool          own horizontal flip
    partner: (n,) int64      global index of the mixing partner, -1 when not mixed
    partner_box: (n, 4) uint16, partner_flip: (n,) bool   the partner's own crop and flip
    lam: (n,) float16        weight of the sample's own image (1.0 when not mixed)
    """

    seed: np.ndarray
    box: np.ndarray
    flip: np.ndarray
    partner: np.ndarray
    partner_box: np.ndarray
    partner_flip: np.ndarray
    lam: np.ndarray

    def __len__(self) -> int:
        return len(self.seed)

    def take(self, rows: np.ndarray | slice) -> Views:
        return Views(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})


# -- counter-based generator ---------------------------------------------------------------


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective avalanche on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _times_gamma(n: int) -> np.uint64:
    """``n * gamma`` modulo 2**64, computed on Python ints (numpy scalars warn on wrap-around)."""
    return np.uint64((n * _GAMMA_INT) % 2**64)


def view_keys(plan_seed: int, epoch: int, indices: np.ndarray, stream: int = 0) -> np.ndarray:
    """Generator keys of the views of ``indices`` (N,) int -> (N,) uint64."""
    head = np.array([(plan_seed + stream * _GAMMA_INT) % 2**64], dtype=np.uint64)
    head = _mix64(_mix64(head) + _times_gamma(epoch))
    return _mix64(head + np.asarray(indices, dtype=np.uint64) * _GAMMA)


def _uniform(keys: np.ndarray, slot: int) -> np.ndarray:
    """Draw number ``slot`` of each key: (N,) float64 uniform on [0, 1)."""
    bits = _mix64(keys + _times_gamma(slot + 1)) >> np.uint64(11)
    return bits.astype(np.float64) * (1.0 / 2**53)


# -- crops --------------------------------------------------------------------------------


def _inception_boxes(spec: ViewSpec, keys: np.ndarray, base: int, hw: np.ndarray) -> np.ndarray:
    """RandomResizedCrop boxes, vectorised: (N,) keys, (N, 2) (h, w) -> (N, 4) int64."""
    h_img, w_img = hw[:, 0].astype(np.float64), hw[:, 1].astype(np.float64)
    n = len(keys)
    box_h, box_w = np.zeros(n), np.zeros(n)
    done = np.zeros(n, dtype=bool)
    log_lo, log_hi = math.log(spec.min_aspect), math.log(spec.max_aspect)
    for t in range(_INCEPTION_TRIES):
        area = (
            h_img
            * w_img
            * (spec.min_area + (spec.max_area - spec.min_area) * _uniform(keys, base + 2 * t))
        )
        aspect = np.exp(log_lo + (log_hi - log_lo) * _uniform(keys, base + 2 * t + 1))
        w = np.round(np.sqrt(area * aspect))
        h = np.round(np.sqrt(area / aspect))
        ok = ~done & (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
        box_h[ok], box_w[ok] = h[ok], w[ok]
        done |= ok
    # Fallback, as torchvision: the whole image, aspect clamped into range.
    ratio = w_img / np.maximum(h_img, 1)
    fb_w = np.where(
        ratio < spec.min_aspect,
        w_img,
        np.where(ratio > spec.max_aspect, np.round(h_img * spec.max_aspect), w_img),
    )
    fb_h = np.where(ratio < spec.min_aspect, np.round(w_img / spec.min_aspect), h_img)
    box_h = np.where(done, box_h, fb_h)
    box_w = np.where(done, box_w, fb_w)
    top = np.floor(_uniform(keys, base + _CROP_POS) * (h_img - box_h + 1))
    left = np.floor(_uniform(keys, base + _CROP_POS + 1) * (w_img - box_w + 1))
    return np.stack([top, left, box_h, box_w], axis=1).astype(np.int64)


def _center_boxes(spec: ViewSpec, hw: np.ndarray) -> np.ndarray:
    """A centred square of ``crop_fraction`` x the short side: (N, 2) -> (N, 4) int64."""
    side = np.maximum(np.round(hw.min(axis=1) * spec.crop_fraction), 1).astype(np.int64)
    top = (hw[:, 0] - side) // 2
    left = (hw[:, 1] - side) // 2
    return np.stack([top, left, side, side], axis=1)


def _boxes(spec: ViewSpec, keys: np.ndarray, base: int, hw: np.ndarray) -> np.ndarray:
    if spec.crop == "center":
        return _center_boxes(spec, hw)
    if spec.crop == "inception":
        return _inception_boxes(spec, keys, base, hw)
    raise KdcacheError(f"unknown crop {spec.crop!r} in view spec {spec.name!r}")


def _flips(spec: ViewSpec, keys: np.ndarray, base: int) -> np.ndarray:
    if not spec.flip:
        return np.zeros(len(keys), dtype=bool)
    return _uniform(keys, base + _FLIP) < 0.5


# -- unit views ---------------------------------------------------------------------------


def sample_unit_views(
    spec: ViewSpec,
    plan_seed: int,
    epoch: int,
    unit_start: int,
    sizes: np.ndarray,
    stream: int = STUDENT_STREAM,
) -> Views:
    """The views of every sample of one unit in one epoch.

    unit_start: global index of the unit's first sample.
    sizes: (n, 2) int (height, width) of each decoded image; (0, 0) marks an unreadable sample,
        which gets an empty box and is never chosen as a mixing partner.
    """
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    n = len(sizes)
    index = unit_start + np.arange(n, dtype=np.int64)
    keys = view_keys(plan_seed, epoch, index, stream)
    valid = (sizes > 0).all(axis=1)
    box = np.where(valid[:, None], _boxes(spec, keys, _OWN, np.maximum(sizes, 1)), 0)
    views = Views(
        seed=(keys & np.uint64(0xFFFF)).astype(np.uint16),
        box=box.astype(np.uint16),
        flip=_flips(spec, keys, _OWN) & valid,
        partner=np.full(n, -1, dtype=np.int64),
        partner_box=np.zeros((n, 4), dtype=np.uint16),
        partner_flip=np.zeros(n, dtype=bool),
        lam=np.ones(n, dtype=np.float16),
    )
    if spec.mixes and n > 1:
        _add_partners(spec, views, keys, sizes, valid, unit_start)
    return views


def _add_partners(
    spec: ViewSpec,
    views: Views,
    keys: np.ndarray,
    sizes: np.ndarray,
    valid: np.ndarray,
    unit_start: int,
) -> None:
    """Mixup inside the unit: a partner other than the sample itself, drawn uniformly."""
    n = len(keys)
    local = np.arange(n)
    partner = (local + 1 + np.floor(_uniform(keys, _PICK_PARTNER) * (n - 1)).astype(np.int64)) % n
    mixed = valid & valid[partner]
    lam = _uniform(keys, _LAM)
    own_weight = np.maximum(lam, 1.0 - lam).astype(np.float16)
    partner_box = _boxes(spec, keys, _PARTNER, np.maximum(sizes[partner], 1))
    views.partner = np.where(mixed, partner + unit_start, -1)
    views.partner_box = np.where(mixed[:, None], partner_box, 0).astype(np.uint16)
    views.partner_flip = _flips(spec, keys, _PARTNER) & mixed
    views.lam = np.where(mixed, own_weight, np.float16(1.0)).astype(np.float16)
