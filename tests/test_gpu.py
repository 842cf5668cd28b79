"""The CUDA paths (`pytest -m gpu` on a GPU machine; skipped without CUDA).

bf16 autocast, channels_last, pinned host copies, ``--compile`` and NCCL only run on a GPU. The
views must not depend on any of them (they are drawn and rendered on the CPU), and the cached
logits must be what the same teacher gives on that device.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from conftest import TEACHER, TEACHER_SIZE, cache_config

from kdcache import schema
from kdcache.cache import precompute
from kdcache.cache.verify import verify
from kdcache.train import TrainConfig, fit

DEVICE = "cuda"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
RECIPE = schema.VIEW_FIELDS + ("status",)


def group(path: str) -> zarr.Group:
    return zarr.open_group(path, mode="r")


@pytest.fixture(scope="module")
def gpu_cache(tmp_path_factory, train_dir) -> str:
    out = str(tmp_path_factory.mktemp("gpu") / "cuda.zarr")
    precompute(cache_config(train_dir, out, device=DEVICE))
    return out


def test_views_on_the_gpu_are_the_cpu_views(gpu_cache, tiny_cache):
    gpu, cpu = group(gpu_cache), group(tiny_cache)
    for name in RECIPE + tuple(f.name for f in schema.SAMPLE_FIELDS):
        assert np.array_equal(gpu[name][...], cpu[name][...]), name


def test_gpu_cache_verifies_on_the_gpu(gpu_cache, train_dir):
    result = verify(gpu_cache, train_dir, TEACHER, samples=32, device=DEVICE)
    # bf16 kernels may differ with the batch's shape: a near-tie of the random-init teacher may
    # flip, a wrong row or view would not agree at all.
    assert result["top1_agreement"] >= 0.9
    assert result["max_abs_logit_error"] < 0.1


def test_compiled_teacher_writes_the_same_cache(gpu_cache, train_dir, tmp_path):
    out = str(tmp_path / "compiled.zarr")
    precompute(cache_config(train_dir, out, device=DEVICE, compile=True))
    compiled, plain = group(out), group(gpu_cache)
    for name in RECIPE:
        assert np.array_equal(compiled[name][...], plain[name][...]), name
    ok = plain["status"][...] == schema.OK
    top1 = compiled["topk_index"][...][..., 0][ok] == plain["topk_index"][...][..., 0][ok]
    assert top1.mean() >= 0.9
    lse = np.abs(compiled["lse"][...][ok] - plain["lse"][...][ok])
    assert lse.max() < 0.1


@pytest.mark.parametrize("mode", ["cached", "online"])
def test_training_on_the_gpu(mode, gpu_cache, train_dir, val_dir, tmp_path):
    result = fit(
        TrainConfig(
            data=train_dir,
            val=val_dir,
            student="kdcache:tiny_cnn",
            out=str(tmp_path / mode),
            epochs=2,
            teacher_mode=mode,
            cache=gpu_cache if mode == "cached" else None,
            teacher=TEACHER if mode == "online" else None,
            views=None if mode == "cached" else "function_matching",
            teacher_image_size=TEACHER_SIZE,
            image_size=16,
            batch_size=8,
            workers=2,
            device=DEVICE,
        )
    )
    assert np.isfinite(result["train_loss"])
    lines = (tmp_path / mode / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["images_per_s"] > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs")
def test_two_ranks_on_nccl_write_the_same_views(gpu_cache, train_dir, tmp_path):
    from test_distributed import torchrun

    out = str(tmp_path / "nccl.zarr")
    torchrun(
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
        TEACHER_SIZE,
        "--workers",
        0,
        "--device",
        DEVICE,
        "--batch-size",
        8,
    )
    for name in RECIPE:
        assert np.array_equal(group(out)[name][...], group(gpu_cache)[name][...]), name
