"""Epoch blocks: a cache of B epochs per block holds the very rows of a cache of one epoch per
block, in one file per array per (unit, block); extending into a block cut short rewrites it
whole; damage in a block is found, named by epoch, and repaired to the same bytes; training
reads it to the same losses; ranks split the work by block."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import TEACHER, cache_config, chunk_file, copy_tree, flip_byte, read_steps

from kdcache import schema
from kdcache.cache import precompute
from kdcache.cache.verify import verify
from kdcache.chunks import ShardFile
from kdcache.dist import Dist
from kdcache.errors import CacheDamagedError
from kdcache.store import open_cache
from kdcache.teacher_pass import _work_list
from kdcache.train import TrainConfig, fit

EPOCHS = 3


def arrays(path: str) -> dict[str, np.ndarray]:
    cache = open_cache(path)
    return {name: cache.array(name)[...] for name in cache.group.array_keys()}


def files(path: str, array: str) -> list[str]:
    root = os.path.join(path, array, "c")
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


@pytest.fixture(scope="module")
def flat(tmp_path_factory, train_dir) -> str:
    """3 epochs, one per block: a file per (epoch, unit)."""
    out = str(tmp_path_factory.mktemp("flat") / "c.zarr")
    precompute(cache_config(train_dir, out, epochs=EPOCHS, epochs_per_block=1))
    return out


@pytest.fixture(scope="module")
def blocked(tmp_path_factory, train_dir) -> str:
    """The same 3 epochs in blocks of 2: epochs 0-1, then epoch 2 (a block cut short)."""
    out = str(tmp_path_factory.mktemp("blocked") / "c.zarr")
    precompute(cache_config(train_dir, out, epochs=EPOCHS, epochs_per_block=2))
    return out


def test_blocks_hold_the_same_rows_in_one_file_per_array_per_unit_block(flat, blocked):
    a, b = open_cache(flat), open_cache(blocked)
    assert (a.epochs_per_block, a.schema_version) == (1, 2)  # as every kdcache wrote it
    assert (b.epochs_per_block, b.schema_version) == (2, 3)
    want, got = arrays(flat), arrays(blocked)
    assert got.keys() == want.keys()
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    units, blocks = len(b.units), 2
    for name in (*b.row_names, schema.DONE_ARRAY, schema.MANIFEST_ARRAY):
        # a file per (unit, block) at most (an all-fill one, e.g. partner without mixing, none)
        assert len(files(blocked, name)) <= units * blocks, name
        assert len(files(flat, name)) <= units * EPOCHS, name
    assert len(files(blocked, "topk_logits")) == units * blocks
    assert len(files(flat, "topk_logits")) == units * EPOCHS


def test_block_shards_are_read_directly_and_equal_zarr(blocked):
    cache = open_cache(blocked)
    for f in cache.row_fields:
        assert isinstance(cache._chunk_file(f.name), ShardFile), f.name  # the fast path
    assert isinstance(cache._chunk_file(schema.MANIFEST_ARRAY), ShardFile)
    for unit in range(len(cache.units)):
        rows = cache.unit_rows(unit)
        for epoch in range(cache.epochs):
            got = cache.read_unit(epoch, unit)
            for name, values in got.items():
                want = cache.array(name)[epoch, rows]
                assert values.dtype == want.dtype and np.array_equal(values, want), name


def test_extending_into_a_block_cut_short_rewrites_it_whole(tmp_path, train_dir, blocked):
    out = str(tmp_path / "c.zarr")
    precompute(cache_config(train_dir, out, epochs=1, epochs_per_block=2))
    before = files(out, "topk_logits")
    precompute(cache_config(train_dir, out, epochs=EPOCHS, epochs_per_block=2))
    after = files(out, "topk_logits")
    assert set(before) <= set(after) and len(after) == 2 * len(before)  # blocks 0 and 1
    want, got = arrays(blocked), arrays(out)
    for name in want:
        assert np.array_equal(got[name], want[name]), name


def test_an_existing_cache_keeps_its_block_size(caplog, tmp_path, train_dir):
    out = str(tmp_path / "c.zarr")
    precompute(cache_config(train_dir, out, epochs=1, epochs_per_block=2))
    precompute(cache_config(train_dir, out, epochs=2, epochs_per_block=4))
    assert "keeps its own layout of 2 epochs per block" in caplog.text
    assert open_cache(out).epochs_per_block == 2


def test_damage_in_a_block_is_named_by_epoch_and_repaired_to_the_same_bytes(
    tmp_path, train_dir, blocked
):
    cache = copy_tree(blocked, tmp_path / "c.zarr")
    before = arrays(cache)
    flip_byte(chunk_file(cache, "topk_logits", 0, 1))  # the shard of block 0 (epochs 0, 1)
    with pytest.raises(CacheDamagedError, match=r"topk_logits epoch [01] unit 1"):
        verify(cache, train_dir, TEACHER, samples=8, device="cpu")
    result = verify(cache, train_dir, TEACHER, samples=8, device="cpu", repair=True)
    assert result["top1_agreement"] == 1.0 and result["damaged_units_repaired"] >= 1
    after = arrays(cache)
    for name, want in before.items():
        assert np.array_equal(after[name], want), name


def test_a_lost_block_file_is_damage_in_each_of_its_epochs(tmp_path, train_dir, blocked):
    cache = copy_tree(blocked, tmp_path / "c.zarr")
    before = arrays(cache)
    os.remove(chunk_file(cache, "lse", 1, 2))
    with pytest.raises(CacheDamagedError) as err:
        verify(cache, train_dir, TEACHER, samples=8, device="cpu")
    assert "lse epoch 0 unit 2" in str(err.value) and "lse epoch 1 unit 2" in str(err.value)
    verify(cache, train_dir, TEACHER, samples=8, device="cpu", repair=True)
    after = arrays(cache)
    for name, want in before.items():
        assert np.array_equal(after[name], want), name


def test_a_block_whose_done_epoch_is_damaged_is_not_rewritten_from_it(tmp_path, blocked):
    """Rewriting a block reads its done epochs back, checked: damage stops the write."""
    cache = open_cache(copy_tree(blocked, tmp_path / "c.zarr"), mode="a")
    rows = cache.read_unit(1, 0)
    with open(chunk_file(cache.path, "box", 0, 0), "r+b") as f:  # the first chunk: epoch 0's
        f.seek(20)
        byte = f.read(1)[0]
        f.seek(20)
        f.write(bytes([byte ^ 0xFF]))
    cache.uncommit(1, 0)
    with pytest.raises(CacheDamagedError, match="'box', epoch 0 unit 0"):
        cache.write_block(0, {1: rows})
    with pytest.raises(ValueError, match="not all in the block"):
        cache.write_block(0, {1: rows, 2: rows})


def test_training_on_blocks_gives_the_same_losses(tmp_path, train_dir, val_dir, flat, blocked):
    def run(cache: str, out: str) -> list[float]:
        cfg = TrainConfig(
            data=train_dir, val=val_dir, student="kdcache:tiny_cnn", out=str(tmp_path / out),
            epochs=EPOCHS, cache=cache, image_size=16, batch_size=8, workers=0, device="cpu",
        )  # fmt: skip
        fit(cfg)
        return [s["loss"] for s in read_steps(cfg.out)]

    assert run(blocked, "blocked") == run(flat, "flat")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_split_the_work_by_block(world, blocked):
    """Every (epoch, unit) to do is in exactly one rank's list, and a block's epochs in one."""
    cache = open_cache(blocked)
    cache.done_mask = lambda: np.zeros((EPOCHS, len(cache.units)), dtype=bool)  # nothing done
    owner: dict[tuple[int, int], int] = {}
    for rank in range(world):
        for epochs, unit, lo, hi in _work_list(
            cache, EPOCHS, 4, None, Dist(rank=rank, world=world)
        ):
            assert hi - lo <= max(1, 4 // len(epochs))
            for epoch in epochs:
                assert owner.setdefault((epoch, unit), rank) == rank
                assert cache.block_of(epoch) == cache.block_of(epochs[0])
    assert set(owner) == {(e, u) for e in range(EPOCHS) for u in range(len(cache.units))}
    blocks = {(e // 2, u): r for (e, u), r in owner.items()}
    assert len(set(blocks.values())) == min(world, len(blocks))
