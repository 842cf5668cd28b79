"""Killed precompute jobs lose nothing: SIGKILL at fixed points, then the same command again.

The kill points are deterministic (``KDCACHE_FAULT``, see ``kdcache.faults``), so these tests are
neither flaky nor slow. After the re-run every array must be byte-identical to an uninterrupted
job's. Each runs with one epoch per block (a file per (epoch, unit)) and with two (a shard per
(block, unit), written whole: the 2-epoch job is one block per unit).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import zarr
from conftest import TEACHER, TEACHER_SIZE, cache_config

from kdcache.cache import precompute
from kdcache.store import open_cache

pytestmark = pytest.mark.faults


def run_precompute(
    train_dir: str,
    out: str,
    epochs: int,
    fault: str | None = None,
    sig: str | None = None,
    per_block: int = 1,
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "kdcache",
        "precompute",
        "--data",
        train_dir,
        "--teacher",
        TEACHER,
        "--out",
        out,
        "--epochs",
        str(epochs),
        "--teacher-image-size",
        str(TEACHER_SIZE),
        "--workers",
        "0",
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--epochs-per-block",
        str(per_block),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDCACHE_FAULT")}
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env["KDCACHE_FAULT"] = fault
    if sig:
        env["KDCACHE_FAULT_SIGNAL"] = sig
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def rerun(train_dir: str, out: str, epochs: int, per_block: int = 1) -> None:
    """The same command again, in-process (only the killed run needs its own process)."""
    cfg = cache_config(
        train_dir, out, epochs=epochs, batch_size=4, command="rerun", epochs_per_block=per_block
    )
    precompute(cfg)


def arrays(path: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(path, mode="r")
    return {name: group[name][...] for name in group.array_keys()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_dir) -> dict[int, dict[str, np.ndarray]]:
    """Uninterrupted caches of 1 and 2 epochs, made with the CLI's settings (one epoch per
    block: the arrays read the same whatever the block size, and test_blocks.py checks it)."""
    out = {}
    for epochs in (1, 2):
        path = str(tmp_path_factory.mktemp("ref") / "c.zarr")
        precompute(cache_config(train_dir, path, epochs=epochs, batch_size=4, command="ref"))
        out[epochs] = arrays(path)
    return out


@pytest.mark.parametrize(
    "fault, per_block",
    [("group", 1), ("create", 1)]  # before any block is written
    + [(f, b) for f in ("batch:3", "write:5", "commit:2", "committed:2") for b in (1, 2)],
)
def test_sigkill_then_rerun_gives_the_same_bytes(fault, per_block, tmp_path, train_dir, reference):
    out = str(tmp_path / "c.zarr")
    killed = run_precompute(train_dir, out, epochs=2, fault=fault, per_block=per_block)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    if os.path.exists(os.path.join(out, "zarr.json")) and fault not in ("group", "create"):
        done = open_cache(out).done_mask()
        assert not done.all()  # the kill really left work undone
        assert open_cache(out).epochs_per_block == per_block
    rerun(train_dir, out, epochs=2, per_block=per_block)
    got = arrays(out)
    assert got.keys() == reference[2].keys()
    for name, want in reference[2].items():
        assert np.array_equal(got[name], want), name


@pytest.mark.parametrize("per_block", [1, 2])
def test_sigkill_while_extending(per_block, tmp_path, train_dir, reference):
    out = str(tmp_path / "c.zarr")
    rerun(train_dir, out, epochs=1, per_block=per_block)
    killed = run_precompute(train_dir, out, epochs=2, fault="extend:3", per_block=per_block)
    assert killed.returncode == -signal.SIGKILL
    rerun(train_dir, out, epochs=2, per_block=per_block)
    got = arrays(out)
    for name, want in reference[2].items():
        assert np.array_equal(got[name], want), name


@pytest.mark.parametrize("fault", ["write:5", "commit:2", "committed:1"])
def test_sigkill_while_rewriting_a_block_cut_short(fault, tmp_path, train_dir, reference):
    """A 1-epoch cache of 2-epoch blocks, extended to 2: each unit's block is rewritten whole
    (epoch 0 read back, epoch 1 new). Killed mid-way, epoch 0 still reads as committed, and the
    rerun finishes the same bytes."""
    out = str(tmp_path / "c.zarr")
    rerun(train_dir, out, epochs=1, per_block=2)
    killed = run_precompute(train_dir, out, epochs=2, fault=fault, per_block=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    cache = open_cache(out)
    assert cache.done_mask()[0].all() and not cache.done_mask()[1].all()
    for unit in range(len(cache.units)):
        got = cache.read_unit(0, unit)  # checked against its manifest cell
        for name, values in got.items():
            want = reference[1][name][0, cache.unit_rows(unit)]
            assert np.array_equal(values, want), (name, unit)
    rerun(train_dir, out, epochs=2, per_block=2)
    got = arrays(out)
    for name, want in reference[2].items():
        assert np.array_equal(got[name], want), name


def test_sigterm_stops_cleanly_and_says_how_to_resume(tmp_path, train_dir, reference):
    out = str(tmp_path / "c.zarr")
    stopped = run_precompute(train_dir, out, epochs=2, fault="batch:4", sig="SIGTERM")
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert "re-run the same command to resume" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    done = open_cache(out).done_mask()
    assert 0 < done.sum() < done.size  # finished units were kept, the rest left for later
    rerun(train_dir, out, epochs=2)
    got = arrays(out)
    for name, want in reference[2].items():
        assert np.array_equal(got[name], want), name
