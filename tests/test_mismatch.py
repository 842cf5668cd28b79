"""A cache is only ever used with the data, teacher and views it was made from."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
import zarr
from conftest import NUM_CLASSES, TEACHER, TRAIN_SHARDS, cache_config, copy_tree, write_split

from kdcache import schema
from kdcache.cache import precompute
from kdcache.data.index import load_index
from kdcache.errors import CacheDamagedError, CacheMismatchError, KdcacheError
from kdcache.models import create_model
from kdcache.replay import cached_unit_views
from kdcache.store import open_cache
from kdcache.train import fit
from kdcache.train.config import TrainConfig

pytestmark = pytest.mark.faults  # wrong inputs are refused: part of `pytest -m faults`


def train_cfg(data: str, val: str, cache: str, out, **kw) -> TrainConfig:
    opts = dict(
        data=data,
        val=val,
        student=TEACHER,
        out=str(out),
        epochs=1,
        teacher_mode="cached",
        cache=cache,
        image_size=16,
        batch_size=8,
        workers=0,
        device="cpu",
        command="pytest",
    )
    opts.update(kw)
    return TrainConfig(**opts)


def snapshot(path: str) -> dict[str, np.ndarray]:
    cache = open_cache(path)
    return {name: cache.array(name)[...] for name in cache.group.array_keys()}


def test_removed_shard_is_refused(tmp_path, tiny_cache, train_dir, val_dir):
    data = copy_tree(train_dir, tmp_path / "train")
    os.remove(os.path.join(data, "train-000002.tar"))
    with pytest.raises(CacheMismatchError) as e:
        fit(train_cfg(data, val_dir, tiny_cache, tmp_path / "run"))
    message = str(e.value)
    assert "data_fingerprint" in message
    assert "2 shards" in message and "3 shards" in message


def test_added_shard_is_refused(tmp_path, tiny_cache, train_dir, val_dir):
    data = copy_tree(train_dir, tmp_path / "train")
    shutil.copy(os.path.join(data, "train-000001.tar"), os.path.join(data, "train-000003.tar"))
    with pytest.raises(CacheMismatchError, match="data_fingerprint"):
        fit(train_cfg(data, val_dir, tiny_cache, tmp_path / "run"))


def test_reordered_shards_are_refused(tmp_path, tiny_cache, train_dir, val_dir):
    data = (
        os.path.join(train_dir, "train-000001.tar")
        + ","
        + os.path.join(train_dir, "train-000000.tar")
        + ","
        + os.path.join(train_dir, "train-000002.tar")
    )
    with pytest.raises(CacheMismatchError, match="data_fingerprint"):
        fit(train_cfg(data, val_dir, tiny_cache, tmp_path / "run"))


def test_changed_shard_contents_are_refused(tmp_path, tiny_cache, val_dir):
    data = tmp_path / "train"
    write_split(data, "train", TRAIN_SHARDS, seed=99)  # same names, keys and counts; other pixels
    assert load_index(str(data)).counts == list(TRAIN_SHARDS)
    with pytest.raises(CacheMismatchError, match="data_fingerprint"):
        fit(train_cfg(str(data), val_dir, tiny_cache, tmp_path / "run"))


def test_copied_data_has_the_same_fingerprint(tmp_path, train_dir):
    copy = copy_tree(train_dir, tmp_path / "elsewhere")
    assert load_index(copy).fingerprint == load_index(train_dir).fingerprint


def test_other_teacher_spec_is_refused(tmp_path, tiny_cache, train_dir, val_dir):
    with pytest.raises(CacheMismatchError, match="teacher") as e:
        fit(train_cfg(train_dir, val_dir, tiny_cache, tmp_path / "run", teacher="kdcache:resnet_s"))
    assert "resnet_s" in str(e.value)


def test_other_teacher_weights_are_refused(tmp_path, tiny_cache, train_dir, val_dir):
    weights = str(tmp_path / "other.pt")
    torch.save(create_model(TEACHER, NUM_CLASSES, seed=1).state_dict(), weights)
    with pytest.raises(CacheMismatchError, match="teacher_weights_hash"):
        fit(
            train_cfg(
                train_dir,
                val_dir,
                tiny_cache,
                tmp_path / "run",
                teacher=TEACHER,
                teacher_weights=weights,
            )
        )


def test_same_teacher_weights_file_is_accepted(tmp_path, tiny_cache, train_dir, val_dir):
    """The seed-0 teacher saved to a file is the teacher the cache was made with."""
    weights = str(tmp_path / "same.pt")
    torch.save(create_model(TEACHER, NUM_CLASSES, seed=0).state_dict(), weights)
    result = fit(
        train_cfg(
            train_dir,
            val_dir,
            tiny_cache,
            tmp_path / "run",
            teacher=TEACHER,
            teacher_weights=weights,
        )
    )
    assert "teacher_agreement" in result


def test_other_views_are_refused(tmp_path, tiny_cache, train_dir, val_dir):
    with pytest.raises(CacheMismatchError) as e:
        fit(train_cfg(train_dir, val_dir, tiny_cache, tmp_path / "run", views="consistent"))
    assert "consistent" in str(e.value) and "function_matching" in str(e.value)


@pytest.mark.parametrize("key,value", [("plan_seed", 5), ("teacher_image_size", 24)])
def test_other_plan_seed_or_teacher_size_is_refused(
    tmp_path, tiny_cache, train_dir, val_dir, key, value
):
    with pytest.raises(CacheMismatchError, match=key):
        fit(train_cfg(train_dir, val_dir, tiny_cache, tmp_path / "run", **{key: value}))


@pytest.mark.parametrize(
    "option,value,key",
    [
        ("views", "consistent", "views"),
        ("topk", 5, "topk"),
        ("plan_seed", 1, "plan_seed"),
        ("teacher_image_size", 24, "teacher_image_size"),
        ("teacher", "kdcache:resnet_s", "teacher"),
    ],
)
def test_second_precompute_with_other_settings_is_refused(
    tmp_path, tiny_cache, train_dir, option, value, key
):
    cache = copy_tree(tiny_cache, tmp_path / "c.zarr")
    before = snapshot(cache)
    with pytest.raises(CacheMismatchError) as e:
        precompute(cache_config(train_dir, cache, epochs=3, **{option: value}))
    assert f"{key}:" in str(e.value)
    after = snapshot(cache)  # refused before touching anything (no extension either)
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].shape == after[name].shape and np.array_equal(
            before[name], after[name]
        ), name


def test_precompute_on_other_data_is_refused(tmp_path, tiny_cache):
    data = tmp_path / "train"
    write_split(data, "train", TRAIN_SHARDS, seed=7)
    cache = copy_tree(tiny_cache, tmp_path / "c.zarr")
    with pytest.raises(CacheMismatchError, match="data_fingerprint"):
        precompute(cache_config(str(data), cache))


@pytest.mark.parametrize("manifest", [True, False])
def test_tampered_rows_are_refused(tmp_path, tiny_cache, train_dir, manifest):
    """Rows rewritten in place: damage against the manifest; in a cache without one (made
    before manifests) the view seeds and key hashes still catch them."""
    path = copy_tree(tiny_cache, tmp_path / "c.zarr")
    if not manifest:
        shutil.rmtree(os.path.join(path, schema.MANIFEST_ARRAY))
        group = zarr.open_group(path, mode="r+")
        meta = dict(group.attrs["kdcache"])
        del meta["sample_checksums"]
        group.attrs["kdcache"] = meta
    index = load_index(train_dir)
    cache = open_cache(path, mode="a")
    assert cache.has_manifest == manifest
    seed = cache.array("seed")
    seed[0, 1] = seed[0, 1] + 1
    cached_unit_views(cache, index, 1, 0)  # other units still fine
    error = CacheDamagedError if manifest else CacheMismatchError
    with pytest.raises(error, match="'seed', epoch 0 unit 0" if manifest else "seeds"):
        cached_unit_views(open_cache(path), index, 0, 0)
    keys = cache.array("key_hash")
    keys[cache.slot] = keys[cache.slot] + 1
    with pytest.raises(error, match="'key_hash', unit 1" if manifest else "key hashes"):
        cached_unit_views(open_cache(path), index, 1, 0)


def test_incomplete_cache_is_refused(tmp_path, train_dir, val_dir):
    cache = str(tmp_path / "c.zarr")
    precompute(cache_config(train_dir, cache, epochs=1, limit_units=1))
    with pytest.raises(KdcacheError, match="no epoch complete"):
        fit(train_cfg(train_dir, val_dir, cache, tmp_path / "run"))


def test_newer_schema_is_refused(tmp_path, tiny_cache):
    path = copy_tree(tiny_cache, tmp_path / "c.zarr")
    cache = open_cache(path, mode="a")
    meta = dict(cache.group.attrs["kdcache"])
    meta["schema_version"] = 99
    cache.group.attrs["kdcache"] = meta
    with pytest.raises(KdcacheError, match="schema version 99"):
        open_cache(path)
