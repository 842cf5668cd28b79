"""The student loop: every teacher mode trains, the run directory is complete, resume is exact."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from conftest import (
    NUM_CLASSES,
    TEACHER,
    TEACHER_SIZE,
    cache_config,
    cached_batch,
    cached_probs,
    center_logits,
    epoch_batches,
    fresh_views,
    initial_logits,
    kl_by_hand,
    loss_tolerance,
    mixed_ce_by_hand,
    read_metrics,
    read_steps,
    render_rows,
    teacher_probs,
)

from kdcache.cache import precompute
from kdcache.cli.shards import write_shards
from kdcache.data.index import load_index
from kdcache.errors import KdcacheError
from kdcache.models import create_model
from kdcache.render import IMAGENET
from kdcache.store import open_cache
from kdcache.train import fit
from kdcache.train.config import TrainConfig

STUDENT = "kdcache:tiny_cnn"


def train_cfg(
    train_dir: str, val_dir: str, out, mode: str, cache: str | None = None, **kw
) -> TrainConfig:
    opts = dict(
        data=train_dir,
        val=val_dir,
        student=STUDENT,
        out=str(out),
        epochs=1,
        teacher_mode=mode,
        cache=cache if mode == "cached" else None,
        teacher=TEACHER if mode == "online" else None,
        image_size=TEACHER_SIZE,
        batch_size=8,
        workers=0,
        device="cpu",
        seed=3,
        command="pytest",
    )
    opts.update(kw)
    return TrainConfig(**opts)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_dir, val_dir, tiny_cache) -> dict[str, str]:
    """One finished 1-epoch run per teacher mode."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for mode in ("cached", "online", "none"):
        out[mode] = str(root / mode)
        fit(train_cfg(train_dir, val_dir, out[mode], mode, tiny_cache))
    return out


@pytest.mark.parametrize("mode", ["cached", "online", "none"])
def test_run_directory(runs, mode, val_dir):
    out = runs[mode]
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "model.pt"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["teacher_mode"] == mode and config["num_classes"] == NUM_CLASSES
    assert config["view_spec"]["name"] == "function_matching"
    (metrics,) = read_metrics(out)
    assert metrics["epoch"] == 1
    for key in ("train_loss", "images_per_s", "seconds"):
        assert isinstance(metrics[key], float), key
    assert metrics["train_loss"] > 0 and torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert ("teacher_agreement" in metrics) == (mode == "online")
    checkpoint = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert checkpoint["epoch"] == 1
    assert {"model", "optimizer", "schedule", "rng"} <= checkpoint.keys()
    # model.pt loads as --student-weights / --teacher-weights
    model = create_model(STUDENT, NUM_CLASSES, os.path.join(out, "model.pt"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, checkpoint["model"][name]), name
    # The val scores (DESIGN.md's key names) are those of model.pt on the val center views.
    val = load_index(val_dir)
    pred = center_logits(model, val, TEACHER_SIZE).argmax(1)
    label = torch.from_numpy(val.label)
    assert metrics["accuracy_basis"] == "labels"
    assert metrics["val_accuracy"] == int((pred == label).sum()) / val.num_samples
    if mode == "online":
        teacher = create_model(TEACHER, NUM_CLASSES).eval()
        best = center_logits(teacher, val, TEACHER_SIZE).argmax(1)
        assert metrics["teacher_agreement"] == int((pred == best).sum()) / val.num_samples


def first_step_loss_by_hand(cfg: TrainConfig, cache: str | None = None) -> float:
    """Step 1 of a fresh one-process run of ``cfg``, computed from its parts: the first batch's
    samples from the plan, their views (the cache's in cached mode, else fresh from the view
    generator), rendered; the initial student (``--seed``) on them; the loss against the cache
    rows' distribution, the live teacher's (on the student's very view), or the mixed labels."""
    index = load_index(cfg.data)
    rows = epoch_batches(index, cfg, 0)[0]
    if cfg.teacher_mode == "cached":
        views, targets = cached_batch(open_cache(cache), index, rows, 0)
    else:
        views = fresh_views(index, rows, "function_matching", 0, 0)
    with open(os.path.join(cfg.out, "config.json")) as f:
        assert json.load(f)["student_input"] == IMAGENET.identity()  # a built-in student
    pixels = render_rows(index, rows, views, cfg.image_size, IMAGENET)
    logits = initial_logits(cfg.student, NUM_CLASSES, cfg.seed, pixels)
    if cfg.teacher_mode == "none":
        partner = np.where(views.partner >= 0, views.partner, rows)
        loss = mixed_ce_by_hand(logits, index.label[rows], index.label[partner], views.lam)
        shuffled = mixed_ce_by_hand(logits, index.label[partner], index.label[rows], views.lam)
    else:
        p = cached_probs(targets, NUM_CLASSES) if cache else teacher_probs(pixels)
        loss = kl_by_hand(logits, p, cfg.temperature)
        shuffled = kl_by_hand(logits, p.roll(1, 0), cfg.temperature)
    # the check can tell: targets paired with the wrong rows give another loss
    assert abs(shuffled - loss) > 10 * loss_tolerance(loss, cfg.temperature), (shuffled, loss)
    return loss


@pytest.mark.parametrize("mode", ["cached", "online", "none"])
def test_first_step_loss_is_the_loss_by_hand(runs, mode, train_dir, val_dir, tiny_cache):
    """cached: KL(cache rows || student) on the cache's views; online: KL(live teacher ||
    student) on one view; none: cross-entropy with the mixed labels."""
    cfg = train_cfg(train_dir, val_dir, runs[mode], mode, tiny_cache)
    first = read_steps(runs[mode])[0]
    assert (first["epoch"], first["step"]) == (1, 1)
    want = first_step_loss_by_hand(cfg, tiny_cache if mode == "cached" else None)
    assert abs(first["loss"] - want) <= loss_tolerance(want, cfg.temperature), (first, want)


def test_cached_loss_by_hand_with_temperature_and_tail(tmp_path, train_dir, val_dir):
    """K < C (the tail's mass spread over the other classes) and T = 2 (times T^2)."""
    cache = str(tmp_path / "top4.zarr")
    precompute(cache_config(train_dir, cache, topk=4, epochs=1))
    assert open_cache(cache).topk == 4
    out = tmp_path / "run"
    cfg = train_cfg(train_dir, val_dir, out, "cached", cache, temperature=2.0, limit=12, seed=5)
    fit(cfg)
    first = read_steps(out)[0]
    want = first_step_loss_by_hand(cfg, cache)
    assert abs(first["loss"] - want) <= loss_tolerance(want, cfg.temperature), (first, want)


def test_loss_falls_and_accuracy_rises_on_digits(tmp_path):
    """On 400 real digits (16 px center views, hard labels) three epochs cut the loss by more
    than half and score well above chance on the 360 val digits (here: 0.29x, 0.92)."""
    data = str(tmp_path / "digits")
    write_shards("digits", data, "train", shard_size=200, limit=400)
    write_shards("digits", data, "val", shard_size=200)
    out = tmp_path / "run"
    cfg = TrainConfig(
        data=f"{data}/train-*.tar",
        val=f"{data}/val-*.tar",
        student=STUDENT,
        out=str(out),
        epochs=3,
        teacher_mode="none",
        views="center",
        image_size=16,
        batch_size=32,
        lr=1e-2,
        warmup=0.5,
        workers=0,
        device="cpu",
        command="pytest",
    )
    fit(cfg)
    metrics = read_metrics(out)
    first, last = metrics[0], metrics[-1]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert last["train_loss"] < 0.5 * first["train_loss"], metrics
    assert last["val_accuracy"] > 0.6, metrics  # 10 classes: chance is 0.1
    steps = read_steps(out)
    assert len(steps) == 3 * 13  # ceil(400 / 32) steps an epoch (the last one wraps around)


def test_cached_and_online_losses_agree_when_k_is_c(runs):
    """K = C: the cached target is the live teacher's up to fp16 rounding of its logits."""
    cached = read_metrics(runs["cached"])[0]["train_loss"]
    online = read_metrics(runs["online"])[0]["train_loss"]
    assert abs(cached - online) < 1e-3, (cached, online)
    assert abs(cached - online) <= 1e-3 * abs(online), (cached, online)  # the loss is small here


def test_existing_run_needs_resume(runs, train_dir, val_dir, tiny_cache):
    with pytest.raises(KdcacheError, match="--resume"):
        fit(train_cfg(train_dir, val_dir, runs["cached"], "cached", tiny_cache))


def test_resume_continues_exactly(tmp_path, train_dir, val_dir, tiny_cache):
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    fit(train_cfg(train_dir, val_dir, resumed, "cached", tiny_cache, epochs=1))
    fit(
        train_cfg(
            train_dir, val_dir, resumed, "cached", tiny_cache, epochs=2, resume=True, extend=True
        )
    )
    fit(train_cfg(train_dir, val_dir, straight, "cached", tiny_cache, epochs=2))
    a, b = read_metrics(resumed), read_metrics(straight)
    assert [m["epoch"] for m in a] == [1, 2] and [m["epoch"] for m in b] == [1, 2]
    for x, y in zip(a, b, strict=True):
        assert x["train_loss"] == y["train_loss"], (x, y)
        assert x["val_accuracy"] == y["val_accuracy"]
        assert x["cache_epoch"] == y["cache_epoch"]
    assert [m["cache_epoch"] for m in a] == [0, 1]
    sa = torch.load(os.path.join(resumed, "model.pt"), weights_only=True)
    sb = torch.load(os.path.join(straight, "model.pt"), weights_only=True)
    for name in sb:
        assert torch.equal(sa[name], sb[name]), name


def test_cached_epochs_are_cycled(tmp_path, train_dir, val_dir, tiny_cache, caplog):
    with caplog.at_level(logging.WARNING, logger="kdcache"):
        fit(
            train_cfg(train_dir, val_dir, tmp_path / "run", "cached", tiny_cache, epochs=3, lr=1e-4)
        )
    assert [m["cache_epoch"] for m in read_metrics(tmp_path / "run")] == [0, 1, 0]
    assert "cycled" in caplog.text


def test_online_needs_a_teacher(tmp_path, train_dir, val_dir):
    with pytest.raises(KdcacheError, match="--teacher"):
        fit(train_cfg(train_dir, val_dir, tmp_path / "run", "online", teacher=None))


class _Killed(Exception):
    pass


@pytest.mark.parametrize("stop_after", [2, 5, 7])  # mid-epoch 1, at the epoch end, mid-epoch 2
def test_mid_epoch_resume_reproduces_every_step(
    tmp_path, train_dir, val_dir, tiny_cache, monkeypatch, stop_after
):
    from kdcache.train import trainer

    kw = dict(epochs=2, batch_size=4, checkpoint_every=1)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fit(train_cfg(train_dir, val_dir, straight, "cached", tiny_cache, **kw))

    real = trainer._Saver.checkpoint
    calls = {"n": 0}

    def checkpoint_then_die(self, pos):
        real(self, pos)
        calls["n"] += 1
        if calls["n"] == stop_after:
            raise _Killed  # as if killed right after the checkpoint was written

    monkeypatch.setattr(trainer._Saver, "checkpoint", checkpoint_then_die)
    with pytest.raises(_Killed):
        fit(train_cfg(train_dir, val_dir, resumed, "cached", tiny_cache, **kw))
    monkeypatch.setattr(trainer._Saver, "checkpoint", real)
    fit(train_cfg(train_dir, val_dir, resumed, "cached", tiny_cache, resume=True, **kw))

    assert read_steps(resumed) == read_steps(straight)  # every step's loss, bit for bit
    a, b = read_metrics(resumed), read_metrics(straight)
    assert [m["train_loss"] for m in a] == [m["train_loss"] for m in b]
    sa = torch.load(os.path.join(resumed, "model.pt"), weights_only=True)
    sb = torch.load(os.path.join(straight, "model.pt"), weights_only=True)
    for name in sb:
        assert torch.equal(sa[name], sb[name]), name
