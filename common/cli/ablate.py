"""``kdcache ablate``: one command for the paper's teacher grid, on one data path.

The grid's axes are the modes (``--mode``, repeatable) and optionally the losses (``--loss``,
repeatable); the rest of the options are ``kdcache train``'s, shared by every run. Modes are
``TEACHER_MODE[:PRESET]``: ``none``, ``fixed``, ``independent``, ``online:consistent``,
``cached:consistent``, ``online:function_matching``, ``cached:function_matching`` by default.
Every mode trains the same student with the same budget and seeds; only the source of the
targets changes. Caches are built first (or reused: precompute resumes and extends), in
``OUT/caches``; runs go to ``OUT/runs/MODE/seedS`` and are reused when complete. Results go to
``OUT/ablation.json``, ``OUT/ablation.md`` and ``OUT/ablation.png``.

The stages' heavy modules are imported inside the functions, so ``kdcache --help`` stays free
of torch (``kdcache.train.config`` imports neither torch nor zarr).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from kdcache.errors import KdcacheError
from kdcache.options import cli_fields, option
from kdcache.train.config import TrainConfig

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
    """Options of ``kdcache ablate``: the grid's axes, and the run every cell of it varies.

    ``train`` holds what every run shares (data, models, sizes, optimiser, budget, machine);
    per cell the grid sets its ``teacher_mode``, ``cache``, ``views``, ``loss``, ``seed``,
    ``epochs`` (patience budgets) and ``out`` (``OUT/runs/CELL/seedS``), with ``resume`` on so a
    finished run is reused. ``train.out`` is the ablation's directory.
    """

    train: TrainConfig
    modes: tuple[str, ...] = option(
        DEFAULT_MODES,
        help="a teacher mode, optionally with the student's views (TEACHER_MODE[:PRESET]); "
        "repeat it, or separate modes by commas",
        flags=("--mode", "--modes"),
        metavar="MODE[:VIEWS]",
        repeat=True,
        shown=", ".join(DEFAULT_MODES),
    )
    losses: tuple[str, ...] = option(
        (),
        help="a loss axis: every mode is trained with each loss spec (repeat --loss, or "
        "separate specs by commas); see `kdcache train --help`",
        flags=("--loss",),
        metavar="SPEC",
        repeat=True,
        shown="each mode's default only",
    )
    seeds: int = option(
        1, help="seeds of the student's init and order; views and caches stay fixed"
    )
    patience: tuple[int, ...] = option(
        (),
        help="budgets (epochs, comma-separated) every mode is also trained for: the paper's "
        "patience curve",
        metavar="EPOCHS",
        repeat=True,
    )
    cache_sizes: tuple[int, ...] = option(
        (),
        help="cache budgets (epochs, comma-separated): the cached modes are also trained at "
        "the longest budget on only the first N epochs of their cache (with the run's --reuse): "
        "how many epochs must a cache hold?",
        flags=("--cache-sizes",),
        metavar="EPOCHS",
        repeat=True,
    )
    avatars: int = option(
        0,
        help="the cached modes' caches also hold N avatar ensembles per view (precompute "
        "--avatars N, dropout --avatar-drop, at the teacher's default site), for losses with an "
        "avatar_kl term",
        metavar="N",
    )
    results: str | None = option(
        None,
        help="a directory of run summaries (small JSON, one per run, meant to be committed): a "
        "run whose summary is there is not trained again, and each finished run writes one",
        metavar="DIR",
    )

    @property
    def out(self) -> str:
        return self.train.out

    @property
    def epochs(self) -> int:
        return self.train.epochs


# The train options a grid cell sets itself; every other train option is one of ablate's too.
CELL_OPTIONS = ("teacher_mode", "cache", "views", "loss", "seed", "resume", "extend")
SHARED_OPTIONS = tuple(f.name for f in cli_fields(TrainConfig) if f.name not in CELL_OPTIONS)


@dataclass(frozen=True)
class Cell:
    """One cell of the grid: a mode (``TEACHER_MODE[:PRESET]``) and a loss (None: the mode's
    default), named ``name`` in the results and ``slug`` under ``OUT/runs``."""

    mode: str
    teacher_mode: str
    preset: str
    loss: str | None = None

    @property
    def name(self) -> str:
        return self.mode if self.loss is None else f"{self.mode} {self.loss}"

    @property
    def slug(self) -> str:
        slug = _slug(self.mode.replace(":", "-", 1))
        if self.loss is not None:
            slug += "+" + _slug(self.loss)
        return slug


def _slug(text: str) -> str:
    """A directory name for a mode, view spec or loss spec."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_")


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


def grid_cells(cfg: AblateConfig) -> list[Cell]:
    """Every (mode, loss) of the grid, in the order given; modes are checked here."""
    if not cfg.modes:
        raise KdcacheError("--mode is empty: name at least one teacher mode")
    losses = cfg.losses or (None,)
    cells = [Cell(m, *parse_mode(m), loss) for m in dict.fromkeys(cfg.modes) for loss in losses]
    for cell in cells:  # a bad option or loss spec fails here, before any cache is built
        _cell_config(cfg, cell, 0, cfg.epochs).validate()
    return cells


def _cache_path(cfg: AblateConfig, preset: str) -> str:
    avatars = f"-avatars{cfg.avatars}" if cfg.avatars and preset != "center" else ""
    return os.path.join(cfg.out, "caches", f"{_slug(preset)}{avatars}.zarr")


def _build_caches(cfg: AblateConfig, cells: list[Cell], bar: Callable | None) -> None:
    """Precompute (or finish, or extend) every cache the cells need, in ``OUT/caches``."""
    from kdcache.cache import precompute
    from kdcache.train.modes import get_mode

    need: dict[str, int] = {}
    longest = max([cfg.epochs, *cfg.patience])
    for cell in cells:
        m = get_mode(cell.teacher_mode)
        if m.replays_cache_views:
            # As many epochs as the longest budget (a longer student cycles or samples them),
            # capped by an explicit --cache-epochs of the runs.
            budget = min(longest, cfg.train.cache_limit or longest)
            budget = max(budget, *cfg.cache_sizes) if cfg.cache_sizes else budget
            need[cell.preset] = max(need.get(cell.preset, 0), budget)
        elif m.needs_center_cache:
            need["center"] = max(need.get("center", 0), 1)
    for preset, epochs in need.items():
        path = _cache_path(cfg, preset)
        pre = cfg.train.teacher_pass(path, epochs, preset)
        if cfg.avatars and preset != "center":
            pre = replace(pre, avatars=cfg.avatars, avatar_drop=cfg.train.avatar_drop)
        log.info("cache %s: %d epochs of %s views", path, epochs, preset)
        if bar is None:
            precompute(pre)
        else:
            with bar(None, f"cache {preset}") as update:
                precompute(pre, progress=update)


def _cell_config(
    cfg: AblateConfig, cell: Cell, seed: int, epochs: int, cache_size: int | None = None
) -> TrainConfig:
    """The run of one cell, seed and budget (and cache budget), in
    ``OUT/runs/SLUG[-eEPOCHS][-cCACHE]/seedSEED``."""
    from kdcache.train.modes import get_mode

    slug = cell.slug if epochs == cfg.epochs else f"{cell.slug}-e{epochs}"
    slug += f"-c{cache_size}" if cache_size is not None else ""
    m = get_mode(cell.teacher_mode)
    cache = _cache_path(cfg, "center" if m.needs_center_cache else cell.preset)
    return replace(
        cfg.train,
        out=os.path.join(cfg.out, "runs", slug, f"seed{seed}"),
        epochs=epochs,
        teacher_mode=cell.teacher_mode,
        cache=cache if m.reads_cache else None,
        views=None if m.replays_cache_views else cell.preset,
        loss=cell.loss,
        seed=seed,
        resume=True,
        extend=False,
        cache_limit=cache_size if cache_size is not None else cfg.train.cache_limit,
    )


def _train(
    cfg: AblateConfig,
    cell: Cell,
    seed: int,
    epochs: int,
    fit: Callable,
    cache_size: int | None = None,
) -> dict[str, Any]:
    from kdcache.train.trainer import read_metrics

    run = _cell_config(cfg, cell, seed, epochs, cache_size)
    summary_path = _summary_path(cfg, run)
    if summary_path:
        done = _read_summary(summary_path, run)
        if done is not None:
            log.info(
                "ablate: %s seed %d, %d epochs: summary in %s",
                cell.name,
                seed,
                epochs,
                summary_path,
            )
            return done
    log.info("ablate: %s seed %d, %d epochs -> %s", cell.name, seed, epochs, run.out)
    fit(run)
    history = read_metrics(run.out)
    # From the run's own record, so a reused run reports its training time, not the reuse's.
    wall = sum(m.get("epoch_seconds", m["seconds"]) for m in history)
    result = {"history": history, "wall_seconds": wall, "run": run.out}
    if summary_path:
        _write_summary(summary_path, run, result)
    return result


def _summary_path(cfg: AblateConfig, run: TrainConfig) -> str | None:
    """Where ``--results`` keeps the summary of ``run`` (None without ``--results``)."""
    if not cfg.results:
        return None
    where = os.path.relpath(os.path.dirname(run.out), os.path.join(cfg.out, "runs"))
    return os.path.join(cfg.results, where, f"seed{run.seed}.json")


def _runs_of(cfg: AblateConfig, cell: Cell) -> list[TrainConfig]:
    """Every run of one cell: its seeds at the grid's budget, the patience budgets and the
    cache budgets."""
    from kdcache.train.modes import get_mode

    longest = max([cfg.epochs, *cfg.patience])
    jobs = [(e, None) for e in dict.fromkeys([cfg.epochs, *sorted(set(cfg.patience))])]
    if get_mode(cell.teacher_mode).replays_cache_views:
        jobs += [(longest, size) for size in sorted(set(cfg.cache_sizes))]
    return [_cell_config(cfg, cell, s, e, c) for e, c in jobs for s in range(cfg.seeds)]


def _unfinished(cfg: AblateConfig, cells: list[Cell]) -> list[Cell]:
    """The cells with a run that has no summary in ``--results`` yet (all of them without
    it): only their caches need building, so a grid whose summaries are committed reruns on a
    new machine without precomputing anything it will not train on."""
    if not cfg.results:
        return cells
    return [
        cell
        for cell in cells
        if any(not os.path.exists(_summary_path(cfg, run)) for run in _runs_of(cfg, cell))
    ]


# What a run summary keeps of its run's options: everything that changes what it computes.
_NOT_RUN = ("out", "command", "workers", "device", "resume", "checkpoint_every", "strict")


def _run_options(run: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in json.loads(json.dumps(asdict(run))).items() if k not in _NOT_RUN}


def _write_summary(path: str, run: TrainConfig, result: dict[str, Any]) -> None:
    """A finished run's summary: its options, the evaluated epochs (and the last) of its
    metrics, its training time."""
    history = result["history"]
    kept = [m for m in history if m.get("val_accuracy") is not None or m is history[-1]]
    summary = {
        "options": _run_options(run),
        "history": kept,
        "wall_seconds": result["wall_seconds"],
        "epochs_trained": len(history),
        "images_per_s": sum(m["images_per_s"] for m in history) / len(history),
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, path)


def _read_summary(path: str, run: TrainConfig) -> dict[str, Any] | None:
    """A run's summary, if one is there; one made with other options is refused by name."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    now = _run_options(run)
    diff = [
        f"{k}: {summary['options'].get(k)!r} there, {v!r} now"
        for k, v in now.items()
        if summary["options"].get(k) != v and k in summary["options"]
    ]
    if diff:
        raise KdcacheError(
            f"run summary {path} was made with other options ({'; '.join(diff)}); remove it, "
            "or point --results elsewhere"
        )
    history = summary["history"]
    for m in history:  # the summary's mean rate stands for every epoch
        m["images_per_s"] = summary["images_per_s"]
    return {"history": history, "wall_seconds": summary["wall_seconds"], "run": path}


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
                # --retrieval runs: the last evaluation's mAPs
                **{
                    f"final_{k}": last[k]
                    for k in ("retrieval_map_cosine", "retrieval_map_euclidean")
                    if k in last
                },
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
    """Run the grid; returns (and writes) the results keyed by cell name (the mode, and the
    loss when there is a loss axis)."""
    from kdcache.train import fit as plain_fit

    fit = fit or plain_fit
    if cfg.seeds < 1:
        raise KdcacheError(f"--seeds must be at least 1, got {cfg.seeds}")
    cells = grid_cells(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    _build_caches(cfg, _unfinished(cfg, cells), bar)
    results: dict[str, Any] = {"config": asdict(cfg), "modes": {}}
    for cell in cells:
        runs = [_train(cfg, cell, s, cfg.epochs, fit) for s in range(cfg.seeds)]
        results["modes"][cell.name] = _summarise(runs)
    if cfg.patience:
        results["patience"] = _patience(cfg, cells, fit)
    if cfg.cache_sizes:
        results["cache_budget"] = _cache_budget(cfg, cells, fit)
    _write(cfg, results)
    return results


def _patience(cfg: AblateConfig, cells: list[Cell], fit: Callable) -> dict[str, dict[str, float]]:
    """Final val accuracy (mean over seeds) of every cell per budget."""
    out: dict[str, dict[str, float]] = {}
    for cell in cells:
        out[cell.name] = {}
        for epochs in sorted(set(cfg.patience)):
            runs = [_train(cfg, cell, s, epochs, fit) for s in range(cfg.seeds)]
            out[cell.name][str(epochs)] = _mean([r["history"][-1]["val_accuracy"] for r in runs])
    return out


def _cache_budget(
    cfg: AblateConfig, cells: list[Cell], fit: Callable
) -> dict[str, dict[str, float]]:
    """Final val accuracy (mean over seeds) of the cached cells at the longest budget, per
    cache budget (the first N epochs of the cache)."""
    from kdcache.train.modes import get_mode

    longest = max([cfg.epochs, *cfg.patience])
    out: dict[str, dict[str, float]] = {}
    for cell in cells:
        if not get_mode(cell.teacher_mode).replays_cache_views:
            continue
        out[cell.name] = {}
        for size in sorted(set(cfg.cache_sizes)):
            runs = [_train(cfg, cell, s, longest, fit, size) for s in range(cfg.seeds)]
            out[cell.name][str(size)] = _mean([r["history"][-1]["val_accuracy"] for r in runs])
    if not out:
        log.warning("--cache-sizes given but no cached mode is in --mode")
    return out


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, dict):
        return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"
    return f"{value:.{digits}f}"


def _budget_table(table: dict[str, dict[str, Any]], head: str, unit: str) -> list[str]:
    """``{mode: {budget: accuracy}}`` as Markdown rows, one column per budget."""
    budgets = sorted({int(e) for p in table.values() for e in p})
    lines = [
        f"| {head} | " + " | ".join(f"{e} {unit}".strip() for e in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for mode, p in table.items():
        lines.append(f"| {mode} | " + " | ".join(_fmt(p[str(e)]) for e in budgets) + " |")
    return lines


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
    for key, head in (("patience", "mode"), ("cache_budget", "mode (cache epochs)")):
        if results.get(key):
            lines += ["", *_budget_table(results[key], head, "epochs" if key == "patience" else "")]
    return "\n".join(lines)


def _write(cfg: AblateConfig, results: dict[str, Any]) -> None:
    with open(os.path.join(cfg.out, "ablation.json"), "w") as f:
        json.dump(results, f, indent=2)
    c = cfg.train
    header = (
        f"# kdcache ablation\n\nstudent `{c.student}`, teacher `{c.teacher}`, "
        f"{c.epochs} epochs, {cfg.seeds} seed(s), batch {c.batch_size}, lr {c.lr}, "
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
    t = cfg.train
    return replace(
        cfg,
        train=replace(
            t, epochs=1, limit=min(t.limit or 128, 128), batch_size=min(t.batch_size, 32)
        ),
        seeds=1,
        patience=(1, 2) if cfg.patience else (),
    )
