"""An unreadable image is marked bad in the cache, never mixed in, and skipped by the trainer."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import NUM_CLASSES, SIZES, TEACHER_SIZE, cache_config, synthetic_image

from kdcache import schema
from kdcache.cache import precompute
from kdcache.cli.shards import ShardWriter
from kdcache.data.index import load_index
from kdcache.store import open_cache
from kdcache.train import fit
from kdcache.train.batches import EpochData, TrainBatches
from kdcache.train.config import TrainConfig

pytestmark = pytest.mark.faults

BROKEN = 3  # global index of the sample whose image is not an image


@pytest.fixture(scope="module")
def broken_data(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("broken") / "train"
    rng = np.random.default_rng(5)
    writer = ShardWriter(str(out), "train", 6)
    try:
        for n in range(11):
            data = (
                b"not an image"
                if n == BROKEN
                else synthetic_image(rng, n % NUM_CLASSES, SIZES[n % 7])
            )
            writer.write(f"s-{n:03d}", data, "png", n % NUM_CLASSES)
    finally:
        writer.close()
    return str(out)


@pytest.fixture(scope="module")
def broken_cache(tmp_path_factory, broken_data) -> str:
    out = str(tmp_path_factory.mktemp("broken_cache") / "c.zarr")
    summary = precompute(cache_config(broken_data, out, num_classes=NUM_CLASSES))
    assert summary["bad_rows"] == 2  # one per epoch
    return out


def test_index_marks_unreadable_size(broken_data):
    index = load_index(broken_data)
    assert index.size[BROKEN].tolist() == [0, 0]
    assert (index.size[np.arange(11) != BROKEN] > 0).all()


def test_cache_marks_bad_input_and_never_mixes_it(broken_cache):
    cache = open_cache(broken_cache)
    for epoch in range(2):
        rows = cache.read_unit(epoch, 0)
        status = rows["status"]
        assert status[BROKEN] == schema.UNDECODABLE
        assert (np.delete(status, BROKEN) == schema.OK).all()
        assert not rows["topk_logits"][BROKEN].any() and rows["lse"][BROKEN] == 0
        assert not rows["box"][BROKEN].any() and rows["partner"][BROKEN] == -1
        assert BROKEN not in rows["partner"]
        # a sample whose partner draw hit the broken one is simply not mixed
        unmixed = rows["partner"] < 0
        assert (rows["lam"][unmixed] == 1).all() and not rows["partner_box"][unmixed].any()
        assert (rows["partner"] >= 0).sum() >= 3


def test_trainer_skips_the_bad_row_only(broken_cache, broken_data, tmp_path, val_dir):
    cache = open_cache(broken_cache)
    index = load_index(broken_data)
    batches = [np.arange(0, 6), np.arange(6, 11)]
    data = TrainBatches(
        EpochData(index, batches, 0, TEACHER_SIZE, cache.spec, cache.plan_seed, cache=cache)
    )
    first, second = data[0], data[1]
    assert first["skipped"] == 1 and second["skipped"] == 0
    assert first["rows"].tolist() == [0, 1, 2, 4, 5]
    assert len(first["pixels"]) == len(first["topk_index"]) == len(first["lse"]) == 5
    cfg = TrainConfig(
        data=broken_data,
        val=val_dir,
        student="kdcache:tiny_cnn",
        out=str(tmp_path / "run"),
        epochs=1,
        cache=broken_cache,
        image_size=TEACHER_SIZE,
        batch_size=4,
        workers=0,
        device="cpu",
        command="pytest",
    )
    result = fit(cfg)
    assert result["skipped_rows"] == 1 and np.isfinite(result["train_loss"])
