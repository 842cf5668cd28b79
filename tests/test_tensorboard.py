"""TensorBoard scalars: with tensorboard installed (the ``tb`` extra) a run writes each epoch's
numeric metrics into OUT/tensorboard; without it, nothing."""

from __future__ import annotations

import json
import logging
import os
import sys

import pytest
from conftest import small_run

from kdcache.train import fit

cfg = small_run  # the shared two-epoch hard-label run (conftest)


def test_each_epochs_numeric_metrics_are_tensorboard_scalars(train_dir, val_dir, tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    fit(cfg(train_dir, val_dir, out))
    with open(out / "metrics.jsonl") as f:
        epochs = [json.loads(line) for line in f]
    events = accumulator.EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "val_accuracy", "lr", "images_per_s"} <= tags
    assert "epoch" not in tags and "cache_epoch" not in tags  # the step; None in this mode
    for tag in ("train_loss", "lr"):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([m[tag] for m in epochs], rel=1e-6)


def test_without_tensorboard_a_run_writes_none_and_says_it_in_debug(
    train_dir, val_dir, tmp_path, monkeypatch, caplog
):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises
    out = tmp_path / "run"
    with caplog.at_level(logging.DEBUG, logger="kdcache.train.trainer"):
        fit(cfg(train_dir, val_dir, out, epochs=1))
    assert not os.path.exists(out / "tensorboard")
    said = [r for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.DEBUG
    assert os.path.exists(out / "metrics.jsonl")


def test_epochs_an_earlier_process_wrote_are_replaced_not_doubled(train_dir, val_dir, tmp_path):
    tensorboard = pytest.importorskip("torch.utils.tensorboard")
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    stale = tensorboard.SummaryWriter(str(out / "tensorboard"))  # a run killed before its
    for epoch in (1, 2):  # checkpoint: its scalars stay, its logs are cut
        stale.add_scalar("train_loss", 1e3, epoch)
    stale.close()
    fit(cfg(train_dir, val_dir, out))
    events = accumulator.EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    with open(out / "metrics.jsonl") as f:
        losses = [json.loads(line)["train_loss"] for line in f]
    scalars = events.Scalars("train_loss")
    assert [s.step for s in scalars] == [1, 2]
    assert [s.value for s in scalars] == pytest.approx(losses, rel=1e-6)
