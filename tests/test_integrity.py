"""The cache knows every byte it committed: a lost, swapped or foreign unit file is damage,
named by array, epoch and unit, refused by the trainer and repaired to the same bytes."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from conftest import TEACHER, chunk_file, copy_tree, run_cli

from kdcache.cache.inspect import summary
from kdcache.cache.verify import verify
from kdcache.errors import CacheDamagedError
from kdcache.store import open_cache
from kdcache.train import TrainConfig, fit

pytestmark = pytest.mark.faults


def arrays(path: str) -> dict[str, np.ndarray]:
    cache = open_cache(path)
    return {name: cache.array(name)[...] for name in cache.group.array_keys()}


def train_cfg(train_dir: str, val_dir: str, cache: str, out: str) -> TrainConfig:
    return TrainConfig(
        data=train_dir,
        val=val_dir,
        student="kdcache:tiny_cnn",
        out=out,
        epochs=1,
        cache=cache,
        image_size=16,
        batch_size=8,
        workers=0,
        device="cpu",
    )


def assert_found_and_repaired(cache: str, train_dir: str, before: dict, *where: str) -> None:
    with pytest.raises(CacheDamagedError) as err:
        verify(cache, train_dir, TEACHER, samples=8, device="cpu")
    for w in where:
        assert w in str(err.value), (w, str(err.value))
    result = verify(cache, train_dir, TEACHER, samples=8, device="cpu", repair=True)
    assert result["top1_agreement"] == 1.0
    after = arrays(cache)
    for name, want in before.items():
        assert np.array_equal(after[name], want), name  # the very same bytes again


LOST = [("lse", 0, 1), ("topk_logits", 1, 2), ("topk_index", 0, 0), ("status", 0, 2),
        ("box", 1, 0), ("manifest", 0, 1)]  # fmt: skip


@pytest.mark.parametrize("array,epoch,unit", LOST)
def test_a_lost_unit_file_is_damage(array, epoch, unit, tmp_path, train_dir, val_dir, tiny_cache):
    cache = copy_tree(tiny_cache, tmp_path / "c.zarr")
    before = arrays(cache)
    os.remove(chunk_file(cache, array, epoch, unit))
    if epoch == 0:  # the trainer refuses it too, pointing at verify --repair
        with pytest.raises(CacheDamagedError, match=f"'{array}', epoch 0 unit {unit}.*--repair"):
            fit(train_cfg(train_dir, val_dir, cache, str(tmp_path / "run")))
    assert_found_and_repaired(cache, train_dir, before, f"{array} epoch {epoch} unit {unit}")


SWAPS = [
    ("topk_logits", (0, 1), (0, 2)),
    ("topk_index", (0, 0), (1, 0)),
    ("lse", (1, 1), (1, 2)),
    ("box", (0, 0), (0, 1)),
    ("partner", (0, 1), (1, 1)),
    ("manifest", (0, 0), (0, 1)),
]


@pytest.mark.parametrize("array,a,b", SWAPS)
def test_swapped_unit_files_are_damage(array, a, b, tmp_path, train_dir, val_dir, tiny_cache):
    """Valid chunks, each passing its own crc32c, swapped between units or epochs."""
    cache = copy_tree(tiny_cache, tmp_path / "c.zarr")
    before = arrays(cache)
    fa, fb = chunk_file(cache, array, *a), chunk_file(cache, array, *b)
    tmp = fa + ".swap"
    os.replace(fa, tmp)
    os.replace(fb, fa)
    os.replace(tmp, fb)
    assert_found_and_repaired(
        cache,
        train_dir,
        before,
        f"{array} epoch {a[0]} unit {a[1]}",
        f"{array} epoch {b[0]} unit {b[1]}",
    )


def test_a_foreign_cache_file_is_damage(tmp_path, train_dir, tiny_cache):
    """The same unit file from another cache of the same data (another plan seed)."""
    from conftest import cache_config

    from kdcache.cache import precompute

    other = str(tmp_path / "other.zarr")
    precompute(cache_config(train_dir, other, epochs=1, plan_seed=5))
    cache = copy_tree(tiny_cache, tmp_path / "c.zarr")
    before = arrays(cache)
    shutil.copyfile(chunk_file(other, "lam", 0, 1), chunk_file(cache, "lam", 0, 1))
    assert_found_and_repaired(cache, train_dir, before, "lam epoch 0 unit 1")


def test_inspect_says_how_a_cache_is_checked(tiny_cache):
    assert "every committed unit file" in summary(open_cache(tiny_cache))["integrity"]
    legacy = os.path.join(os.path.dirname(__file__), "data", "legacy-v1", "cache.zarr")
    report = summary(open_cache(legacy))
    assert "chunk checksums only" in report["integrity"]
    code, out, _ = run_cli("inspect", legacy)
    assert code == 0 and "chunk checksums only" in out


@pytest.mark.parametrize(
    "key,value,needle",
    [("topk", 12, "topk 12"), ("num_classes", 40000, "class indices"), ("slot", 4, "units of 4")],
)
def test_attributes_that_disagree_with_the_arrays_are_refused(
    tmp_path, tiny_cache, key, value, needle
):
    import zarr

    cache = copy_tree(tiny_cache, tmp_path / "c.zarr")
    group = zarr.open_group(cache, mode="r+")
    meta = dict(group.attrs["kdcache"])
    meta[key] = value
    group.attrs["kdcache"] = meta
    with pytest.raises(CacheDamagedError, match=needle):
        open_cache(cache)
    code, _, err = run_cli("inspect", cache)
    assert code == 2 and needle in err and "Traceback" not in err


def test_a_truncated_root_zarr_json_is_one_sentence(tmp_path, tiny_cache):
    cache = copy_tree(tiny_cache, tmp_path / "c.zarr")
    path = os.path.join(cache, "zarr.json")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    code, _, err = run_cli("inspect", cache)
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and "zarr.json" in lines[0] and "Traceback" not in err


def test_a_second_precompute_on_a_held_cache_says_who_holds_it(tmp_path, train_dir):
    from kdcache.lock import output_lock

    out = str(tmp_path / "c.zarr")
    argv = ("precompute", "--data", train_dir, "--teacher", TEACHER, "--out", out, "--epochs",
            "1", "--teacher-image-size", "16", "--workers", "0", "--device", "cpu")  # fmt: skip
    with output_lock(out, "cache"):  # another job (here: this process) holds it
        code, _, err = run_cli(*argv)
        assert code == 2 and f"pid {os.getpid()}" in err and "in use" in err
        assert not os.path.exists(out)  # nothing was created or wiped
    code, _, err = run_cli(*argv)
    assert code == 0, err
    assert not os.path.exists(out + ".lock")
