"""``kdcache ablate``: the teacher grid of Beyer et al. 2022 on the tiny data, end to end."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import time

import pytest
from conftest import TEACHER, TEACHER_SIZE, run_cli

from kdcache.cli.ablate import DEFAULT_MODES, AblateConfig, ablate, parse_mode
from kdcache.errors import KdcacheError
from kdcache.store import open_cache
from kdcache.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STUDENT = "kdcache:tiny_cnn"
METRICS = (
    "final_val_accuracy",
    "best_val_accuracy",
    "final_train_loss",
    "teacher_agreement",
    "images_per_s",
    "wall_seconds",
)
FM_MODES = ("online:function_matching", "cached:function_matching")


GRID = {f.name for f in dataclasses.fields(AblateConfig)}


def ablate_cfg(train_dir: str, val_dir: str, out, **kw) -> AblateConfig:
    """A grid of 2 seeds and patience budgets 1 and 2 over 1-epoch runs; ``kw`` sets grid
    fields (modes, losses, seeds, patience) and the shared train options alike."""
    train = dict(
        data=train_dir,
        val=val_dir,
        teacher=TEACHER,
        student=STUDENT,
        epochs=1,
        out=str(out),
        image_size=TEACHER_SIZE,
        batch_size=8,
        workers=0,
        device="cpu",
    )
    grid = dict(seeds=2, patience=(1, 2))
    for key, value in kw.items():
        (grid if key in GRID else train)[key] = value
    return AblateConfig(train=TrainConfig(**train), **grid)


def metrics_lines(out: str) -> dict[str, int]:
    """metrics.jsonl line count of every run under OUT/runs."""
    counts = {}
    for d, _, files in os.walk(os.path.join(out, "runs")):
        if "metrics.jsonl" in files:
            with open(os.path.join(d, "metrics.jsonl")) as f:
                counts[os.path.relpath(d, out)] = sum(1 for line in f if line.strip())
    return counts


def tree_state(path: str) -> dict[str, tuple[int, int]]:
    state = {}
    for d, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(d, f))
            state[os.path.relpath(os.path.join(d, f), path)] = (st.st_mtime_ns, st.st_size)
    return state


@pytest.fixture(scope="module")
def grid(tmp_path_factory, train_dir, val_dir) -> tuple[AblateConfig, dict]:
    """All seven default modes, 1 epoch, 2 seeds, patience budgets 1 and 2."""
    cfg = ablate_cfg(train_dir, val_dir, tmp_path_factory.mktemp("ablate") / "grid")
    return cfg, ablate(cfg)


def test_grid_writes_json_md_png(grid):
    cfg, results = grid
    with open(os.path.join(cfg.out, "ablation.json")) as f:
        written = json.load(f)
    assert list(written["modes"]) == list(DEFAULT_MODES)
    assert set(written["modes"]) == set(results["modes"])
    for mode, r in written["modes"].items():
        assert r["seeds"] == 2, mode
        for key in METRICS:
            value = r[key]
            assert set(value) == {"mean", "std"}, (mode, key)
            assert math.isfinite(value["mean"]) and value["std"] >= 0, (mode, key, value)
        assert 0.0 <= r["final_val_accuracy"]["mean"] <= 1.0
        assert r["best_val_accuracy"]["mean"] >= r["final_val_accuracy"]["mean"]
        assert r["final_train_loss"]["mean"] > 0 and r["images_per_s"]["mean"] > 0
        assert len(r["curve"]) == cfg.epochs
        assert len(r["runs"]) == 2
    with open(os.path.join(cfg.out, "ablation.md")) as f:
        table = f.read()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    for mode in DEFAULT_MODES:
        assert sum(line.startswith(f"| {mode} |") for line in rows) >= 1, mode
    assert os.path.getsize(os.path.join(cfg.out, "ablation.png")) > 0


def test_grid_modes_train_what_they_say(grid):
    """Each mode's run has the teacher mode and student views of the paper's grid."""
    cfg, results = grid
    expected = {
        "none": ("none", "consistent"),
        "fixed": ("fixed", "consistent"),
        "independent": ("independent", "consistent"),
        "online:consistent": ("online", "consistent"),
        "cached:consistent": ("cached", "consistent"),
        "online:function_matching": ("online", "function_matching"),
        "cached:function_matching": ("cached", "function_matching"),
    }
    for mode, (teacher_mode, views) in expected.items():
        for run in results["modes"][mode]["runs"]:
            with open(os.path.join(run, "config.json")) as f:
                config = json.load(f)
            assert config["teacher_mode"] == teacher_mode, mode
            assert config["view_spec"]["name"] == views, mode
    seeds = set()
    for run in results["modes"]["none"]["runs"]:
        with open(os.path.join(run, "config.json")) as f:
            seeds.add(json.load(f)["seed"])
    assert seeds == {0, 1}
    caches = sorted(os.listdir(os.path.join(cfg.out, "caches")))
    assert caches == ["center.zarr", "consistent.zarr", "function_matching.zarr"]


def test_grid_patience(grid):
    cfg, results = grid
    patience = results["patience"]
    assert set(patience) == set(DEFAULT_MODES)  # every mode gets the budgets
    for mode in FM_MODES:
        assert set(patience[mode]) == {"1", "2"}, mode
        for value in patience[mode].values():
            assert 0.0 <= value <= 1.0
        # budget 1 is the grid's own run; budget 2 trained 2 epochs
        assert patience[mode]["1"] == results["modes"][mode]["final_val_accuracy"]["mean"]
        slug = mode.replace(":", "-")
        for seed in (0, 1):
            run = os.path.join(cfg.out, "runs", f"{slug}-e2", f"seed{seed}")
            with open(os.path.join(run, "metrics.jsonl")) as f:
                assert len(f.readlines()) == 2
    with open(os.path.join(cfg.out, "ablation.md")) as f:
        table = f.read()
    assert "1 epochs" in table and "2 epochs" in table


def test_second_call_reuses_caches_and_runs(grid, monkeypatch):
    cfg, first = grid
    lines = metrics_lines(cfg.out)
    assert len(lines) == 7 * 2 + 7 * 2  # the grid and the 2-epoch patience runs
    caches = tree_state(os.path.join(cfg.out, "caches"))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(
        importlib.import_module("kdcache.train.trainer"), "_train_epoch", no_training
    )
    second = ablate(cfg)
    assert metrics_lines(cfg.out) == lines
    assert tree_state(os.path.join(cfg.out, "caches")) == caches
    for mode in DEFAULT_MODES:
        a, b = first["modes"][mode], second["modes"][mode]
        for key in ("final_val_accuracy", "best_val_accuracy", "final_train_loss"):
            assert a[key] == b[key], (mode, key)
    assert second["patience"] == first["patience"]


def test_second_call_keeps_wall_seconds(tmp_path, train_dir, val_dir, monkeypatch):
    """A reused run still reports how long it trained (here at least 3 steps x 0.2 s)."""
    cfg = ablate_cfg(train_dir, val_dir, tmp_path / "wall", modes=("none",), seeds=1, patience=())
    fit_module = importlib.import_module("kdcache.train.trainer")
    target = fit_module._target

    def slow_target(*args, **kwargs):
        time.sleep(0.2)
        return target(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(fit_module, "_target", slow_target)
        first = ablate(cfg)
    assert first["modes"]["none"]["wall_seconds"] >= 0.6
    second = ablate(cfg)
    assert second["modes"]["none"]["wall_seconds"] >= 0.6


def test_shared_center_cache_covers_cached_center(tmp_path, train_dir, val_dir):
    cfg = ablate_cfg(
        train_dir, val_dir, tmp_path / "center", epochs=2, seeds=1, patience=(),
        modes=("cached:center", "fixed"),
    )  # fmt: skip
    ablate(cfg)
    cache = open_cache(os.path.join(cfg.out, "caches", "center.zarr"))
    assert len(cache.complete_epochs()) == 2


def test_one_seed_gives_plain_numbers(tmp_path, train_dir, val_dir):
    cfg = ablate_cfg(
        train_dir, val_dir, tmp_path / "one", seeds=1, patience=(), modes=("none", "fixed")
    )
    results = ablate(cfg)
    assert "patience" not in results
    for mode in ("none", "fixed"):
        r = results["modes"][mode]
        assert r["seeds"] == 1
        for key in METRICS:
            assert isinstance(r[key], float), (mode, key)
    assert os.listdir(os.path.join(cfg.out, "caches")) == ["center.zarr"]


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("none", ("none", "consistent")),
        ("cached", ("cached", "function_matching")),
        ("online:consistent", ("online", "consistent")),
        ("fixed:center", ("fixed", "center")),
    ],
)
def test_parse_mode(mode, expected):
    assert parse_mode(mode) == expected


@pytest.mark.parametrize("mode,needle", [("bogus", "bogus"), ("cached:nope", "nope")])
def test_parse_mode_rejects(mode, needle):
    with pytest.raises(KdcacheError, match=needle):
        parse_mode(mode)


def test_bad_modes_are_refused_before_any_work(tmp_path, train_dir, val_dir):
    out = tmp_path / "bad"
    with pytest.raises(KdcacheError, match="bogus"):
        ablate(ablate_cfg(train_dir, val_dir, out, modes=("none", "bogus")))
    assert not os.path.exists(out)


def test_cli_smoke(tmp_path, train_dir, val_dir):
    out = tmp_path / "smoke"
    code, stdout, err = run_cli(
        "ablate",
        "--data", train_dir, "--val", val_dir, "--teacher", TEACHER, "--student", STUDENT,
        "--epochs", 5, "--out", out, "--seeds", 3,
        "--image-size", TEACHER_SIZE, "--workers", 0, "--device", "cpu", "--smoke", "--json",
    )  # fmt: skip
    assert code == 0, err[-2000:]
    printed = json.loads(stdout.strip().splitlines()[-1])
    assert list(printed["modes"]) == list(DEFAULT_MODES)
    with open(out / "ablation.json") as f:
        written = json.load(f)
    assert written["config"]["train"]["epochs"] == 1 and written["config"]["seeds"] == 1
    for r in written["modes"].values():
        assert r["seeds"] == 1 and len(r["curve"]) == 1
    assert (out / "ablation.md").exists() and (out / "ablation.png").exists()


def test_cli_bad_patience(tmp_path, train_dir, val_dir):
    code, _, err = run_cli(
        "ablate",
        "--data", train_dir, "--val", val_dir, "--teacher", TEACHER, "--student", STUDENT,
        "--epochs", 1, "--out", tmp_path / "x", "--patience", "1,two",
    )  # fmt: skip
    assert code == 2
    assert "Traceback" not in err
    assert "kdcache ablate: error: argument --patience: expected EPOCHS" in err


def test_avatars_give_the_cached_cells_an_avatar_cache(tmp_path, train_dir, val_dir):
    """--avatars N: the cached cells' cache holds N avatar ensembles (its own path), and a loss
    axis can put plain KL beside the avatar term on it."""
    cfg = ablate_cfg(train_dir, val_dir, tmp_path / "av", modes=("cached:consistent",),
                     losses=("kl", "kl+avatar_kl"), seeds=1, patience=(), avatars=2,
                     limit=16)  # fmt: skip
    results = ablate(cfg)
    assert set(results["modes"]) == {"cached:consistent kl", "cached:consistent kl+avatar_kl"}
    assert os.listdir(os.path.join(cfg.out, "caches")) == ["consistent-avatars2.zarr"]
    cache = open_cache(os.path.join(cfg.out, "caches", "consistent-avatars2.zarr"))
    assert cache.avatars["n"] == 2 and cache.avatars["drop"] == cfg.train.avatar_drop
