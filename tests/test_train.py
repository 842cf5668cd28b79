"""The student loop: every teacher mode trains, the run directory is complete, resume is exact."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from conftest import NUM_CLASSES, TEACHER, TEACHER_SIZE

from kdcache.errors import KdcacheError
from kdcache.models import create_model
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


def read_metrics(out) -> list[dict]:
    with open(os.path.join(str(out), "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


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
def test_run_directory(runs, mode):
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
    assert 0.0 <= metrics["val_accuracy"] <= 1.0  # DESIGN.md's key names
    assert ("teacher_agreement" in metrics) == (mode == "online")
    checkpoint = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert checkpoint["epoch"] == 1
    assert {"model", "optimizer", "schedule", "rng"} <= checkpoint.keys()
    # model.pt loads as --student-weights / --teacher-weights
    model = create_model(STUDENT, NUM_CLASSES, os.path.join(out, "model.pt"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, checkpoint["model"][name]), name


def test_modes_really_differ(runs):
    losses = {mode: read_metrics(out)[0]["train_loss"] for mode, out in runs.items()}
    assert losses["none"] != losses["cached"]  # hard labels vs teacher targets


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


def read_steps(run) -> list[dict]:
    with open(os.path.join(run, "steps.jsonl")) as f:
        return [json.loads(line) for line in f]


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
