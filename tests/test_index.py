"""The dataset index a cache carries: adopted on a machine without a saved index, never stale."""

from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import pytest
from conftest import cache_config

from kdcache.cache import precompute
from kdcache.data import index as index_module
from kdcache.data.index import load_index
from kdcache.store import open_cache


@pytest.fixture
def fresh_machine(tmp_path, train_dir, monkeypatch):
    """Shards, a 1-epoch cache of them, then no saved index anywhere (a new training machine);
    build_index records what it is asked to read."""
    shards = tmp_path / "shards"
    shutil.copytree(train_dir, shards, ignore=shutil.ignore_patterns("_kdcache_index-*"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache = str(tmp_path / "c.zarr")
    precompute(cache_config(str(shards), cache, epochs=1))
    original = load_index(str(shards))
    for saved in glob.glob(str(shards / "_kdcache_index-*")):
        os.remove(saved)
    shutil.rmtree(tmp_path / "xdg", ignore_errors=True)
    built: list[list[str]] = []
    real = index_module.build_index

    def recording(urls, progress=None, **kw):
        built.append(list(urls))
        return real(urls, progress, **kw)

    monkeypatch.setattr(index_module, "build_index", recording)
    return str(shards), cache, original, built


def same_index(a, b) -> bool:
    return (
        a.units == b.units
        and np.array_equal(a.key_hash, b.key_hash)
        and np.array_equal(a.label, b.label)
        and np.array_equal(a.size, b.size)
    )


def test_the_cache_index_is_adopted_without_reading_a_shard_and_saved(fresh_machine):
    shards, cache, original, built = fresh_machine
    adopted = load_index(shards, known=open_cache(cache).dataset_index)
    assert built == []  # no shard was read
    assert same_index(adopted, original)
    assert glob.glob(os.path.join(shards, "_kdcache_index-*"))  # and it is saved for next time
    assert same_index(load_index(shards), original) and built == []


def test_a_changed_shard_is_indexed_again_not_taken_from_the_cache(fresh_machine):
    shards, cache, original, built = fresh_machine
    first = sorted(glob.glob(os.path.join(shards, "*.tar")))[0]
    os.utime(first, ns=(0, os.stat(first).st_mtime_ns + 10**9))  # same bytes, new stamp
    index = load_index(shards, known=open_cache(cache).dataset_index)
    assert len(built) == 1  # the cache's copy was stale: every shard was read again
    assert index.fingerprint == original.fingerprint


def test_shards_elsewhere_are_indexed_not_taken_from_the_cache(fresh_machine, tmp_path):
    shards, cache, original, built = fresh_machine
    moved = shutil.copytree(shards, tmp_path / "moved")
    index = load_index(str(moved), known=open_cache(cache).dataset_index)
    assert len(built) == 1 and index.fingerprint == original.fingerprint


def test_a_cache_without_urls_offers_no_index(fresh_machine):
    _, cache, _, _ = fresh_machine
    c = open_cache(cache, mode="a")
    meta = dict(c.group.attrs["kdcache"])
    meta["data"] = {
        **meta["data"],
        "units": [
            {k: v for k, v in u.items() if k not in ("url", "stamp")} for u in meta["data"]["units"]
        ],
    }
    c.group.attrs["kdcache"] = meta
    assert open_cache(cache).dataset_index() is None
