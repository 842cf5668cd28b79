"""torchrun with 2 processes on CPU (gloo): both stages split their work and agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import zarr
from conftest import TEACHER, TEACHER_SIZE, cache_config

from kdcache.cache import precompute
from kdcache.train.order import epoch_order, rank_batches


def torchrun(*argv: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "kdcache",
        *map(str, argv),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def arrays(path: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(path, mode="r")
    return {name: group[name][...] for name in group.array_keys()}


def test_rank_batches_split_every_global_batch():
    order = epoch_order([7, 7, 5], seed=3, epoch=1, window=2)
    one = rank_batches(order, 8, world=1)
    two = [rank_batches(order, 8, world=2, rank=r) for r in range(2)]
    assert len(two[0]) == len(two[1]) == len(one)  # every rank takes the same steps
    for step, batch in enumerate(one):
        assert np.array_equal(np.concatenate([two[0][step], two[1][step]]), batch)


def test_precompute_two_ranks_equals_one_and_resumes_with_another_world(tmp_path, train_dir):
    single = str(tmp_path / "one.zarr")
    precompute(cache_config(train_dir, single, epochs=2))
    # Epoch 0 by one process, then extended to 2 epochs by two ranks: the same bytes.
    mixed = str(tmp_path / "mixed.zarr")
    precompute(cache_config(train_dir, mixed, epochs=1))
    common = [
        "--data",
        train_dir,
        "--teacher",
        TEACHER,
        "--out",
        mixed,
        "--teacher-image-size",
        TEACHER_SIZE,
        "--workers",
        0,
        "--device",
        "cpu",
        "--batch-size",
        8,
    ]
    torchrun("precompute", *common, "--epochs", 2)
    a, b = arrays(single), arrays(mixed)
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_train_two_ranks(tmp_path, train_dir, val_dir, tiny_cache):
    out = tmp_path / "run"
    torchrun(
        "train",
        "--data",
        train_dir,
        "--val",
        val_dir,
        "--student",
        "kdcache:tiny_cnn",
        "--out",
        out,
        "--epochs",
        2,
        "--teacher-mode",
        "cached",
        "--cache",
        tiny_cache,
        "--image-size",
        12,
        "--batch-size",
        8,
        "--workers",
        0,
        "--device",
        "cpu",
    )
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # written by rank 0 only
    last = json.loads(lines[-1])
    assert np.isfinite(last["train_loss"]) and 0 <= last["val_accuracy"] <= 1
    assert (out / "model.pt").exists() and (out / "checkpoint.pt").exists()


def test_feature_distillation_two_ranks(tmp_path, train_dir, val_dir):
    """A fitnet regressor under DDP: trained on both ranks, in the checkpoint, finite."""
    import torch

    out = tmp_path / "run"
    torchrun("train", "--data", train_dir, "--val", val_dir, "--student", "kdcache:tiny_cnn",
             "--out", out, "--epochs", 1, "--teacher-mode", "online", "--teacher",
             "kdcache:resnet_s", "--features", "4=5", "--loss", "kl+fitnet+rkd",
             "--image-size", 12, "--batch-size", 8, "--limit", 16, "--workers", 0,
             "--device", "cpu")  # fmt: skip
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(last["train_loss"])
    state = torch.load(out / "checkpoint.pt", weights_only=False)["feature_loss"]
    assert state["terms.0.regressors.0.weight"].shape == (64, 32, 1, 1)
