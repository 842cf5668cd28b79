"""Shared fixtures: tiny WebDataset shards (synthetic RGB PNGs of varied sizes) and a tiny cache.

Everything is session-scoped and read-only; a test that changes data or a cache copies it first
(``copy_tree``) or makes its own.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdcache.cache import PrecomputeConfig, precompute
from kdcache.data.shards import ShardWriter

NUM_CLASSES = 10
TEACHER = "kdcache:tiny_cnn"
TEACHER_SIZE = 16
CACHE_EPOCHS = 2
# (height, width): varied on purpose, some outside the 3/4..4/3 aspect range.
SIZES = [(20, 28), (33, 24), (40, 40), (17, 31), (26, 26), (36, 22), (24, 30)]
TRAIN_SHARDS = (7, 7, 5)  # uneven units
VAL_SAMPLES = 6


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def synthetic_image(rng: np.random.Generator, label: int, size: tuple[int, int]) -> bytes:
    """A noisy image whose mean colour depends on the label (so a student can learn a bit)."""
    h, w = size
    base = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], dtype=np.int64)
    noise = rng.integers(-60, 60, size=(h, w, 3))
    return png(np.clip(base + noise, 0, 255).astype(np.uint8))


def write_split(out: Path, prefix: str, counts: tuple[int, ...], seed: int) -> list[str]:
    """Shards ``out/{prefix}-NNNNNN.tar`` of ``counts`` samples: all full but the last."""
    assert all(c == counts[0] for c in counts[:-1]) and counts[-1] <= counts[0]
    rng = np.random.default_rng(seed)
    writer = ShardWriter(str(out), prefix, counts[0])
    try:
        for n in range(sum(counts)):
            label = n % NUM_CLASSES
            writer.write(
                f"{prefix}-{n:05d}",
                synthetic_image(rng, label, SIZES[n % len(SIZES)]),
                "png",
                label,
            )
    finally:
        writer.close()
    return writer.paths


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    paths = write_split(root / "train", "train", TRAIN_SHARDS, seed=1)
    assert len(paths) == len(TRAIN_SHARDS)
    write_split(root / "val", "val", (VAL_SAMPLES,), seed=2)
    return root


@pytest.fixture(scope="session")
def train_dir(data_root) -> str:
    return str(data_root / "train")


@pytest.fixture(scope="session")
def val_dir(data_root) -> str:
    return str(data_root / "val")


def cache_config(data: str, out: str, **kw) -> PrecomputeConfig:
    """The tiny cache's precompute options; keyword arguments override."""
    opts = dict(
        data=data,
        teacher=TEACHER,
        out=out,
        epochs=CACHE_EPOCHS,
        teacher_image_size=TEACHER_SIZE,
        workers=0,
        device="cpu",
        batch_size=8,
        views="function_matching",
        command="pytest",
    )
    opts.update(kw)
    return PrecomputeConfig(**opts)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, train_dir) -> str:
    """A 2-epoch function_matching cache of the train shards (K = C = 10). Do not modify."""
    out = str(tmp_path_factory.mktemp("cache") / "tiny.zarr")
    summary = precompute(cache_config(train_dir, out))
    assert summary["epochs_complete"] == CACHE_EPOCHS
    assert summary["bad_rows"] == 0
    return out


def chunk_file(cache: str, array: str, epoch: int | None, unit: int) -> str:
    """The file holding one (epoch, unit) of an array (a chunk, or a shard of chunks)."""
    parts = [cache, array, "c"] + ([str(epoch)] if epoch is not None else []) + [str(unit)]
    path = os.path.join(*parts)
    while os.path.isdir(path):  # trailing dimensions add "/0"
        path = os.path.join(path, "0")
    return path


def flip_byte(path: str) -> None:
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        data[len(data) // 2] ^= 0xFF
        f.seek(0)
        f.write(data)


def copy_tree(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


# -- added for test_cli.py, test_modes.py, test_ablate.py ----------------------------------


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for the module: on a busy 2-core machine the tiny nets here run
    many times faster than with torch's default pool (threads spin against other work)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``kdcache.cli.main(argv)`` in-process -> (exit code, stdout, stderr).

    ``main`` points the ``kdcache`` logger at the current stderr and stops propagation; both
    are restored here so later tests (caplog) see the logger as it was.
    """
    import contextlib
    import logging

    from kdcache.cli import main

    logger = logging.getLogger("kdcache")
    state = (list(logger.handlers), logger.level, logger.propagate)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
    finally:
        logger.handlers[:] = state[0]
        logger.setLevel(state[1])
        logger.propagate = state[2]
    return code, out.getvalue(), err.getvalue()
