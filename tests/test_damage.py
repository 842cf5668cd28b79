"""Damaged caches and bad inputs: found, named, refused, repaired; never silently used."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr
from conftest import (
    TEACHER,
    cache_config,  # noqa: I001 (kept next to the other conftest import)
    chunk_file,
    copy_tree,
    flip_byte,
    run_cli,
    write_split,
)

from kdcache import schema
from kdcache.cache import precompute
from kdcache.cache.verify import verify
from kdcache.cli.shards import ShardWriter
from kdcache.errors import CacheDamagedError, KdcacheError
from kdcache.store import open_cache
from kdcache.train import TrainConfig, fit

pytestmark = pytest.mark.faults


def arrays(path: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(path, mode="r")
    return {name: group[name][...] for name in group.array_keys()}


DAMAGE = [
    ("topk_logits", 1, 2),
    ("box", 0, 0),
    ("status", 1, 1),
    ("label", None, 1),
    ("done", 0, 2),
]


@pytest.mark.parametrize("array,epoch,unit", DAMAGE)
def test_verify_finds_names_and_repairs_damage(array, epoch, unit, tmp_path, train_dir, tiny_cache):
    cache = copy_tree(tiny_cache, tmp_path / "c.zarr")
    before = arrays(cache)
    flip_byte(chunk_file(cache, array, epoch, unit))
    with pytest.raises(CacheDamagedError) as err:
        verify(cache, train_dir, TEACHER, samples=8, device="cpu")
    where = f"{array} epoch {epoch} unit {unit}" if epoch is not None else f"{array} unit {unit}"
    assert where in str(err.value) and "--repair" in str(err.value)
    code, _, stderr = run_cli(
        "verify",
        cache,
        "--data",
        train_dir,
        "--teacher",
        TEACHER,
        "--samples",
        8,
        "--device",
        "cpu",
    )
    assert code == 2 and where in stderr and "Traceback" not in stderr
    result = verify(cache, train_dir, TEACHER, samples=8, device="cpu", repair=True)
    assert result["top1_agreement"] == 1.0
    after = arrays(cache)
    for name, want in before.items():
        assert np.array_equal(after[name], want), name  # repaired to the very same bytes


def test_trainer_refuses_a_damaged_unit(tmp_path, train_dir, val_dir, tiny_cache):
    cache = copy_tree(tiny_cache, tmp_path / "c.zarr")
    flip_byte(chunk_file(cache, "topk_index", 0, 1))
    cfg = TrainConfig(
        data=train_dir,
        val=val_dir,
        student="kdcache:tiny_cnn",
        out=str(tmp_path / "run"),
        epochs=1,
        teacher_mode="cached",
        cache=cache,
        image_size=16,
        batch_size=8,
        workers=0,
        device="cpu",
    )
    with pytest.raises(CacheDamagedError, match="'topk_index', epoch 0 unit 1"):
        fit(cfg)


def test_a_lost_shard_file_is_damage(tmp_path, train_dir, tiny_cache):
    cache = copy_tree(tiny_cache, tmp_path / "c.zarr")
    os.remove(chunk_file(cache, "status", 0, 2))  # a committed unit whose rows vanished
    with pytest.raises(CacheDamagedError, match="status epoch 0 unit 2"):
        verify(cache, train_dir, TEACHER, samples=4, device="cpu")


# -- bad inputs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_labels(tmp_path_factory) -> str:
    """One shard: 6 good samples, one without a label, one with label 99 (outside 10 classes)."""
    out = tmp_path_factory.mktemp("odd")
    write_split(out, "train", (6,), seed=3)
    from conftest import synthetic_image

    rng = np.random.default_rng(0)
    writer = ShardWriter(str(out), "extra", 2)
    writer.write("nolabel-0", synthetic_image(rng, 1, (20, 20)), "png", 0)
    writer.write("far-0", synthetic_image(rng, 2, (20, 20)), "png", 99)
    writer.close()
    # Strip the label of the first sample by rewriting its .cls member as empty text.
    import io
    import tarfile

    path = os.path.join(out, "extra-000000.tar")
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            if m.name == "nolabel-0.cls":
                continue
            tar.addfile(m, io.BytesIO(data))
    return os.path.join(str(out), "*.tar")  # a glob: a directory of two prefixes is refused


def test_missing_and_out_of_range_labels_are_good_rows(odd_labels, tmp_path, val_dir):
    """Distillation needs no labels: such rows are cached, trained on, and pass --strict."""
    out = str(tmp_path / "c.zarr")
    summary = precompute(
        cache_config(odd_labels, out, epochs=1, num_classes=10, views="consistent", strict=True)
    )
    assert summary["bad_rows"] == 0 and summary["bad_rows_by_reason"] == {}
    status = open_cache(out).read_unit(0, 0)["status"]  # extra-000000.tar sorts first
    assert status.tolist() == [schema.OK, schema.OK]
    kw = dict(
        data=odd_labels,
        val=val_dir,
        student="kdcache:tiny_cnn",
        epochs=1,
        cache=out,
        image_size=16,
        batch_size=4,
        workers=0,
        device="cpu",
    )
    result = fit(TrainConfig(out=str(tmp_path / "run"), strict=True, **kw))
    assert result["skipped_rows"] == 0 and np.isfinite(result["train_loss"])


def test_hard_labels_need_labels_in_range_and_say_which(odd_labels, tmp_path, val_dir):
    code, _, err = run_cli(
        "train",
        "--data",
        odd_labels,
        "--val",
        val_dir,
        "--student",
        "kdcache:tiny_cnn",
        "--out",
        tmp_path / "run",
        "--epochs",
        "1",
        "--teacher-mode",
        "none",
        "--image-size",
        "16",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--num-classes",
        "10",
    )
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1, err
    assert "2 samples" in lines[0] and "sample 0 (position 0 of shard extra-000000.tar)" in lines[0]
    assert "no label" in lines[0] and "Traceback" not in err


def test_truncated_shard_is_named(tmp_path, train_dir):
    data = copy_tree(train_dir, tmp_path / "train")
    path = os.path.join(data, sorted(os.listdir(data))[1])
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    code, _, stderr = run_cli("index", data, "--rebuild")
    assert code == 2 and os.path.basename(path) in stderr and "Traceback" not in stderr


def test_truncated_and_empty_images_are_bad_rows(tmp_path, val_dir):
    from conftest import synthetic_image

    rng = np.random.default_rng(4)
    writer = ShardWriter(str(tmp_path / "data"), "train", 8)
    for n in range(8):
        data = synthetic_image(rng, n % 10, (24, 24))
        if n == 2:
            data = data[: len(data) // 2]  # truncated: the header still gives a size
        if n == 5:
            data = b""  # an empty file
        writer.write(f"t-{n}", data, "png", n % 10)
    writer.close()
    data = str(tmp_path / "data")
    cache = str(tmp_path / "c.zarr")
    summary = precompute(cache_config(data, cache, epochs=1, num_classes=10, views="consistent"))
    assert summary["bad_rows"] == 2
    assert summary["bad_rows_by_reason"] == {"no image": 1, "undecodable": 1}
    status = open_cache(cache).read_unit(0, 0)["status"]
    assert status[2] == schema.UNDECODABLE and status[5] == schema.NO_IMAGE
    assert (np.delete(status, [2, 5]) == schema.OK).all()
    with pytest.raises(KdcacheError, match="--strict.*undecodable"):
        precompute(cache_config(data, str(tmp_path / "s.zarr"), epochs=1, strict=True))
    kw = dict(
        data=data,
        val=val_dir,
        student="kdcache:tiny_cnn",
        epochs=1,
        teacher_mode="cached",
        cache=cache,
        image_size=16,
        batch_size=4,
        workers=0,
        device="cpu",
    )
    result = fit(TrainConfig(out=str(tmp_path / "run"), **kw))
    assert result["skipped_rows"] == 2
    with pytest.raises(KdcacheError, match="--strict"):
        fit(TrainConfig(out=str(tmp_path / "strict"), strict=True, **kw))


def test_full_disk_is_one_line_and_the_job_resumes(tmp_path, train_dir, monkeypatch):
    """A store that runs out of space (ENOSPC from the writer thread): a clear message, exit 2,
    and the same command finishes the cache once there is room again."""
    import errno

    from kdcache.cache_writer import CacheWriter

    out = str(tmp_path / "c.zarr")
    real = CacheWriter.write_block
    calls = {"n": 0}

    def full_after_two(self, unit, epochs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device", out)
        real(self, unit, epochs)

    monkeypatch.setattr(CacheWriter, "write_block", full_after_two)
    argv = (
        "precompute",
        "--data",
        train_dir,
        "--teacher",
        TEACHER,
        "--out",
        out,
        "--epochs",
        2,
        "--teacher-image-size",
        16,
        "--workers",
        0,
        "--device",
        "cpu",
        "--batch-size",
        8,
    )
    code, _, stderr = run_cli(*argv)
    assert code == 2 and "No space left on device" in stderr and "Traceback" not in stderr
    assert open_cache(out).done_mask().sum() == 4  # two blocks (units) of both epochs
    monkeypatch.setattr(CacheWriter, "write_block", real)
    code, _, _ = run_cli(*argv)
    assert code == 0 and open_cache(out).done_mask().all()
