"""``kdcache demo``: the whole flow on scikit-learn's bundled digits, in a few minutes on a CPU.

digits shards -> a teacher trained on hard labels -> a function-matching cache of its views ->
the same student trained three ways for the same epochs (hard labels, online teacher, cached
teacher) -> ``report.json``, ``accuracy.png``. Re-running it reuses what is already there.

The stages are imported inside :func:`run_demo` (``kdcache`` never imports a stage at import).
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """The demo's settings; ``smoke`` shrinks every budget to seconds."""

    image_size: int = 32
    shard_size: int = 256
    teacher: str = "kdcache:resnet_s"
    student: str = "kdcache:tiny_cnn"
    # The teacher trains on center views: on 32 px digits, inception crops down to 5 % of the
    # area hide the digit and slow its training several-fold; a clean-view teacher reaches ~99 %
    # in a few epochs, and function matching then teaches the student on the crops anyway.
    teacher_views: str = "center"
    teacher_epochs: int = 10
    student_epochs: int = 20
    cache_epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    limit: int | None = None


SMOKE = DemoSettings(teacher_epochs=1, student_epochs=1, cache_epochs=1, limit=256)
MODES = ("none", "online", "cached")


def run_demo(
    out: str,
    smoke: bool = False,
    workers: int = 2,
    device: str = "auto",
    bar: Callable | None = None,
    fit: Callable | None = None,
) -> dict[str, Any]:
    """Run the demo into ``out``; returns the report (also written to ``out/report.json``).

    bar: context manager factory ``bar(total, desc)`` yielding ``update(n)`` (progress bars);
    fit: the training entry point to use (the CLI passes one that draws progress bars).
    """
    from kdcache.cache import precompute
    from kdcache.cli.shards import write_shards
    from kdcache.train import TrainConfig
    from kdcache.train import fit as plain_fit
    from kdcache.train.modes import get_mode
    from kdcache.train.trainer import read_metrics

    settings = SMOKE if smoke else DemoSettings()
    fit = fit or plain_fit
    data_dir = os.path.join(out, "data")
    train_glob, val_glob = (
        os.path.join(data_dir, "train-*.tar"),
        os.path.join(data_dir, "val-*.tar"),
    )
    for split, pattern in (("train", train_glob), ("val", val_glob)):
        if not glob.glob(pattern):
            log.info("writing digits %s shards to %s", split, data_dir)
            write_shards("digits", data_dir, split, settings.shard_size, limit=settings.limit)
    data, val = train_glob, val_glob

    # What every run shares; each run below varies it, and the cache is its teacher pass.
    base = TrainConfig(
        data=data,
        val=val,
        student=settings.student,
        out=out,
        epochs=settings.student_epochs,
        image_size=settings.image_size,
        batch_size=settings.batch_size,
        lr=settings.lr,
        workers=workers,
        device=device,
        resume=True,
        limit=settings.limit,
    )

    def train(name: str, mode: str, **kw: Any) -> dict[str, Any]:
        cfg = replace(base, out=os.path.join(out, name), teacher_mode=mode, **kw)
        log.info("training %s (%s, %d epochs)", name, mode, cfg.epochs)
        fit(cfg)
        return {"history": read_metrics(cfg.out), "run": cfg.out}

    teacher_run = train(
        "teacher",
        "none",
        student=settings.teacher,
        epochs=settings.teacher_epochs,
        views=settings.teacher_views,
    )
    teacher_weights = os.path.join(out, "teacher", "model.pt")
    cache = os.path.join(out, "teacher.zarr")
    log.info(
        "precomputing %d epochs of function-matching views into %s", settings.cache_epochs, cache
    )
    base = replace(base, teacher=settings.teacher, teacher_weights=teacher_weights)
    pre = base.teacher_pass(cache, settings.cache_epochs, "function_matching")
    if bar is not None:
        with bar(None, "precompute") as update:
            pre_result = precompute(pre, progress=update)
    else:
        pre_result = precompute(pre)

    students = {}
    for mode in MODES:
        reads_cache = get_mode(mode).reads_cache  # the registry says; no mode names here
        extra = {"cache": cache} if reads_cache else {"views": "function_matching"}
        students[mode] = train(f"student-{mode}", mode, **extra)
    report = _report(settings, teacher_run, students, pre_result)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    _plot(teacher_run, students, os.path.join(out, "accuracy.png"))
    return report


def _report(settings: DemoSettings, teacher: dict, students: dict, pre: dict) -> dict[str, Any]:
    def summary(run: dict) -> dict[str, Any]:
        last = run["history"][-1]
        out = {
            "accuracy": last["val_accuracy"],
            "best_accuracy": max(m["val_accuracy"] for m in run["history"]),
            "train_loss": last["train_loss"],
            "images_per_s": sum(m["images_per_s"] for m in run["history"]) / len(run["history"]),
            "epochs": last["epoch"],
        }
        if "teacher_agreement" in last:
            out["teacher_agreement"] = last["teacher_agreement"]
        return out

    return {
        "teacher": {"model": settings.teacher, **summary(teacher)},
        "student_model": settings.student,
        "students": {mode: summary(run) for mode, run in students.items()},
        "cache": {
            "epochs": settings.cache_epochs,
            "views": "function_matching",
            "precompute_images_per_s": pre.get("images_per_s"),
        },
        "plan": settings.__dict__,
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a small text table."""
    lines = [
        f"teacher {report['teacher']['model']}: val accuracy {report['teacher']['accuracy']:.4f}",
        f"student {report['student_model']}, {report['plan']['student_epochs']} epochs:",
        f"  {'targets':<8} {'val acc':>8} {'best':>8} {'agree':>8} {'train img/s':>12}",
    ]
    for mode, s in report["students"].items():
        agree = f"{s['teacher_agreement']:.4f}" if "teacher_agreement" in s else "-"
        lines.append(
            f"  {mode:<8} {s['accuracy']:>8.4f} {s['best_accuracy']:>8.4f} "
            f"{agree:>8} {s['images_per_s']:>12.0f}"
        )
    return "\n".join(lines)


def _plot(teacher: dict, students: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'kdcache[demo]'); no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for mode, run in students.items():
        h = run["history"]
        ax.plot(
            [m["epoch"] for m in h],
            [m["val_accuracy"] for m in h],
            marker="o",
            ms=3,
            label=f"student, {mode}",
        )
    ax.axhline(teacher["history"][-1]["val_accuracy"], color="grey", ls="--", label="teacher")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val accuracy (center view)")
    ax.set_title("kdcache demo: digits")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
