"""Views are a pure function of (plan seed, epoch, dataset index, view spec)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from kdcache.errors import KdcacheError
from kdcache.views import (
    BASE_FIELDS,
    INDEPENDENT_STREAM,
    PRESETS,
    STUDENT_STREAM,
    Views,
    get_spec,
    sample_unit_views,
    view_keys,
)

FM = PRESETS["function_matching"]
CONSISTENT = PRESETS["consistent"]
CENTER = PRESETS["center"]

# A unit of 9 images of varied sizes: tall, wide, square, tiny, large.
SIZES = np.array(
    [(20, 28), (33, 24), (40, 40), (17, 31), (26, 26), (36, 22), (24, 30), (8, 9), (300, 400)]
)
FIELDS = list(BASE_FIELDS)


def assert_views_equal(a: Views, b: Views) -> None:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        assert np.array_equal(x, y), name
    assert a.ops.keys() == b.ops.keys()
    for name in a.ops:
        assert a.ops[name].dtype == b.ops[name].dtype, name
        assert np.array_equal(a.ops[name], b.ops[name]), name


def random_sizes(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(1, 120, n), rng.integers(1, 120, n)], axis=1)


def test_dtypes_are_the_cache_dtypes():
    v = sample_unit_views(FM, 0, 0, 0, SIZES)
    assert len(v) == len(SIZES)
    assert v.seed.dtype == np.uint16
    assert v.box.dtype == np.uint16 and v.box.shape == (len(SIZES), 4)
    assert v.flip.dtype == bool and v.partner_flip.dtype == bool
    assert v.partner.dtype == np.int64
    assert v.partner_box.dtype == np.uint16 and v.partner_box.shape == (len(SIZES), 4)
    assert v.lam.dtype == np.float16


@pytest.mark.parametrize("name", list(PRESETS))
def test_same_inputs_same_views(name):
    spec = get_spec(name)
    a = sample_unit_views(spec, 7, 3, 100, SIZES)
    b = sample_unit_views(spec, 7, 3, 100, SIZES.copy())
    assert_views_equal(a, b)


def test_views_ignore_global_rng_state():
    np.random.seed(1)
    random.seed(1)
    a = sample_unit_views(FM, 5, 2, 10, SIZES)
    np.random.seed(2)
    random.seed(2)
    np.random.rand(100)
    b = sample_unit_views(FM, 5, 2, 10, SIZES)
    assert_views_equal(a, b)


def test_different_epoch_seed_or_index_gives_different_views():
    base = sample_unit_views(FM, 0, 0, 0, SIZES)
    for other in (
        sample_unit_views(FM, 0, 1, 0, SIZES),  # epoch
        sample_unit_views(FM, 1, 0, 0, SIZES),  # plan seed
        sample_unit_views(FM, 0, 0, 9, SIZES),  # position in the data set
    ):
        assert not np.array_equal(base.seed, other.seed)
        assert not np.array_equal(base.box, other.box)
        assert not np.array_equal(base.lam, other.lam)


def test_seed_field_is_low_bits_of_the_view_key():
    v = sample_unit_views(FM, 11, 4, 50, SIZES)
    keys = view_keys(11, 4, 50 + np.arange(len(SIZES)))
    assert np.array_equal(v.seed, (keys & np.uint64(0xFFFF)).astype(np.uint16))


def test_view_keys_are_distinct_over_indices_epochs_streams():
    idx = np.arange(5000)
    keys = np.concatenate(
        [view_keys(0, e, idx, s) for e in range(4) for s in (0, 1)] + [view_keys(1, 0, idx)]
    )
    assert len(np.unique(keys)) == len(keys)


def test_independent_of_call_order_and_other_units():
    units = [(0, SIZES[:4]), (4, SIZES[4:7]), (7, SIZES[7:])]
    forward = [sample_unit_views(FM, 3, 1, start, s) for start, s in units]
    # other units, other epochs and other seeds computed in between, in reverse order
    backward = []
    for start, s in reversed(units):
        sample_unit_views(FM, 99, 5, 1000, random_sizes(start, 20))
        sample_unit_views(CONSISTENT, 3, 2, start, s)
        backward.append(sample_unit_views(FM, 3, 1, start, s))
    for a, b in zip(forward, reversed(backward), strict=True):
        assert_views_equal(a, b)


def test_own_crop_does_not_depend_on_other_samples():
    """A sample's own box and flip depend only on its key and its own image size."""
    a = sample_unit_views(FM, 2, 0, 0, SIZES)
    sizes = SIZES.copy()
    sizes[[0, 2, 5]] = [(99, 77), (0, 0), (12, 50)]
    b = sample_unit_views(FM, 2, 0, 0, sizes)
    keep = np.setdiff1d(np.arange(len(SIZES)), [0, 2, 5])
    assert np.array_equal(a.box[keep], b.box[keep])
    assert np.array_equal(a.flip[keep], b.flip[keep])
    assert np.array_equal(a.seed, b.seed)


def test_flip_does_not_depend_on_image_size():
    a = sample_unit_views(CONSISTENT, 4, 1, 0, random_sizes(0, 200))
    b = sample_unit_views(CONSISTENT, 4, 1, 0, random_sizes(1, 200))
    assert np.array_equal(a.flip, b.flip)
    assert 0.3 < a.flip.mean() < 0.7


def _assert_inside(box: np.ndarray, sizes: np.ndarray) -> None:
    box = box.astype(np.int64)
    top, left, h, w = box.T
    assert (h >= 1).all() and (w >= 1).all()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= sizes[:, 0]).all()
    assert (left + w <= sizes[:, 1]).all()


@pytest.mark.parametrize("name", list(PRESETS))
def test_boxes_lie_inside_the_image(name):
    spec = get_spec(name)
    for epoch in range(5):
        sizes = random_sizes(epoch, 300)
        v = sample_unit_views(spec, 0, epoch, 0, sizes)
        _assert_inside(v.box, sizes)
        mixed = v.partner >= 0
        if spec.mixes:
            assert mixed.all()
            _assert_inside(v.partner_box[mixed], sizes[v.partner[mixed]])


def test_inception_area_and_aspect_within_spec():
    """On large images (rounding negligible) every box's area fraction and aspect are in range;
    on small ones they are within what rounding each side to whole pixels allows."""
    spec = FM
    rng = np.random.default_rng(0)
    sizes = np.stack([rng.integers(200, 500, 400), rng.integers(200, 500, 400)], axis=1)
    sizes = sizes[(sizes[:, 1] / sizes[:, 0] >= 3 / 4) & (sizes[:, 1] / sizes[:, 0] <= 4 / 3)]
    for epoch in range(3):
        v = sample_unit_views(spec, 1, epoch, 0, sizes)
        for box, size in ((v.box, sizes), (v.partner_box, sizes[v.partner])):
            h, w = box[:, 2].astype(float), box[:, 3].astype(float)
            area = h * w / (size[:, 0] * size[:, 1])
            aspect = w / h
            # integer rounding of sqrt(area*aspect) and sqrt(area/aspect): +-0.5 px per side
            lo_area = (w - 0.5) * (h - 0.5) / (size[:, 0] * size[:, 1])
            hi_area = (w + 0.5) * (h + 0.5) / (size[:, 0] * size[:, 1])
            assert (hi_area >= spec.ops[0].min_area).all() and (
                lo_area <= spec.ops[0].max_area
            ).all()
            assert ((w + 0.5) / (h - 0.5) >= spec.ops[0].min_aspect).all()
            assert ((w - 0.5) / (h + 0.5) <= spec.ops[0].max_aspect).all()
            assert area.min() < 0.2 and area.max() > 0.8  # the range is actually used
            assert aspect.min() < 0.85 and aspect.max() > 1.2


def test_inception_boxes_on_small_images_within_rounding():
    spec = CONSISTENT
    for epoch in range(4):
        sizes = random_sizes(100 + epoch, 300)
        sizes = np.maximum(sizes, 4)
        v = sample_unit_views(spec, 0, epoch, 0, sizes)
        h, w = v.box[:, 2].astype(float), v.box[:, 3].astype(float)
        hw = sizes[:, 0] * sizes[:, 1]
        in_range = (sizes[:, 1] / sizes[:, 0] >= 3 / 4) & (sizes[:, 1] / sizes[:, 0] <= 4 / 3)
        # area never above the image; lower bound only when a random crop can succeed
        assert ((w - 0.5) * (h - 0.5) <= spec.ops[0].max_area * hw).all()
        assert ((w + 0.5) * (h + 0.5) >= spec.ops[0].min_area * hw)[in_range].all()
        assert ((w + 0.5) / (h - 0.5) >= spec.ops[0].min_aspect - 1e-9).all()
        assert ((w - 0.5) / (h + 0.5) <= spec.ops[0].max_aspect + 1e-9).all()


def test_center_is_deterministic_without_flips_or_partners():
    a = sample_unit_views(CENTER, 0, 0, 0, SIZES)
    b = sample_unit_views(CENTER, 123, 9, 0, SIZES)
    assert np.array_equal(a.box, b.box)
    assert not a.flip.any() and not a.partner_flip.any()
    assert (a.partner == -1).all()
    assert (a.lam == 1).all()
    assert not a.partner_box.any()
    side = np.maximum(np.round(SIZES.min(axis=1) * CENTER.ops[0].fraction), 1)
    assert np.array_equal(a.box[:, 2], side) and np.array_equal(a.box[:, 3], side)
    # centred: the margins on both sides differ by at most one pixel
    top, left = a.box[:, 0].astype(int), a.box[:, 1].astype(int)
    assert (np.abs((SIZES[:, 0] - side - top) - top) <= 1).all()
    assert (np.abs((SIZES[:, 1] - side - left) - left) <= 1).all()


def test_function_matching_partners():
    start = 1000
    for epoch in range(10):
        sizes = random_sizes(epoch, 7)
        v = sample_unit_views(FM, 0, epoch, start, sizes)
        own = start + np.arange(7)
        assert ((v.partner >= start) & (v.partner < start + 7)).all()  # inside the unit
        assert (v.partner != own).all()  # never itself
        assert v.lam.dtype == np.float16
        assert ((v.lam >= 0.5) & (v.lam <= 1.0)).all()
    many = sample_unit_views(FM, 0, 0, 0, random_sizes(0, 500))
    assert many.lam.min() < 0.6 and many.lam.max() > 0.9  # lam ~ U(0,1) folded onto [0.5, 1]
    assert abs(float(many.lam.astype(np.float64).mean()) - 0.75) < 0.03
    counts = np.bincount(many.partner, minlength=500)
    assert counts.max() < 10  # partners are spread, not all the same sample


def test_function_matching_single_sample_unit_is_not_mixed():
    v = sample_unit_views(FM, 0, 0, 5, np.array([[30, 30]]))
    assert v.partner.tolist() == [-1] and v.lam.tolist() == [1.0]


def test_consistent_has_no_partners():
    v = sample_unit_views(CONSISTENT, 0, 0, 0, random_sizes(3, 50))
    assert (v.partner == -1).all()
    assert (v.lam == 1).all()
    assert not v.partner_box.any() and not v.partner_flip.any()
    assert v.flip.any()


@pytest.mark.parametrize("name", list(PRESETS))
def test_unreadable_samples_get_empty_boxes_and_are_never_partners(name):
    spec = get_spec(name)
    sizes = random_sizes(9, 12)
    bad = np.array([1, 4, 5, 11])
    sizes[bad] = 0
    for epoch in range(20):
        v = sample_unit_views(spec, 0, epoch, 100, sizes)
        assert not v.box[bad].any()
        assert not v.flip[bad].any()
        assert (v.partner[bad] == -1).all()
        assert (v.lam[bad] == 1).all()
        assert not np.isin(v.partner, 100 + bad).any()
        good = np.setdiff1d(np.arange(12), bad)
        assert (v.box[good, 2] > 0).all()
        if spec.mixes:
            mixed = v.partner >= 0
            assert not mixed[bad].any()
            assert not v.partner_box[~mixed].any() and (v.lam[~mixed] == 1).all()


def test_independent_stream_differs():
    a = sample_unit_views(FM, 0, 0, 0, SIZES, stream=STUDENT_STREAM)
    b = sample_unit_views(FM, 0, 0, 0, SIZES, stream=INDEPENDENT_STREAM)
    assert not np.array_equal(a.seed, b.seed)
    assert not np.array_equal(a.box, b.box)
    assert_views_equal(b, sample_unit_views(FM, 0, 0, 0, SIZES, stream=INDEPENDENT_STREAM))


def test_unknown_preset_is_a_kdcache_error():
    with pytest.raises(KdcacheError, match="function_matching"):
        get_spec("nope")


def test_spec_round_trips_through_dict():
    for spec in PRESETS.values():
        assert type(spec).from_dict(spec.to_dict()) == spec
    assert math.isclose(FM.ops[0].min_area, 0.05) and FM.mixes and not CONSISTENT.mixes
