"""FFCV ``.beton`` files as a source: the tar shards' samples, units and pixels, their own
fingerprint, and every command (precompute, train, verify, eval, torchrun) reading them."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from conftest import TEACHER, TEACHER_SIZE, cache_config, run_cli, small_run

pytest.importorskip(
    "ffcv", reason="the ffcv extra is not installed (it builds against OpenCV and libjpeg-turbo)"
)

from kdcache.cache import precompute  # noqa: E402
from kdcache.cli.shards import write_beton  # noqa: E402
from kdcache.data import beton  # noqa: E402
from kdcache.data.index import load_index  # noqa: E402
from kdcache.data.webdataset import read_unit  # noqa: E402
from kdcache.errors import KdcacheError  # noqa: E402
from kdcache.train import fit  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def betons(tmp_path_factory, train_dir, val_dir) -> tuple[str, str]:
    out = tmp_path_factory.mktemp("beton")
    train = write_beton(f"shards:{train_dir}", str(out), "train")
    val = write_beton(f"shards:{val_dir}", str(out), "val")
    return train, val


def rows(path: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(path, mode="r")
    return {name: group[name][...] for name in group.array_keys() if name != "manifest"}


def test_a_beton_holds_the_shards_samples_as_units(betons, train_dir):
    tar, bet = load_index(train_dir), load_index(betons[0])
    assert bet.counts == tar.counts
    assert [u.name for u in bet.units] == [f"train.beton#{u}" for u in range(len(tar.units))]
    for name in ("key_hash", "label", "size"):
        assert np.array_equal(getattr(bet, name), getattr(tar, name)), name
    for u in range(len(tar.units)):  # the very image bytes, keys and labels
        want = [(s.key, s.data, s.label) for s in read_unit(tar.units[u].url)]
        assert [(s.key, s.data, s.label) for s in read_unit(bet.units[u].url)] == want
    # its own fingerprint: the units are hashed from the samples, not from tar bytes
    assert bet.fingerprint != tar.fingerprint


def test_precompute_from_a_beton_writes_the_tar_caches_rows(betons, tiny_cache, tmp_path):
    out = str(tmp_path / "beton.zarr")
    summary = precompute(cache_config(betons[0], out))
    assert summary["bad_rows"] == 0
    a, b = rows(tiny_cache), rows(out)
    assert a.keys() == b.keys()
    for name in a:  # views and teacher rows, bit for bit
        assert np.array_equal(a[name], b[name]), name


def test_a_tar_cache_is_refused_on_the_beton_of_its_data(betons, tiny_cache, val_dir, tmp_path):
    cfg = small_run(betons[0], val_dir, tmp_path / "run", teacher_mode="cached", cache=tiny_cache)
    with pytest.raises(KdcacheError, match="data_fingerprint") as e:
        fit(cfg)
    assert "A .beton and the tar shards it was made from have different fingerprints" in str(
        e.value
    )


def test_train_verify_and_eval_read_a_beton(betons, tmp_path):
    train, val = betons
    cache = str(tmp_path / "c.zarr")
    precompute(cache_config(train, cache))
    run = tmp_path / "run"
    code, out, err = run_cli(
        "train", "--data", train, "--val", val, "--student", "kdcache:tiny_cnn", "--out",
        str(run), "--epochs", "1", "--cache", cache, "--image-size", str(TEACHER_SIZE),
        "--batch-size", "8", "--workers", "1", "--device", "cpu", "--json",
    )  # fmt: skip
    assert code == 0, err
    code, out, err = run_cli(
        "verify", cache, "--data", train, "--teacher", TEACHER, "--device", "cpu", "--json"
    )
    assert code == 0, err
    assert '"top1_agreement": 1.0' in out
    code, out, err = run_cli("eval", str(run), "--data", val, "--device", "cpu", "--json")
    assert code == 0 and '"samples": 6' in out, err


def test_torchrun_precompute_from_a_beton_equals_one_process(betons, tmp_path):
    from test_distributed import torchrun

    one, two = str(tmp_path / "one.zarr"), str(tmp_path / "two.zarr")
    precompute(cache_config(betons[0], one))
    torchrun(
        "precompute", "--data", betons[0], "--teacher", TEACHER, "--out", two, "--epochs", 2,
        "--teacher-image-size", TEACHER_SIZE, "--workers", 0, "--device", "cpu",
        "--batch-size", 8, "--epochs-per-block", 1,
    )  # fmt: skip
    a, b = rows(one), rows(two)
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_a_beton_without_kdcaches_fields_says_how_to_write_one(tmp_path):
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    path = str(tmp_path / "other.beton")
    DatasetWriter(path, {"label": IntField()}, num_workers=1).from_indexed_dataset(
        [(i,) for i in range(4)]
    )
    with pytest.raises(KdcacheError, match="write it with `kdcache shards --to ffcv`"):
        beton.units(path)
    with pytest.raises(KdcacheError, match="no FFCV file at"):
        beton.units(str(tmp_path / "missing.beton"))


def test_shards_to_ffcv_from_digits_on_the_command_line(tmp_path):
    pytest.importorskip("sklearn")
    code, out, err = run_cli(
        "shards", "--from", "digits", "--to", "ffcv", "--out", str(tmp_path), "--limit", "40",
        "--shard-size", "16", "--json",
    )  # fmt: skip
    assert code == 0, err
    index = load_index(str(tmp_path / "train.beton"))
    assert index.counts == [16, 16, 8] and index.num_classes == 10
    code, _, err = run_cli("shards", "--from", "digits", "--to", "ffcv", "--out", str(tmp_path))
    assert code != 0 and "pass --overwrite" in err


def test_reading_a_beton_leaves_torchs_threads_alone(betons):
    """Importing ffcv sets torch's intra-op threads to 1 process-wide; kdcache puts them back
    (a fresh process: the import happens once)."""
    import subprocess
    import sys

    code = (
        "import torch; torch.set_num_threads(2); from kdcache.data.index import load_index; "
        f"load_index({betons[0]!r}); print(torch.get_num_threads())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "2"
