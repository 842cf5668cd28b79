"""The reader and the writer of a cache: what each mode opens, the typed unit table and its
stored form, pickling into workers, and the names ``kdcache.store`` still gives."""

from __future__ import annotations

import os
import pickle

import pytest
import zarr
from conftest import copy_tree

from kdcache import schema
from kdcache.cache_writer import CacheWriter, create_cache
from kdcache.store import Cache, open_cache

LEGACY = os.path.join(os.path.dirname(__file__), "data", "legacy-v1", "cache.zarr")


def stored_units(path: str) -> list[dict]:
    return zarr.open_group(path, mode="r").attrs[schema.FORMAT_NAME]["data"]["units"]


@pytest.mark.parametrize("which", ["tiny", "legacy"])
def test_unit_records_read_and_give_back_the_stored_table(which, tiny_cache):
    path = tiny_cache if which == "tiny" else LEGACY
    cache = open_cache(path)
    assert all(isinstance(u, schema.UnitRecord) for u in cache.units)
    assert [u.to_attrs() for u in cache.units] == stored_units(path)  # keys, values and order
    assert all(u.located for u in cache.units)
    start = 0
    for u in cache.units:  # the table is the data's: units follow each other
        assert u.start == start and u.count > 0
        start += u.count


def test_a_record_without_the_shard_location_is_not_located():
    record = schema.UnitRecord.from_attrs(
        {"name": "a.tar", "count": "3", "content_hash": "h", "start": 0}
    )
    assert record.count == 3 and record.url is None and not record.located
    assert record.to_attrs() == {"name": "a.tar", "count": 3, "content_hash": "h", "start": 0}


def test_read_mode_opens_a_reader_and_writable_modes_a_writer(tmp_path, tiny_cache):
    reader = open_cache(tiny_cache)
    assert type(reader) is Cache and not hasattr(reader, "write_unit")
    path = copy_tree(tiny_cache, tmp_path / "c.zarr")
    for mode in ("a", "r+"):
        writer = open_cache(path, mode=mode)
        assert isinstance(writer, CacheWriter) and writer.units == reader.units
    with pytest.raises(ValueError, match="mode 'w'"):
        open_cache(tiny_cache, mode="w")


def test_a_pickled_cache_keeps_its_kind_and_reads_the_same(tmp_path, tiny_cache):
    reader = open_cache(tiny_cache)
    writer = open_cache(copy_tree(tiny_cache, tmp_path / "c.zarr"), mode="a")
    for cache in (reader, writer):
        again = pickle.loads(pickle.dumps(cache))
        assert type(again) is type(cache) and again.units == cache.units
        want, got = cache.read_unit(1, 2), again.read_unit(1, 2)
        assert all((got[k] == v).all() for k, v in want.items())


def test_the_store_module_still_gives_the_writers_names():
    from kdcache import store

    assert store.create_cache is create_cache and store.CacheWriter is CacheWriter
    with pytest.raises(AttributeError):
        store.no_such_name  # noqa: B018
