"""THE product: the trainer replays exactly the views the teacher saw at precompute.

The teacher's input is rebuilt here independently (tar read with ``tarfile``, images decoded with
PIL, views taken from the raw cache rows) and compared bit for bit with what the trainer's
``TrainBatches`` renders; the same teacher re-run on the trainer's pixels must give back the
cached top-k.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from conftest import NUM_CLASSES, TEACHER, TEACHER_SIZE, model_input
from PIL import Image

from kdcache import schema
from kdcache.data.index import load_index
from kdcache.models import create_model, weights_hash
from kdcache.render import render_views
from kdcache.replay import cached_unit_views, fresh_unit_views
from kdcache.runtime import topk_rows
from kdcache.store import open_cache
from kdcache.train.batches import EpochData, TrainBatches
from kdcache.train.order import epoch_order, rank_batches
from kdcache.views import Views, sample_unit_views


@pytest.fixture(scope="module")
def cache(tiny_cache):
    return open_cache(tiny_cache)


@pytest.fixture(scope="module")
def index(train_dir):
    return load_index(train_dir)


@pytest.fixture(scope="module")
def images(index) -> dict[int, torch.Tensor]:
    """Every training image by global index, decoded straight from the tar files with PIL."""
    out = {}
    for unit in index.units:
        with tarfile.open(unit.url) as tar:
            names = [m.name for m in tar.getmembers() if m.name.endswith(".png")]
            for pos, name in enumerate(names):
                with Image.open(io.BytesIO(tar.extractfile(name).read())) as im:
                    rgb = np.asarray(im.convert("RGB")).copy()
                out[unit.start + pos] = torch.from_numpy(rgb).permute(2, 0, 1)
    assert len(out) == index.num_samples
    return out


@pytest.fixture(scope="module")
def teacher():
    return create_model(TEACHER, NUM_CLASSES, seed=0).eval()


def raw_rows(cache, epoch: int, unit: int) -> dict[str, np.ndarray]:
    """A unit's rows straight from the Zarr arrays (not through the replay code)."""
    start = unit * cache.slot
    count = cache.units[unit].count
    return {f.name: cache.array(f.name)[epoch, start : start + count] for f in schema.ROW_FIELDS}


def views_of(rows: dict[str, np.ndarray]) -> Views:
    views = Views(**{name: rows[name] for name in schema.VIEW_FIELDS})
    views.partner = views.partner.astype(np.int64)
    return views


def train_items(cache, index, epoch: int, size: int, cached: bool = True, batch_size: int = 8):
    order = epoch_order(index.counts, seed=0, epoch=epoch, window=2)
    batches = rank_batches(order, batch_size)
    stream = EpochData(
        index,
        batches,
        epoch,
        size,
        cache.spec,
        cache.plan_seed,
        cache=cache if cached else None,
        cache_epoch=epoch,
    )
    dataset = TrainBatches(stream)
    return [dataset[b] for b in range(len(dataset))]


def teacher_input(cache, index, images, epoch: int, rows: np.ndarray, size: int) -> torch.Tensor:
    """Precompute's teacher input for global ``rows``, from the stored view rows."""
    out = []
    for i in rows:
        unit = index.unit_index_of(int(i))
        pos = int(i) - index.units[unit].start
        views = views_of(raw_rows(cache, epoch, unit)).take(slice(pos, pos + 1))
        out.append(render_views(views, np.array([i]), images, size))
    return torch.cat(out)


def test_cache_layout_and_sample_rows(cache, index):
    assert cache.complete_epochs() == [0, 1]
    assert cache.topk == NUM_CLASSES == cache.num_classes
    assert cache.meta["teacher_image_size"] == TEACHER_SIZE
    assert cache.meta["data_fingerprint"] == index.fingerprint
    assert [u.count for u in cache.units] == index.counts
    for unit, u in enumerate(index.units):
        samples = cache.read_samples(unit)
        assert np.array_equal(samples["key_hash"], index.key_hash[u.start : u.start + u.count])
        assert np.array_equal(samples["label"], index.label[u.start : u.start + u.count])
        assert np.array_equal(samples["size"], index.size[u.start : u.start + u.count])
        for epoch in range(2):
            status = cache.array("status")[epoch, unit * cache.slot : (unit + 1) * cache.slot]
            assert (status[: u.count] == schema.OK).all()
            assert (status[u.count :] == schema.PADDING).all()


def test_stored_views_equal_fresh_views(cache, index):
    for epoch in range(2):
        for unit, u in enumerate(index.units):
            stored = raw_rows(cache, epoch, unit)
            fresh = sample_unit_views(
                cache.spec, cache.plan_seed, epoch, u.start, index.size[u.start : u.start + u.count]
            )
            for name in schema.VIEW_FIELDS:
                assert np.array_equal(stored[name], getattr(fresh, name)), (epoch, unit, name)
            assert (fresh.partner >= 0).all()  # function matching mixes every sample here


def test_replay_helpers_agree(cache, index):
    for unit in range(len(index.units)):
        replayed, ok, targets = cached_unit_views(cache, index, unit, 1)
        fresh, usable = fresh_unit_views(index, unit, cache.spec, cache.plan_seed, 1)
        assert ok.all() and usable.all()
        for name in schema.VIEW_FIELDS:
            assert np.array_equal(getattr(replayed, name), getattr(fresh, name)), name
        assert np.array_equal(targets["topk_index"], raw_rows(cache, 1, unit)["topk_index"])


@pytest.mark.parametrize("epoch", [0, 1])
def test_trainer_pixels_are_the_teachers_pixels(cache, index, images, epoch):
    items = train_items(cache, index, epoch, TEACHER_SIZE)
    seen = np.concatenate([item["rows"].numpy() for item in items])
    assert set(seen.tolist()) == set(range(index.num_samples))
    for item in items:
        rows = item["rows"].numpy()
        assert item["skipped"] == 0
        expected = teacher_input(cache, index, images, epoch, rows, TEACHER_SIZE)
        assert item["pixels"].dtype == torch.uint8  # 8-bit out of the workers
        assert torch.equal(model_input(item), expected)
        # the targets travel with their rows
        for j, i in enumerate(rows):
            unit = index.unit_index_of(int(i))
            stored = raw_rows(cache, epoch, unit)
            pos = int(i) - index.units[unit].start
            assert torch.equal(item["topk_index"][j], torch.from_numpy(stored["topk_index"][pos]))
            assert torch.equal(item["topk_logits"][j], torch.from_numpy(stored["topk_logits"][pos]))
            assert item["lse"][j].item() == stored["lse"][pos]
            assert item["label"][j].item() == index.label[i]
            assert item["lam"][j].item() == float(stored["lam"][pos])
            assert item["partner_label"][j].item() == index.label[stored["partner"][pos]]


@pytest.mark.parametrize("epoch", [0, 1])
def test_rerun_teacher_reproduces_the_cache(cache, index, teacher, epoch):
    items = train_items(cache, index, epoch, TEACHER_SIZE)
    assert cache.meta["teacher_weights_hash"] == weights_hash(teacher)
    agree = total = 0
    for item in items:
        with torch.no_grad():
            logits = teacher(model_input(item)).float()
        fresh = topk_rows(logits, cache.topk)
        assert torch.equal(fresh["topk_index"].to(item["topk_index"].dtype), item["topk_index"])
        # the cache holds fp16: the fresh fp32 logits round to within one fp16 ulp of it
        stored = item["topk_logits"].float()
        ulp = torch.finfo(torch.float16).eps * stored.abs().clamp_min(2.0**-14)
        assert ((logits.gather(1, item["topk_index"].long()) - stored).abs() <= ulp).all()
        assert torch.allclose(fresh["lse"], item["lse"], rtol=1e-6, atol=1e-6)
        agree += int((logits.argmax(1) == item["topk_index"][:, 0].long()).sum())
        total += len(logits)
    assert agree == total  # top-1 agreement 1.0


def test_student_resolution_uses_the_same_boxes(cache, index, images):
    """A student at another size renders the same source-pixel views at its own size."""
    items = train_items(cache, index, 0, 12)
    for item in items:
        rows = item["rows"].numpy()
        assert model_input(item).shape[-1] == 12
        assert torch.equal(model_input(item), teacher_input(cache, index, images, 0, rows, 12))


def test_cached_and_fresh_streams_render_the_same(cache, index):
    cached = train_items(cache, index, 1, TEACHER_SIZE, cached=True, batch_size=5)
    fresh = train_items(cache, index, 1, TEACHER_SIZE, cached=False, batch_size=5)
    assert len(cached) == len(fresh)
    for a, b in zip(cached, fresh, strict=True):
        assert torch.equal(a["rows"], b["rows"])
        assert torch.equal(model_input(a), model_input(b))
        assert "topk_index" in a and "topk_index" not in b
