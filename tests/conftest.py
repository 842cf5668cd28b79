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
from kdcache.cli.shards import ShardWriter
from kdcache.store import open_cache

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
        # One epoch per block: a file per (epoch, unit), which the damage tests aim at; the
        # block layout has its own tests (test_blocks.py, test_faults.py).
        epochs_per_block=1,
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
    """The file holding one (epoch, unit) of an array (a chunk, or a shard of chunks: in a cache
    of epoch blocks, the shard of the epoch's block)."""
    block = epoch
    if epoch is not None:
        block = epoch // open_cache(cache).epochs_per_block
    parts = [cache, array, "c"] + ([str(block)] if block is not None else []) + [str(unit)]
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
            try:
                code = main([str(a) for a in argv])
            except SystemExit as e:  # argparse's own errors (and --help) exit, as in a shell
                code = e.code
    finally:
        logger.handlers[:] = state[0]
        logger.setLevel(state[1])
        logger.propagate = state[2]
    return code, out.getvalue(), err.getvalue()


# -- added for test_train.py and test_modes.py: a run's steps rebuilt by hand ---------------
#
# The trainer's batches, pixels and targets are rebuilt here from the public pieces (the plan,
# the view generator or the cache rows, the renderer) and the losses computed with plain torch
# ops, so a test can compare them with what a run wrote to steps.jsonl.


def read_jsonl(run, name: str) -> list[dict]:
    import json

    with open(os.path.join(str(run), name)) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_metrics(run) -> list[dict]:
    return read_jsonl(run, "metrics.jsonl")


def read_steps(run) -> list[dict]:
    return read_jsonl(run, "steps.jsonl")


def epoch_batches(index, cfg, epoch: int) -> list[np.ndarray]:
    """The batches (global sample indices) of ``epoch`` as a one-process run of ``cfg`` draws
    them: the order from ``cfg.seed`` and ``cfg.window``, cut to ``cfg.limit``."""
    from kdcache.train.order import epoch_order, rank_batches

    order = epoch_order(index.counts, cfg.seed, epoch, cfg.window)
    if cfg.limit is not None:
        order = order[order < cfg.limit]
    return rank_batches(order, cfg.batch_size)


def _stack_views(parts: list):
    from kdcache.views import Views

    return Views.concat(parts)


def fresh_views(index, rows, preset: str, plan_seed: int, epoch: int, stream: int = 0):
    """The views of global samples ``rows``, straight from the view generator."""
    from kdcache.replay import fresh_unit_views
    from kdcache.views import get_spec

    spec, parts = get_spec(preset), []
    for r in np.asarray(rows, dtype=np.int64):
        unit = index.unit_index_of(int(r))
        views, usable = fresh_unit_views(index, unit, spec, plan_seed, epoch, stream)
        pos = int(r) - index.units[unit].start
        assert usable[pos]
        parts.append(views.take([pos]))
    return _stack_views(parts)


def cached_batch(cache, index, rows, epoch: int):
    """(views, {topk_logits, topk_index, lse}) of global samples ``rows`` in cache ``epoch``."""
    from kdcache.replay import TARGET_FIELDS, cached_unit_views

    parts, targets = [], {name: [] for name in TARGET_FIELDS}
    for r in np.asarray(rows, dtype=np.int64):
        unit = index.unit_index_of(int(r))
        views, ok, rows_of_unit = cached_unit_views(cache, index, unit, epoch)
        pos = int(r) - index.units[unit].start
        assert ok[pos]
        parts.append(views.take([pos]))
        for name in TARGET_FIELDS:
            targets[name].append(rows_of_unit[name][pos])
    return _stack_views(parts), {name: np.stack(v) for name, v in targets.items()}


def render_rows(index, rows, views, size: int, convention=None):
    """``views`` of global samples ``rows`` rendered as the trainer renders them (images and
    mixing partners decoded from the shards)."""
    from kdcache.render import IMAGENET, render_views
    from kdcache.units import UnitReader

    rows = np.asarray(rows, dtype=np.int64)
    needed = set(rows.tolist()) | {int(p) for p in views.partner if p >= 0}
    images, failed = UnitReader(index).decode(sorted(needed))
    assert not failed
    return render_views(views, rows, images, size, convention or IMAGENET)


def initial_logits(spec: str, num_classes: int, seed: int, pixels):
    """A fresh run's student (``--seed``, train mode: batch statistics) on ``pixels``."""
    import torch

    from kdcache.models import create_model

    model = create_model(spec, num_classes, seed=seed).train()
    with torch.no_grad():
        return model(pixels).float()


def teacher_probs(pixels, spec: str = TEACHER, seed: int = 0):
    """A live teacher's (B, C) probabilities on ``pixels`` (eval mode, as the trainer runs it)."""
    import torch

    from kdcache.models import create_model

    model = create_model(spec, NUM_CLASSES, seed=seed).eval()
    with torch.no_grad():
        return torch.softmax(model(pixels).double(), 1)


def cached_probs(targets: dict[str, np.ndarray], num_classes: int):
    """Cache rows -> the dense (B, C) teacher distribution they stand for."""
    import torch

    from kdcache.targets import from_topk

    return from_topk(
        torch.from_numpy(targets["topk_logits"]),
        torch.from_numpy(targets["topk_index"]),
        torch.from_numpy(targets["lse"]),
        num_classes,
    ).dense()


def kl_by_hand(student_logits, teacher_p, temperature: float = 1.0) -> float:
    """Mean over rows of KL(p_T || q_T) * T^2 in float64: p_T is the teacher's distribution
    sharpened or softened by T (p^(1/T), renormalised), q_T = softmax(logits / T)."""
    import torch

    t = float(temperature)
    log_pt = torch.log_softmax(teacher_p.double().log() / t, 1)  # p = 0 stays 0
    log_qt = torch.log_softmax(student_logits.double() / t, 1)
    pt = log_pt.exp()
    terms = torch.where(pt > 0, pt * (log_pt - log_qt), torch.zeros_like(pt))
    return float(terms.sum(1).mean()) * t * t


def mixed_ce_by_hand(student_logits, label, partner_label, lam) -> float:
    """Mean over rows of -(lam log q[label] + (1 - lam) log q[partner_label]) in float64."""
    import torch

    logq = torch.log_softmax(student_logits.double(), 1)
    label, partner_label = torch.as_tensor(label).long(), torch.as_tensor(partner_label).long()
    lam = torch.as_tensor(np.asarray(lam, dtype=np.float64))
    own = logq.gather(1, label[:, None])[:, 0]
    other = logq.gather(1, partner_label[:, None])[:, 0]
    return float(-(lam * own + (1 - lam) * other).mean())


def center_logits(model, index, size: int, convention=None):
    """``model``'s logits (eval mode) on the center views of every sample of ``index``."""
    import torch

    rows = np.arange(index.num_samples)
    pixels = render_rows(index, rows, fresh_views(index, rows, "center", 0, 0), size, convention)
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(pixels).float()
    model.train(was)
    return out


def loss_tolerance(loss: float, temperature: float = 1.0) -> float:
    """How close a run's float32 loss is to the float64 one by hand: 1e-5 relative, or a few
    float32 ulps of T^2 log C: the trainer computes the KL as H(p, q) - H(p), two terms of
    about T^2 log C each, so on a small KL its rounding error is absolute (2.5e-5 relative on a
    KL of 0.028 at T = 2)."""
    import math

    import torch

    ulps = 4 * torch.finfo(torch.float32).eps * temperature**2 * math.log(NUM_CLASSES)
    return max(1e-5 * abs(loss), ulps)


def small_run(train_dir: str, val_dir: str, out, **kw):
    """A two-epoch hard-label run of tiny_cnn at 16 px on CPU; keyword arguments override."""
    from kdcache.train.config import TrainConfig

    opts = dict(
        data=train_dir,
        val=val_dir,
        student="kdcache:tiny_cnn",
        out=str(out),
        epochs=2,
        teacher_mode="none",
        image_size=16,
        batch_size=8,
        workers=0,
        device="cpu",
        seed=3,
        command="pytest",
    )
    opts.update(kw)
    return TrainConfig(**opts)


def assert_teacher_reproduces(teacher, pixels, item, k: int) -> int:
    """Re-run ``teacher`` on ``pixels``: its top-k must be the batch's cached top-k (indices
    exactly, logits within one fp16 ulp). -> how many rows agree on top-1 (all of them)."""
    import torch

    from kdcache.runtime import topk_rows

    with torch.no_grad():
        logits = teacher(pixels).float()
    fresh = topk_rows(logits, k)
    assert torch.equal(fresh["topk_index"].to(item["topk_index"].dtype), item["topk_index"])
    stored = item["topk_logits"].float()
    ulp = torch.finfo(torch.float16).eps * stored.abs().clamp_min(2.0**-14)
    assert ((logits.gather(1, item["topk_index"].long()) - stored).abs() <= ulp).all()
    return int((logits.argmax(1) == item["topk_index"][:, 0].long()).sum())


def model_input(item: dict, name: str = "pixels", convention=None):
    """A batch's pixels as the model reads them on the CPU (:func:`kdcache.pixels.take`)."""
    from kdcache import pixels
    from kdcache.render import IMAGENET

    return pixels.take(item, name, convention or IMAGENET, "cpu")
