"""A unit's files: the direct chunk reader (kdcache.chunks) reads exactly what zarr reads and
knows its limits; what goes through zarr goes in one concurrent round trip."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import zarr
from conftest import cache_config, chunk_file, copy_tree, flip_byte
from zarr.storage import LocalStore, WrapperStore

from kdcache import schema
from kdcache.cache import precompute
from kdcache.errors import CacheDamagedError
from kdcache.store import open_cache

ALL_FIELDS = schema.ROW_FIELDS + schema.SAMPLE_FIELDS


def zarr_rows(path: str, name: str, epoch: int | None, rows: slice) -> np.ndarray:
    array = zarr.open_group(path, mode="r")[name]
    return array[rows] if epoch is None else array[epoch, rows]


def test_every_array_of_a_cache_reads_directly_and_equals_zarr(tiny_cache):
    cache = open_cache(tiny_cache)
    assert all(cache._chunk_file(f.name) is not None for f in ALL_FIELDS)  # the fast path is used
    for unit in range(len(cache.units)):
        rows = cache.unit_rows(unit)
        for epoch in range(cache.epochs):
            got = cache.read_unit(epoch, unit)
            for f in schema.ROW_FIELDS:
                want = zarr_rows(tiny_cache, f.name, epoch, rows)
                assert got[f.name].dtype == want.dtype and got[f.name].shape == want.shape
                assert np.array_equal(got[f.name], want), (f.name, epoch, unit)
                assert got[f.name].flags.writeable
        for name, values in cache.read_samples(unit).items():
            assert np.array_equal(values, zarr_rows(tiny_cache, name, None, rows)), name


def test_a_sharded_cache_reads_through_zarr_and_holds_the_same_rows(
    tmp_path, train_dir, tiny_cache
):
    out = str(tmp_path / "sharded.zarr")
    precompute(cache_config(train_dir, out, chunk_rows=4))  # units of 7 rows: 2 chunks a shard
    sharded, plain = open_cache(out), open_cache(tiny_cache)
    assert sharded.array("topk_index").shards == (1, 8, 10)
    assert plain.array("topk_index").shards is None  # a unit that fits one chunk is not sharded
    # a unit's epoch is two chunks: not what the direct readers return, so zarr reads it
    assert all(sharded._chunk_file(f.name).shape[1] == 4 for f in schema.ROW_FIELDS)
    for unit in range(len(plain.units)):
        for epoch in range(plain.epochs):
            a, b = sharded.read_unit(epoch, unit), plain.read_unit(epoch, unit)
            for name in a:
                assert np.array_equal(a[name], b[name]), (name, epoch, unit)


def test_an_unwritten_unit_reads_as_fill_values_like_zarr(tmp_path, tiny_cache):
    path = copy_tree(tiny_cache, tmp_path / "c.zarr")
    cache = open_cache(path, mode="a")
    cache.extend(cache.epochs + 1)
    epoch = cache.epochs - 1
    got = open_cache(path).read_unit(epoch, 0)
    for f in schema.ROW_FIELDS:
        assert np.array_equal(got[f.name], zarr_rows(path, f.name, epoch, cache.unit_rows(0)))
        assert (got[f.name] == f.fill).all(), f.name


@pytest.mark.parametrize("keep", [0, 3, 20])
def test_a_truncated_chunk_is_damage(keep, tmp_path, tiny_cache):
    path = copy_tree(tiny_cache, tmp_path / "c.zarr")
    target = chunk_file(path, "topk_logits", 1, 0)
    assert os.path.getsize(target) > keep
    with open(target, "r+b") as f:
        f.truncate(keep)
    with pytest.raises(CacheDamagedError, match="'topk_logits', epoch 1 unit 0"):
        open_cache(path).read_unit(1, 0)


class InFlight(WrapperStore):
    """A store that counts how many reads are waiting at once (each waits 10 ms)."""

    def __init__(self, store):
        super().__init__(store)
        self.now = self.most = 0

    async def _wait(self) -> None:
        self.now += 1
        self.most = max(self.most, self.now)
        await asyncio.sleep(0.01)
        self.now -= 1

    async def get(self, *args, **kwargs):
        await self._wait()
        return await self._store.get(*args, **kwargs)

    async def set(self, *args, **kwargs):
        await self._wait()
        return await self._store.set(*args, **kwargs)


def test_reads_through_zarr_are_one_concurrent_round_trip(tiny_cache):
    cache = open_cache(tiny_cache)
    store = InFlight(LocalStore(tiny_cache, read_only=True))
    cache._group = zarr.open_group(store, mode="r")  # as a URL would be: no direct reads
    cache._arrays = {}  # opening checked the layout through the plain store
    cache._chunk_files = {f.name: None for f in ALL_FIELDS}
    for f in schema.ROW_FIELDS:
        cache.array(f.name)  # open the arrays first: only the row reads are counted
    store.most = 0
    got = cache.read_unit(1, 2)
    assert store.most == len(schema.ROW_FIELDS)  # every array's read in flight at once
    want = open_cache(tiny_cache).read_unit(1, 2)
    assert all(np.array_equal(got[name], want[name]) for name in want)


def test_damage_read_through_zarr_is_named(tmp_path, train_dir):
    out = str(tmp_path / "sharded.zarr")
    precompute(cache_config(train_dir, out, chunk_rows=4, epochs=1))
    flip_byte(chunk_file(out, "topk_index", 0, 1))
    with pytest.raises(CacheDamagedError, match="'topk_index', epoch 0 unit 1"):
        open_cache(out).read_unit(0, 1)


def test_a_unit_is_written_in_one_concurrent_round_trip(tmp_path, tiny_cache):
    path = copy_tree(tiny_cache, tmp_path / "c.zarr")
    rows = open_cache(path).read_unit(1, 0)
    cache = open_cache(path, mode="a")
    store = InFlight(LocalStore(path))
    cache._group = zarr.open_group(store, mode="r+")
    cache._arrays = {}
    for f in schema.ROW_FIELDS:
        cache.array(f.name)
    cache.array(schema.DONE_ARRAY)
    store.most = 0
    cache.uncommit(1, 0)
    cache.write_unit(1, 0, rows)
    assert store.most == len(schema.ROW_FIELDS)  # every array's file in flight at once
    again = open_cache(path)
    assert again.done_mask()[1, 0]
    assert all(np.array_equal(again.read_unit(1, 0)[k], v) for k, v in rows.items())
