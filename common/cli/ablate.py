"""``kdcache ablate``: one command for the paper's teacher grid, on one data path.

Modes are ``TEACHER_MODE[:PRESET]``: ``none``, ``fixed``, ``independent``, ``online:consistent``,
``cached:consistent``, ``online:function_matching``, ``cached:function_matching`` by default.
Every mode trains the same student with the same budget and seeds; only the source of the
targets changes. Caches are built first (or reused: precompute resumes and extends), in
``OUT/caches``; runs go to ``OUT/runs/MODE/seedS`` and are reused when complete. Results go to
``OUT/ablation.json``, ``OUT/ablation.md`` and ``OUT/ablation.png``.

The stages are imported inside the functions (``kdcache`` never imports a stage at import).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from kdcache.errors import KdcacheError

log = logging.getLogger(__name__)

DEFAULT_MODES = (
    "none",
    "fixed",
    "independent",
    "online:consistent",
    "cached:consistent",
    "online:function_matching",
    "cached:function_matching",
)
# The student's views when a mode names no preset are the mode's own default (the registry in
# kdcache.train.modes, as for `kdcache train`) except where the grid deliberately differs:
# `none` is the paper's hard-label baseline on consistent (unmixed) views, and `cached` has no
# cache to take its views from until ablate builds one, so it names function_matching.
GRID_PRESET = {"none": "consistent", "cached": "function_matching"}


def default_preset(teacher_mode: str) -> str:
    """The student's views of ``teacher_mode`` when the mode names no preset."""
    from kdcache.train.modes import get_mode

    return GRID_PRESET.get(teacher_mode) or get_mode(teacher_mode).default_views


def __getattr__(name: str) -> Any:
    if name == "DEFAULT_PRESET":  # the old table, derived on use (no stage import at import)
        from kdcache.train.modes import MODES

        return {m: default_preset(m) for m in MODES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class AblateConfig:
    """Options of ``kdcache ablate``; the training knobs are shared by every mode."""

    data: str
    val: str
    teacher: str
    teacher_weights: str | None
    student: str
    epochs: int
    out: str
    modes: tuple[str, ...] = DEFAULT_MODES
    seeds: int = 1
    patience: tuple[int, ...] = ()
    plan_seed: int = 0
    image_size: int = 224
    teacher_image_size: int | None = None
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: float = 1.0
    clip_grad: float = 1.0
    temperature: float = 1.0
    workers: int = 2
    device: str = "auto"
    limit: int | None = None


def parse_mode(mode: str) -> tuple[str, str]:
    """``"cached:consistent"`` -> ("cached", "consistent"); a bare mode gets its default."""
    from kdcache.train.modes import MODES
    from kdcache.views import get_spec

    teacher_mode, _, preset = mode.partition(":")
    m = MODES.get(teacher_mode)
    if m is None:
        raise KdcacheError(
            f"unknown mode {mode!r}: the part before ':' must be one of {', '.join(MODES)}"
        )
    preset = preset or default_preset(teacher_mode)
    spec = get_spec(preset)  # raises with the list of presets
    if not m.allows(spec):
        raise KdcacheError(
            f"mode {mode!r}: {teacher_mode} teachers train on unmixed views; "
            "use consistent or center"
        )
    return teacher_mode, preset


def _cache_path(cfg: AblateConfig, preset: str) -> str:
    return os.path.join(cfg.out, "caches", f"{preset}.zarr")


def _build_caches(
    cfg: AblateConfig, parsed: dict[str, tuple[str, str]], bar: Callable | None
) -> dict[str, str]:
    """Precompute (or finish, or extend) every cache the modes need -> {preset: path}."""
    from kdcache.cache import PrecomputeConfig, precompute
    from kdcache.train.modes import get_mode

    need: dict[str, int] = {}
    longest = max([cfg.epochs, *cfg.patience])
    for teacher_mode, preset in parsed.values():
        m = get_mode(teacher_mode)
        if m.replays_cache_views:
            budget = longest if preset == "function_matching" else cfg.epochs
            need[preset] = max(need.get(preset, 0), budget)
        elif m.needs_center_cache:
            need["center"] = max(need.get("center", 0), 1)
    paths = {}
    for preset, epochs in need.items():
        path = _cache_path(cfg, preset)
        pre = PrecomputeConfig(
            data=cfg.data,
            teacher=cfg.teacher,
            teacher_weights=cfg.teacher_weights,
            out=path,
            epochs=epochs,
            views=preset,
            plan_seed=cfg.plan_seed,
            teacher_image_size=cfg.teacher_image_size or cfg.image_size,
            workers=cfg.workers,
            device=cfg.device,
            limit=cfg.limit,  # only the shards that the --limit runs read
        )
        log.info("cache %s: %d epochs of %s views", path, epochs, preset)
        if bar is None:
            precompute(pre)
        else:
            with bar(None, f"cache {preset}") as update:
                precompute(pre, progress=update)
        paths[preset] = path
    return paths


def _train(
    cfg: AblateConfig,
    mode: str,
    teacher_mode: str,
    preset: str,
    seed: int,
    epochs: int,
    caches: dict[str, str],
    fit: Callable,
) -> dict[str, Any]:
    from kdcache.train import TrainConfig
    from kdcache.train.modes import get_mode
    from kdcache.train.trainer import read_metrics

    slug = mode.replace(":", "-")
    run = os.path.join(
        cfg.out, "runs", slug if epochs == cfg.epochs else f"{slug}-e{epochs}", f"seed{seed}"
    )
    m = get_mode(teacher_mode)
    cache = caches.get("center") if m.needs_center_cache else caches.get(preset)
    train_cfg = TrainConfig(
        data=cfg.data,
        val=cfg.val,
        student=cfg.student,
        out=run,
        epochs=epochs,
        teacher_mode=teacher_mode,
        cache=cache if m.reads_cache else None,
        teacher=cfg.teacher,
        teacher_weights=cfg.teacher_weights,
        views=None if m.replays_cache_views else preset,
        plan_seed=cfg.plan_seed,
        seed=seed,
        image_size=cfg.image_size,
        teacher_image_size=cfg.teacher_image_size,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup=cfg.warmup,
        clip_grad=cfg.clip_grad,
        temperature=cfg.temperature,
        workers=cfg.workers,
        device=cfg.device,
        resume=True,
        limit=cfg.limit,
    )
    log.info("ablate: %s seed %d, %d epochs -> %s", mode, seed, epochs, run)
    fit(train_cfg)
    history = read_metrics(run)
    # From the run's own record, so a reused run reports its training time, not the reuse's.
    wall = sum(m.get("epoch_seconds", m["seconds"]) for m in history)
    return {"history": history, "wall_seconds": wall, "run": run}


def _mean(values: list[float | None]) -> float | None:
    """The mean; None when any value is (val accuracy is null when the labels are not the
    teacher's classes: see ``accuracy_basis``)."""
    return None if any(v is None for v in values) else sum(values) / len(values)


def _mean_std(values: list[float | None]) -> dict[str, float] | None:
    if any(v is None for v in values):
        return None
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
    return {"mean": mean, "std": math.sqrt(var) if len(values) > 1 else 0.0}


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-mode result over seeds; single values with one seed, mean/std with several."""
    per_seed = []
    for r in runs:
        h = r["history"]
        last = h[-1]
        per_seed.append(
            {
                "final_val_accuracy": last["val_accuracy"],
                "best_val_accuracy": max(
                    (m["val_accuracy"] for m in h if m["val_accuracy"] is not None), default=None
                ),
                "final_train_loss": last["train_loss"],
                "teacher_agreement": last.get("teacher_agreement", float("nan")),
                "images_per_s": sum(m["images_per_s"] for m in h) / len(h),
                "wall_seconds": r["wall_seconds"],
            }
        )
    keys = per_seed[0].keys()
    if len(per_seed) == 1:
        out: dict[str, Any] = dict(per_seed[0])
    else:
        out = {k: _mean_std([s[k] for s in per_seed]) for k in keys}
    out["seeds"] = len(per_seed)
    out["curve"] = [
        _mean([r["history"][e]["val_accuracy"] for r in runs])
        for e in range(len(runs[0]["history"]))
    ]
    out["runs"] = [r["run"] for r in runs]
    return out


def ablate(
    cfg: AblateConfig, fit: Callable | None = None, bar: Callable | None = None
) -> dict[str, Any]:
    """Run the grid; returns (and writes) the results keyed by mode name."""
    from kdcache.train import fit as plain_fit

    fit = fit or plain_fit
    if cfg.seeds < 1:
        raise KdcacheError(f"--seeds must be at least 1, got {cfg.seeds}")
    if not cfg.modes:
        raise KdcacheError("--modes is empty")
    parsed = {mode: parse_mode(mode) for mode in cfg.modes}
    os.makedirs(cfg.out, exist_ok=True)
    caches = _build_caches(cfg, parsed, bar)
    results: dict[str, Any] = {"config": asdict(cfg), "modes": {}}
    for mode, (teacher_mode, preset) in parsed.items():
        runs = [
            _train(cfg, mode, teacher_mode, preset, s, cfg.epochs, caches, fit)
            for s in range(cfg.seeds)
        ]
        results["modes"][mode] = _summarise(runs)
    if cfg.patience:
        results["patience"] = _patience(cfg, parsed, caches, fit)
    _write(cfg, results)
    return results


def _patience(
    cfg: AblateConfig, parsed: dict[str, tuple[str, str]], caches: dict[str, str], fit: Callable
) -> dict[str, dict[str, float]]:
    """Final val accuracy (mean over seeds) of the function-matching modes per budget."""
    from kdcache.train.modes import get_mode

    out: dict[str, dict[str, float]] = {}
    for mode, (teacher_mode, preset) in parsed.items():
        if preset != "function_matching" or not get_mode(teacher_mode).sees_student_views:
            continue
        out[mode] = {}
        for epochs in sorted(set(cfg.patience)):
            runs = [
                _train(cfg, mode, teacher_mode, preset, s, epochs, caches, fit)
                for s in range(cfg.seeds)
            ]
            out[mode][str(epochs)] = _mean([r["history"][-1]["val_accuracy"] for r in runs])
    if not out:
        log.warning("--patience given but no function-matching mode is in --modes")
    return out


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, dict):
        return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"
    return f"{value:.{digits}f}"


def format_table(results: dict[str, Any]) -> str:
    """The results as a Markdown table (what ``ablation.md`` holds)."""
    lines = [
        "| mode | final val acc | best val acc | final train loss | teacher agreement "
        "| train img/s | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, r in results["modes"].items():
        lines.append(
            f"| {mode} | {_fmt(r['final_val_accuracy'])} | "
            f"{_fmt(r['best_val_accuracy'])} | {_fmt(r['final_train_loss'])} | "
            f"{_fmt(r['teacher_agreement'])} | {_fmt(r['images_per_s'], 0)} | "
            f"{_fmt(r['wall_seconds'], 0)} |"
        )
    if results.get("patience"):
        budgets = sorted({int(e) for p in results["patience"].values() for e in p})
        lines += [
            "",
            "| mode | " + " | ".join(f"{e} epochs" for e in budgets) + " |",
            "|---|" + "---|" * len(budgets),
        ]
        for mode, p in results["patience"].items():
            lines.append(f"| {mode} | " + " | ".join(f"{p[str(e)]:.4f}" for e in budgets) + " |")
    return "\n".join(lines)


def _write(cfg: AblateConfig, results: dict[str, Any]) -> None:
    with open(os.path.join(cfg.out, "ablation.json"), "w") as f:
        json.dump(results, f, indent=2)
    c = cfg
    header = (
        f"# kdcache ablation\n\nstudent `{c.student}`, teacher `{c.teacher}`, "
        f"{c.epochs} epochs, {c.seeds} seed(s), batch {c.batch_size}, lr {c.lr}, "
        f"image size {c.image_size}" + (f", first {c.limit} samples" if c.limit else "") + "\n\n"
    )
    with open(os.path.join(cfg.out, "ablation.md"), "w") as f:
        f.write(header + format_table(results) + "\n")
    _plot(results, os.path.join(cfg.out, "ablation.png"))


def _plot(results: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'kdcache[demo]'); no plot")
        return
    panels = 2 if results.get("patience") else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), dpi=120, squeeze=False)
    ax = axes[0, 0]
    for mode, r in results["modes"].items():
        ax.plot(range(1, len(r["curve"]) + 1), r["curve"], marker="o", ms=2.5, label=mode)
    ax.set(xlabel="epoch", ylabel="val accuracy (mean over seeds)", title="teacher modes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if panels == 2:
        ax = axes[0, 1]
        for mode, p in results["patience"].items():
            budgets = sorted(int(e) for e in p)
            ax.plot(budgets, [p[str(e)] for e in budgets], marker="o", label=mode)
        ax.set(
            xlabel="training epochs", ylabel="final val accuracy", xscale="log", title="patience"
        )
        ticks = sorted({int(e) for p in results["patience"].values() for e in p})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def with_smoke(cfg: AblateConfig) -> AblateConfig:
    """--smoke: one short epoch per mode on a few samples."""
    return replace(
        cfg,
        epochs=1,
        seeds=1,
        patience=(1, 2) if cfg.patience else (),
        limit=min(cfg.limit or 128, 128),
        batch_size=min(cfg.batch_size, 32),
    )
