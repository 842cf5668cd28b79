"""View ops: the op language, the presets unchanged, each op's own stream, the ops against
timm's and torchvision's, and exact replay of a pipeline of all of them through a cache."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from conftest import (
    NUM_CLASSES,
    TEACHER,
    TEACHER_SIZE,
    assert_teacher_reproduces,
    cache_config,
    model_input,
)

from kdcache import schema, view_ops
from kdcache.cache import precompute
from kdcache.cache.inspect import summary
from kdcache.cache.verify import verify
from kdcache.data.index import load_index
from kdcache.errors import KdcacheError
from kdcache.models import create_model
from kdcache.render import render_raw, render_views
from kdcache.store import open_cache
from kdcache.train.batches import EpochData, TrainBatches
from kdcache.train.order import epoch_order, rank_batches
from kdcache.views import BASE_FIELDS, PRESETS, ViewSpec, get_spec, sample_unit_views

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FULL = (
    "inception_crop(min_area=0.08)|flip|randaugment(2, 9)|color_jitter(0.4, 0.4, 0.4, 0.1)"
    "|mix(mixup=0.8, cutmix=1.0)|erase(p=0.5, mode=pixel)|interpolation(teacher=bicubic)"
)


def unit_sizes(n: int = 257, seed: int = 2024) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sizes = np.stack([rng.integers(1, 400, n), rng.integers(1, 400, n)], axis=1)
    sizes[::17] = 0  # unreadable samples
    return sizes


# -- the language --------------------------------------------------------------------------


def test_presets_are_pipelines_of_the_language():
    assert PRESETS["function_matching"].spec == "inception_crop|flip|mixup"
    assert PRESETS["consistent"].spec == "inception_crop|flip"
    assert PRESETS["center"].spec == "center_crop"
    assert get_spec("inception_crop|flip|mixup(alpha=1.0)").same_views(PRESETS["function_matching"])
    spec = get_spec("inception_crop(0.08)|randaugment(3, m=7)|erase(mode=pixel)")
    assert spec.ops[0].min_area == 0.08 and (spec.ops[1].n, spec.ops[1].m) == (3, 7)
    assert spec.spec == "inception_crop(min_area=0.08)|randaugment(n=3, m=7)|erase(mode='pixel')"
    assert ViewSpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict()["ops"] == {"inception_crop": 1, "randaugment": 1, "erase": 1}


@pytest.mark.parametrize(
    "text, needle",
    [
        ("flip|inception_crop", "must start with a crop"),
        ("inception_crop|flip|flip", "2 flip ops; a view has one"),
        ("inception_crop|mixup|randaugment", "randaugment works on 8-bit images: put it before"),
        ("inception_crop|cutmix|mixup", "2 mix ops"),
        ("inception_crop|blur", "unknown view op 'blur'; choose one of inception_crop"),
        ("inception_crop(min_area=2)", "cannot be made (needs 0 < min_area <= max_area <= 1)"),
        ("inception_crop|erase(mode=noise)", "mode is const or pixel"),
        ("center_crop(0.5, 0.2)", "takes at most 1 arguments without a key"),
        ("nope", "unknown view preset or op 'nope'"),
    ],
)
def test_a_bad_spec_says_what_is_wrong(text, needle):
    with pytest.raises(KdcacheError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        get_spec(text)


# -- the presets are unchanged -------------------------------------------------------------

# sha256 (first 32 hex digits) of the base view arrays of three epochs of a 257-sample unit,
# and of a render of 40 images at 24 px, as the code before view ops (a01e062) made them.
GOLDEN_VIEWS = {
    "function_matching": "d0a353b32c94ea002a78b6a8c083c06e",
    "consistent": "e493cd3d2f94c9ba5083a3e5f4c2a89c",
    "center": "a92cf50e4f6fe8d341480d24ef65e1bf",
}
GOLDEN_RENDER = {
    "function_matching": "b7255945f78afe85b3eda883f78e674b",
    "consistent": "d198a950c3959d5151c33d324dace77a",
    "center": "95864f344ad60d09b84cd1413c10bde7",
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_views_and_renders_are_byte_identical_to_before(name):
    h = hashlib.sha256()
    for epoch in range(3):
        v = sample_unit_views(PRESETS[name], 11, epoch, 5000, unit_sizes())
        assert v.ops == {}  # the presets add no row arrays
        for f in BASE_FIELDS:
            h.update(np.ascontiguousarray(getattr(v, f)).tobytes())
    assert h.hexdigest()[:32] == GOLDEN_VIEWS[name]
    rng = np.random.default_rng(5)
    images = {
        5000 + i: rng.integers(
            0, 256, (int(rng.integers(20, 90)), int(rng.integers(20, 90)), 3), dtype=np.uint8
        )
        for i in range(40)
    }
    sizes = np.array([im.shape[:2] for im in images.values()])
    views = sample_unit_views(PRESETS[name], 3, 1, 5000, sizes)
    raw = render_raw(views, np.arange(5000, 5040), images, 24)
    assert hashlib.sha256(raw.tobytes()).hexdigest()[:32] == GOLDEN_RENDER[name]


def test_an_old_caches_view_dict_reads_as_its_preset():
    old = {
        "name": "function_matching",
        "crop": "inception",
        "min_area": 0.05,
        "max_area": 1.0,
        "min_aspect": 0.75,
        "max_aspect": 4 / 3,
        "flip": True,
        "mix": "mixup",
        "crop_fraction": 0.875,
    }
    assert ViewSpec.from_dict(old) == PRESETS["function_matching"]
    center = {**old, "name": "center", "crop": "center", "flip": False, "mix": "none"}
    assert ViewSpec.from_dict(center) == PRESETS["center"]
    assert schema.row_fields(old) == schema.ROW_FIELDS  # and its arrays are the ones it has


# -- streams -------------------------------------------------------------------------------


def test_each_op_draws_from_its_own_stream():
    """An op's draws depend on the view and its position only: a mix op whose Beta needs a
    variable number of draws (alpha != 1) leaves the crop, flip and erasing unchanged, and the
    partner's crop is the preset's."""
    sizes = unit_sizes(64)
    a = sample_unit_views(get_spec("inception_crop|flip|mixup|erase(p=0.5)"), 0, 2, 0, sizes)
    b = sample_unit_views(
        get_spec("inception_crop|flip|mixup(alpha=0.3)|erase(p=0.5)"), 0, 2, 0, sizes
    )
    fm = sample_unit_views(PRESETS["function_matching"], 0, 2, 0, sizes)
    for name in ("box", "flip", "partner", "partner_box", "partner_flip"):
        assert np.array_equal(getattr(a, name), getattr(fm, name)), name
        assert np.array_equal(getattr(b, name), getattr(fm, name)), name
    assert np.array_equal(a.lam, fm.lam) and not np.array_equal(a.lam, b.lam)
    assert np.array_equal(a.ops["erase_box"], b.ops["erase_box"])
    assert a.ops["erase_box"][:, 2].any()  # some rows are erased


def test_views_do_not_depend_on_how_a_unit_is_cut():
    spec = get_spec(FULL)
    sizes = unit_sizes(120)
    whole = sample_unit_views(spec, 4, 1, 300, sizes)
    again = sample_unit_views(spec, 4, 1, 300, sizes)
    rows = np.array([3, 50, 119])
    part = whole.take(rows)
    for name in BASE_FIELDS:
        assert np.array_equal(getattr(again, name), getattr(whole, name))
        assert np.array_equal(getattr(part, name), getattr(whole, name)[rows])
    assert whole.ops.keys() == set(n for n, *_ in spec.op_fields())
    for name, values in whole.ops.items():
        assert np.array_equal(again.ops[name], values)
        assert values.dtype == np.dtype(dict((n, f) for n, _, _, f in spec.op_fields())[name].dtype)


# -- each op against its reference ---------------------------------------------------------


def test_randaugment_draws_follow_timms_policy():
    """rand-m9-mstd0.5: ops uniform over timm's 15 (with replacement), each applied half the
    time, magnitudes N(9, 0.5) clipped to [0, 10], signs and filters half and half."""
    from kdcache.randaugment import OPS

    v = sample_unit_views(
        get_spec("center_crop|randaugment(2, 9)"), 0, 0, 0, np.full((4000, 2), 32)
    )
    op, mag = v.ops["randaugment_op"], v.ops["randaugment_mag"].astype(np.float64)
    applied = op != 255
    assert abs(applied.mean() - 0.5) < 0.02
    which = op[applied] & 0xF
    counts = np.bincount(which, minlength=len(OPS))
    assert len(counts) == len(OPS) and counts.min() > 0.8 * counts.mean()
    assert abs(mag[applied].mean() - 9.0) < 0.03 and abs(mag[applied].std() - 0.5) < 0.05
    assert mag.max() <= 10.0 and mag[applied].min() >= 7.0
    assert abs((op[applied] >> 4 & 1).mean() - 0.5) < 0.02
    assert abs((op[applied] >> 5 & 1).mean() - 0.5) < 0.02


def _timm_erase_boxes(n: int, size: int) -> np.ndarray:
    """timm's RandomErasing (probability 1, const mode) on n images: (n, 2) area fraction and
    aspect (w / h) of the box it erased."""
    from timm.data.random_erasing import RandomErasing

    torch.manual_seed(0)
    import random

    random.seed(0)
    erase = RandomErasing(probability=1.0, mode="const", device="cpu")
    out = []
    for _ in range(n):
        x = torch.ones(3, size, size)
        erase(x)
        zero = (x[0] == 0).nonzero()
        h = int(zero[:, 0].max() - zero[:, 0].min() + 1)
        w = int(zero[:, 1].max() - zero[:, 1].min() + 1)
        out.append((h * w / size**2, w / h))
    return np.array(out)


def test_erase_box_sampling_follows_timm():
    """Area and aspect of the erased box at 224 px: our draws against timm's own
    RandomErasing, a two-sample Kolmogorov-Smirnov test at fixed seeds (so it cannot flake)."""
    pytest.importorskip("timm")
    stats = pytest.importorskip("scipy.stats")
    size, n = 224, 2000
    v = sample_unit_views(get_spec("center_crop|erase(p=1)"), 0, 0, 0, np.full((n, 2), size))
    ours = []
    for box in v.ops["erase_box"]:
        y0, y1, x0, x1 = view_ops.rel_to_px(box, size)
        ours.append(((y1 - y0) * (x1 - x0) / size**2, (x1 - x0) / (y1 - y0)))
    ours = np.array(ours)
    theirs = _timm_erase_boxes(n, size)
    for column in (0, 1):
        assert stats.ks_2samp(ours[:, column], theirs[:, column]).pvalue > 0.01, column
    assert ours[:, 0].min() >= 0.019 and ours[:, 0].max() <= 1 / 3 + 0.01


def test_cutmix_lam_follows_timm():
    """CutMix's corrected lam (1 - box area) at 224 px against timm's rand_bbox with lam ~
    Beta(1, 1): the same distribution (KS, fixed seeds)."""
    pytest.importorskip("timm")
    stats = pytest.importorskip("scipy.stats")
    from timm.data.mixup import rand_bbox

    size, n = 224, 2000
    v = sample_unit_views(get_spec("center_crop|cutmix"), 0, 0, 0, np.full((n, 2), size))
    ours = v.lam.astype(np.float64)
    np.random.seed(0)
    theirs = []
    for _ in range(n):
        lam = np.random.beta(1.0, 1.0)
        y0, y1, x0, x1 = rand_bbox((size, size), lam)
        theirs.append(1 - (y1 - y0) * (x1 - x0) / size**2)
    assert stats.ks_2samp(ours, np.array(theirs)).pvalue > 0.01
    # the stored lam is the stored box's: 1 - its area, to float16
    box = v.ops["cutmix_box"].astype(np.float64) / view_ops.REL
    assert np.allclose(ours, 1 - box[:, 2] * box[:, 3], atol=1e-3)


def test_mix_chooses_cutmix_at_the_switch_rate():
    v = sample_unit_views(get_spec("center_crop|mix(switch=0.3)"), 0, 0, 0, np.full((3000, 2), 40))
    cut = v.ops["mix_box"][:, 2] > 0
    assert abs(cut.mean() - 0.3) < 0.03
    assert (v.lam[~cut] >= 0.5).all()  # the mixup rows keep max(lam, 1 - lam)


def test_color_jitter_is_torchvisions(monkeypatch):
    """For its drawn factors and order, color_jitter gives torchvision's ColorJitter's image."""
    from PIL import Image
    from torchvision.transforms import ColorJitter

    op = view_ops.ColorJitter(0.4, 0.4, 0.4, 0.1)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)
    v = sample_unit_views(
        get_spec("center_crop|color_jitter(0.4, 0.4, 0.4, 0.1)"), 0, 0, 0, np.full((20, 2), 30)
    )
    jitter = ColorJitter(0.4, 0.4, 0.4, 0.1)
    for row in range(20):
        p = v.params(row, 1)
        order = view_ops._PERMUTATIONS[int(p["order"])]
        f = [float(x) for x in p["factors"]]
        monkeypatch.setattr(
            ColorJitter, "get_params", staticmethod(lambda *a, o=order, f=f: (torch.tensor(o), *f))
        )
        expected = np.asarray(jitter(Image.fromarray(image)))
        assert np.array_equal(op.apply(image, p), expected), row


def test_erase_fills_the_same_region_at_every_size():
    """Relative boxes: the teacher at 32 px and the student at 16 px erase the same region."""
    op = view_ops.Erase(p=1.0)
    p = {"box": np.array([16384, 32768, 32768, 16384], dtype=np.uint16)}
    for size in (16, 32, 64):
        x = op.apply(np.full((size, size, 3), 255, dtype=np.uint8), p)
        erased = (x != 255).any(axis=2)
        rows, cols = np.nonzero(erased)
        assert (rows.min(), rows.max() + 1) == (size // 4, 3 * size // 4)
        assert (cols.min(), cols.max() + 1) == (size // 2, 3 * size // 4)
        assert (x[erased] == view_ops.MEAN_PIXEL).all()


# -- exact replay through a cache ----------------------------------------------------------


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory, train_dir) -> str:
    out = str(tmp_path_factory.mktemp("ops") / "full.zarr")
    result = precompute(cache_config(train_dir, out, views=FULL))
    assert result["bad_rows"] == 0
    return out


def test_a_pipeline_of_every_op_replays_exactly(full_cache, train_dir):
    """The trainer's pixels are the teacher's input bit for bit (re-running the teacher on
    them gives the stored top-k), at the teacher's bicubic filter."""
    cache, index = open_cache(full_cache), load_index(train_dir)
    spec = cache.spec
    assert spec.same_views(get_spec(FULL)) and cache.meta["views"]["spec"] == get_spec(FULL).spec
    assert {f.name for f in cache.row_fields} >= {"randaugment_op", "partner_randaugment_mag",
                                                   "mix_box", "erase_box", "erase_noise"}  # fmt: skip
    teacher = create_model(TEACHER, NUM_CLASSES, seed=0).eval()
    agree = total = 0
    for epoch in range(cache.epochs):
        batches = rank_batches(epoch_order(index.counts, 0, epoch, 2), 8)
        data = EpochData(
            index, batches, epoch, TEACHER_SIZE, spec, cache.plan_seed, cache=cache,
            cache_epoch=epoch, teacher_image_size=TEACHER_SIZE,
        )  # fmt: skip
        dataset = TrainBatches(data)
        for b in range(len(dataset)):
            item = dataset[b]
            x = model_input(item, "teacher_pixels")
            agree += assert_teacher_reproduces(teacher, x, item, cache.topk)
            total += len(item["rows"])
            # the student (bilinear) and the teacher (bicubic) render differently
            assert not torch.equal(model_input(item), x)
    assert agree == total >= cache.epochs * index.num_samples  # top-1 agreement 1.0


def test_verify_agrees_on_every_op(full_cache, train_dir):
    result = verify(full_cache, train_dir, TEACHER, None, 64, 0, "cpu", batch_size=16, workers=0)
    assert result["top1_agreement"] == 1.0


def test_fresh_views_of_the_pipeline_render_as_the_cache_replays(full_cache, train_dir):
    """Online mode draws the same views the cache stored: the same student pixels."""
    cache, index = open_cache(full_cache), load_index(train_dir)
    batches = rank_batches(epoch_order(index.counts, 0, 1, 2), 8)
    cached = EpochData(
        index, batches, 1, 12, cache.spec, cache.plan_seed, cache=cache, cache_epoch=1
    )
    fresh = EpochData(index, batches, 1, 12, cache.spec, cache.plan_seed)
    for b in range(len(batches)):
        a, f = TrainBatches(cached)[b], TrainBatches(fresh)[b]
        assert torch.equal(a["rows"], f["rows"])
        assert torch.equal(model_input(a), model_input(f))
        assert torch.equal(a["lam"], f["lam"])


def test_inspect_reports_bytes_per_row_by_op(full_cache, tiny_cache):
    by_op = summary(open_cache(full_cache))["bytes_per_row_by_op"]
    assert {"inception_crop", "flip", "randaugment", "color_jitter", "mix", "erase"} <= set(by_op)
    assert {"teacher", "view", "status"} <= set(by_op)
    assert all(v >= 0 for v in by_op.values())
    plain = summary(open_cache(tiny_cache))
    assert plain["view_spec"] == "inception_crop|flip|mixup"
    assert "randaugment" not in plain["bytes_per_row_by_op"]
    assert math.isclose(
        sum(plain["bytes_per_row_by_op"].values()), plain["bytes_per_row"], abs_tol=0.1
    )


def test_a_user_op_is_one_class(tmp_path, monkeypatch):
    """``pkg.module:Class`` with the op interface: it draws, is stored and replays."""
    (tmp_path / "myops.py").write_text(
        "from dataclasses import dataclass\n"
        "from typing import ClassVar\n"
        "import numpy as np\n"
        "from kdcache.view_ops import OpField, ViewOp\n\n"
        "@dataclass(frozen=True)\n"
        "class Darken(ViewOp):\n"
        "    p: float = 0.5\n"
        "    name: ClassVar[str] = 'myops:Darken'\n"
        "    def fields(self):\n"
        "        return (OpField('on', 'bool', False),)\n"
        "    def sample(self, d):\n"
        "        return {'on': d.uniform(0) < self.p}\n"
        "    def apply(self, x, p):\n"
        "        return x // 2 if p['on'] else x\n"
    )
    monkeypatch.chdir(tmp_path)
    spec = get_spec("center_crop|myops:Darken(p=0.5)")
    assert [n for n, *_ in spec.op_fields()] == ["myops_Darken_on"]
    v = sample_unit_views(spec, 0, 0, 0, np.full((50, 2), 20))
    on = v.ops["myops_Darken_on"]
    assert 10 < on.sum() < 40
    images = {i: np.full((20, 20, 3), 200, dtype=np.uint8) for i in range(50)}
    x = render_views(v, np.arange(50), images, 8)
    bright = render_views(sample_unit_views(PRESETS["center"], 0, 0, 0, np.full((50, 2), 20)),
                          np.arange(50), images, 8)  # fmt: skip
    assert torch.equal(x[~torch.from_numpy(on)], bright[~torch.from_numpy(on)])
    assert not torch.equal(x[torch.from_numpy(on)], bright[torch.from_numpy(on)])


def test_a_pipeline_cache_does_not_depend_on_workers_or_batch_size(full_cache, tmp_path, train_dir):
    """The same spec, other workers and batch size: every row array, the ops' included, is the
    same (the views are a function of where a sample sits, not of how the work was cut)."""
    other = str(tmp_path / "other.zarr")
    precompute(cache_config(train_dir, other, views=FULL, workers=1, batch_size=5))
    a, b = open_cache(full_cache), open_cache(other)
    assert a.row_names == b.row_names
    for name in a.row_names:
        assert np.array_equal(a.array(name)[:], b.array(name)[:]), name


@pytest.mark.parametrize(
    "spec",
    [
        "center_crop(0.6)|flip(p=1.0)",
        "inception_crop|mixup(alpha=0.4)",
        "inception_crop|cutmix(alpha=0.5)",
        "inception_crop|flip|mix(switch=0.5)",
        "inception_crop|randaugment(3, 9, mstd=1.0)",
        "inception_crop|color_jitter(0.4, 0.4, 0.4, 0.1)",
        "inception_crop|erase(p=1.0)",
        "inception_crop|erase(p=1.0, mode=pixel)|flip",
        "inception_crop|interpolation(teacher=bicubic, student=bicubic)",
    ],
)
def test_each_op_replays_exactly(spec, tmp_path, train_dir):
    """Per op: the student's pixels replayed from the cache, at the teacher's size and filter,
    give the teacher's stored top-k when the teacher is run on them again."""
    out = str(tmp_path / "op.zarr")
    precompute(cache_config(train_dir, out, views=spec, epochs=1))
    cache, index = open_cache(out), load_index(train_dir)
    teacher = create_model(TEACHER, NUM_CLASSES, seed=0).eval()
    batches = rank_batches(epoch_order(index.counts, 0, 0, 2), 8)
    data = EpochData(index, batches, 0, TEACHER_SIZE, cache.spec, 0, cache=cache, cache_epoch=0)
    dataset = TrainBatches(data)
    for b in range(len(dataset)):
        item = dataset[b]
        assert_teacher_reproduces(teacher, model_input(item), item, cache.topk)


def test_an_unset_teacher_filter_is_resolved_into_the_caches_spec(tmp_path, train_dir):
    """interpolation() leaves each side to its model's convention: the cache records the
    teacher's resolved filter, so its identity names the filter its bytes were made with."""
    out = str(tmp_path / "interp.zarr")
    precompute(cache_config(train_dir, out, views="inception_crop|interpolation", epochs=1))
    spec = open_cache(out).spec
    assert spec.spec == "inception_crop|interpolation(teacher='bilinear')"  # tiny_cnn's
    assert spec.resample("student", "bicubic") == "bicubic"  # the student's stays its own
