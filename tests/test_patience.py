"""Long schedules on a cache: ``--reuse sample`` (a cached epoch per sample and student epoch),
``--eval-every`` and ``best.pt``."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from conftest import TEACHER_SIZE, small_run

from kdcache.data.index import load_index
from kdcache.replay import cached_unit_views, sampled_cache_epochs, sampled_unit_views
from kdcache.store import open_cache
from kdcache.train import fit
from kdcache.train.trainer import read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sampled_cache_epochs_are_a_pure_uniform_function():
    epochs = (0, 1, 2, 3, 4)
    idx = np.arange(20000)
    a = sampled_cache_epochs(3, 7, idx, epochs)
    assert np.array_equal(a, sampled_cache_epochs(3, 7, idx, epochs))
    assert np.array_equal(a[[5, 900]], sampled_cache_epochs(3, 7, np.array([5, 900]), epochs))
    counts = np.bincount(a, minlength=5)
    assert counts.min() > 0.95 * len(idx) / 5  # uniform over the cached epochs
    assert (a != sampled_cache_epochs(3, 8, idx, epochs)).mean() > 0.7  # a new draw per epoch
    assert (a != sampled_cache_epochs(4, 7, idx, epochs)).mean() > 0.7  # and per plan seed
    assert set(sampled_cache_epochs(0, 0, idx, (2, 5))) == {2, 5}


def test_a_sampled_unit_replays_each_samples_own_cache_epoch(tiny_cache, train_dir):
    cache, index = open_cache(tiny_cache), load_index(train_dir)
    for unit in range(len(index.units)):
        views, ok, targets = sampled_unit_views(cache, index, unit, 5, (0, 1))
        u = index.units[unit]
        chosen = sampled_cache_epochs(cache.plan_seed, 5, u.start + np.arange(u.count), (0, 1))
        for e in (0, 1):
            v, usable, rows = cached_unit_views(cache, index, unit, e)
            mine = chosen == e
            for name in ("seed", "box", "flip", "partner", "partner_box", "lam"):
                assert np.array_equal(getattr(views, name)[mine], getattr(v, name)[mine]), name
            assert np.array_equal(targets["topk_logits"][mine], rows["topk_logits"][mine])
            assert np.array_equal(ok[mine], usable[mine])


def cached_run(train_dir, val_dir, tiny_cache, out, **kw):
    return small_run(
        train_dir, val_dir, out, teacher_mode="cached", cache=tiny_cache,
        image_size=TEACHER_SIZE, **kw,
    )  # fmt: skip


def test_reuse_sample_trains_and_resumes_exactly(tmp_path, train_dir, val_dir, tiny_cache):
    """A 3-epoch student on a 2-epoch cache, --reuse sample: stopped mid-epoch and resumed, it
    ends where the straight run ends (same losses, same weights); cycle differs from it."""
    straight = cached_run(train_dir, val_dir, tiny_cache, tmp_path / "a", epochs=3, reuse="sample")
    fit(straight)
    stopped = dataclasses.replace(straight, out=str(tmp_path / "b"), checkpoint_every=1)

    def stop(epoch: int, step: int, steps: int, loss: float) -> None:
        if (epoch, step) == (1, 1):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(stopped, on_step=stop)
    fit(dataclasses.replace(stopped, resume=True))
    a, b = read_metrics(straight.out), read_metrics(stopped.out)
    assert [m["train_loss"] for m in a] == pytest.approx([m["train_loss"] for m in b], rel=1e-6)
    assert all(m["cache_epoch"] is None for m in a)
    wa = torch.load(os.path.join(straight.out, "model.pt"))
    wb = torch.load(os.path.join(stopped.out, "model.pt"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    cycle = cached_run(train_dir, val_dir, tiny_cache, tmp_path / "c", epochs=3)
    fit(cycle)
    assert [m["cache_epoch"] for m in read_metrics(cycle.out)] == [0, 1, 0]
    assert [m["train_loss"] for m in read_metrics(cycle.out)] != [m["train_loss"] for m in a]
    with open(os.path.join(straight.out, "config.json")) as f:
        assert json.load(f)["reuse"] == "sample"


def test_eval_every_and_best_pt(tmp_path, train_dir, val_dir):
    cfg = small_run(train_dir, val_dir, tmp_path / "r", epochs=5, eval_every=2, lr=0.01)
    fit(cfg)
    history = read_metrics(cfg.out)
    evaluated = [m["epoch"] for m in history if m["val_accuracy"] is not None]
    assert evaluated == [2, 4, 5]  # every 2 epochs, and the last
    with open(os.path.join(cfg.out, "best.json")) as f:
        best = json.load(f)
    scores = {m["epoch"]: m["val_accuracy"] for m in history if m["val_accuracy"] is not None}
    assert best["metric"] == "val_accuracy" and best["value"] == max(scores.values())
    assert best["epoch"] == min(e for e, v in scores.items() if v == best["value"])
    weights = torch.load(os.path.join(cfg.out, "best.pt"))
    model = torch.load(os.path.join(cfg.out, "model.pt"))
    assert weights.keys() == model.keys()
    if best["epoch"] == 5:
        assert all(torch.equal(weights[k], model[k]) for k in weights)


def test_ablate_cache_budgets_and_committed_run_summaries(tmp_path, train_dir, val_dir):
    """--cache-sizes trains the cached modes at the longest budget on the first N cache epochs;
    --results keeps one summary per run, and a new machine (no run directories, no caches) with
    the same summaries trains nothing again and precomputes nothing."""
    import shutil

    from conftest import TEACHER

    from kdcache.cli.ablate import AblateConfig, ablate
    from kdcache.train import TrainConfig

    train = TrainConfig(
        data=train_dir, val=val_dir, student="kdcache:tiny_cnn", out=str(tmp_path / "grid"),
        epochs=1, teacher=TEACHER, image_size=TEACHER_SIZE, batch_size=8, workers=0,
        device="cpu", reuse="sample",
    )  # fmt: skip
    cfg = AblateConfig(
        train=train, modes=("none", "cached:consistent"), patience=(2,), cache_sizes=(1,),
        results=str(tmp_path / "results"),
    )  # fmt: skip
    first = ablate(cfg)
    assert set(first["cache_budget"]) == {"cached:consistent"}  # the cached modes only
    assert set(first["patience"]) == {"none", "cached:consistent"}
    with open(tmp_path / "grid/runs/cached-consistent-e2-c1/seed0/config.json") as f:
        run = json.load(f)
    assert run["cache_limit"] == 1 and run["cache_epochs"] == 1 and run["reuse"] == "sample"
    summaries = sorted(
        p.relative_to(tmp_path / "results") for p in (tmp_path / "results").rglob("*.json")
    )
    assert {str(p) for p in summaries} == {
        "cached-consistent-e2-c1/seed0.json", "cached-consistent-e2/seed0.json",
        "cached-consistent/seed0.json", "none-e2/seed0.json", "none/seed0.json",
    }  # fmt: skip
    shutil.rmtree(tmp_path / "grid" / "runs")  # a new machine: no run directories
    shutil.rmtree(tmp_path / "grid" / "caches")  # and no caches

    def no_training(run):
        raise AssertionError(f"trained {run.out} again")

    second = ablate(cfg, fit=no_training)
    assert second["patience"] == first["patience"]
    assert second["cache_budget"] == first["cache_budget"]
    assert not (tmp_path / "grid" / "caches").exists()
    other = dataclasses.replace(cfg, train=dataclasses.replace(train, lr=0.5))
    with pytest.raises(Exception, match="was made with other options .*lr: 0.001 there, 0.5 now"):
        ablate(other, fit=no_training)


def test_a_short_function_matching_run_is_warned_about(caplog, tmp_path, train_dir, val_dir):
    from kdcache.train.modes import get_mode
    from kdcache.train.trainer import PATIENT_EPOCHS, _warn_short_function_matching
    from kdcache.views import get_spec

    cfg = small_run(train_dir, val_dir, tmp_path / "r", epochs=30)
    cases = [
        ("function_matching", "cached", 30, True),
        ("function_matching", "online", 30, True),
        ("function_matching", "none", 30, False),  # hard labels: mixup is its own thing
        ("consistent", "cached", 30, False),
        ("function_matching", "cached", PATIENT_EPOCHS, False),
    ]
    for views, mode, epochs, warned in cases:
        caplog.clear()
        run = dataclasses.replace(cfg, epochs=epochs)
        _warn_short_function_matching(run, get_spec(views), get_mode(mode))
        assert ("function matching needs long schedules" in caplog.text) == warned, (views, mode)
