"""The ``kdcache`` command: thin entry points over the library, progress bars at this edge only.

Errors the user can fix (:class:`~kdcache.errors.KdcacheError`) are printed as one line and exit
with status 2; anything else is a bug and exits 1, with the traceback only under ``--debug``.
Stage modules are imported inside each command, so ``kdcache --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

from kdcache.errors import KdcacheError
from kdcache.version import __version__

log = logging.getLogger("kdcache")
# Under torchrun only rank 0 draws progress bars and prints results; the others log warnings.
MAIN_PROCESS = os.environ.get("RANK", "0") == "0"
_QUIET: list[bool] = []  # set by -q: no progress bars either
WEIGHTS_HELP = (
    "the teacher's weights: a .pt/.pth state dict (raw, or in a 'model' or 'state_dict' key) "
    "or a .safetensors file; without one the teacher is a random initialisation"
)


# -- output helpers ------------------------------------------------------------------------


@contextmanager
def _bar(total: int | None, desc: str, unit: str = "img"):
    """A tqdm bar on stderr; yields ``update(n, total=None)`` (a total, once known, gives the
    bar its length and ETA). Library logs are routed around it; ``-q`` hides it."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    with (
        logging_redirect_tqdm(),
        tqdm(
            total=total,
            desc=desc,
            unit=unit,
            dynamic_ncols=True,
            smoothing=0.1,
            file=sys.stderr,
            disable=not MAIN_PROCESS or bool(_QUIET),
        ) as bar,
    ):

        def update(n: int, total: int | None = None) -> None:
            if total is not None and total != bar.total:
                bar.reset(total=total)
            if n:
                bar.update(n)

        yield update


def _emit(args: argparse.Namespace, result: dict[str, Any], human: Callable[[], None]) -> None:
    if not MAIN_PROCESS:
        return
    if getattr(args, "json", False):
        print(json.dumps(result, default=str))
    else:
        human()


def _table(rows: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


# -- commands ------------------------------------------------------------------------------


def cmd_shards(args: argparse.Namespace) -> int:
    from kdcache.cli.shards import write_shards

    limit = 200 if args.smoke else args.limit
    with _bar(limit, f"shards {args.split}") as update:
        paths = write_shards(
            args.source,
            args.out,
            args.split,
            args.shard_size,
            args.seed,
            limit,
            progress=update,
            overwrite=args.overwrite,
        )
    _emit(args, {"shards": paths}, lambda: print(f"wrote {len(paths)} shards to {args.out}"))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from kdcache.data.index import load_index

    with _bar(None, "index", unit="sample") as update:
        index = load_index(args.data, rebuild=args.rebuild, progress=update)
    result = {
        "samples": index.num_samples,
        "shards": len(index.units),
        "classes": index.num_classes,
        "fingerprint": index.fingerprint,
        "unlabelled": int((index.label < 0).sum()),
        "unreadable": int((index.size == 0).any(axis=1).sum()),
    }
    _emit(args, result, lambda: _table(list(result.items())))
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    from kdcache.cache import PrecomputeConfig, precompute

    cfg = PrecomputeConfig(
        data=args.data,
        teacher=args.teacher,
        teacher_weights=args.teacher_weights,
        out=args.out,
        epochs=args.epochs,
        topk=args.topk,
        views=args.views,
        plan_seed=args.plan_seed,
        teacher_image_size=args.teacher_image_size,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        compile=args.compile,
        num_classes=args.num_classes,
        strict=args.strict,
        teacher_mean=args.teacher_mean,
        teacher_std=args.teacher_std,
        max_image_pixels=args.max_image_pixels,
    )
    if args.smoke:
        # The units of the first 256 samples, one epoch: what `train --smoke` reads.
        cfg.epochs, cfg.limit, cfg.batch_size = 1, 256, min(cfg.batch_size, 64)
    with _bar(None, "precompute", unit="view") as update:
        result = precompute(cfg, progress=update)
    reasons = ", ".join(f"{n} {why}" for why, n in result["bad_rows_by_reason"].items())
    _emit(
        args,
        result,
        lambda: print(
            f"{args.out}: {result['images']} views in {result['seconds']:.1f} s "
            f"({result['images_per_s']} img/s), {result['epochs_complete']} epochs complete, "
            f"{result['bad_rows']} bad rows" + (f" ({reasons})" if reasons else "")
        ),
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from kdcache.store import open_cache

    summary = open_cache(args.cache).summary()

    def human() -> None:
        hidden = ("bytes_per_row_by_array", "versions")
        shown = [(k, v) for k, v in summary.items() if k not in hidden]
        _table([(k, f"{v:.1%}" if "fraction" in k and v is not None else v) for k, v in shown])
        share, size = summary.get("overhead_fraction"), summary.get("shard_size_for_10pct_overhead")
        if share is not None and share > 0.1 and size:
            print(
                f"per-file overhead is {share:.0%} of the unit files' bytes (file sizes; "
                f"{summary['overhead_fraction_on_disk']:.0%} of their blocks on disk): shards of "
                f">= {size} samples would bring it under 10 % (>= "
                f"{summary['shard_size_for_10pct_overhead_on_disk']} on disk); see the README, "
                "'Choosing --shard-size for a cache'"
            )

    _emit(args, summary, human)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from kdcache.cache.verify import verify

    samples = 16 if args.smoke else args.samples
    with _bar(samples, "verify", unit="view") as update:
        result = verify(
            args.cache,
            args.data,
            args.teacher,
            args.teacher_weights,
            samples,
            args.seed,
            args.device,
            batch_size=args.batch_size,
            progress=update,
            repair=args.repair,
            workers=args.workers,
            teacher_mean=args.teacher_mean,
            teacher_std=args.teacher_std,
        )
    ok = result["top1_agreement"] >= args.min_agreement
    _emit(args, result, lambda: _table(list(result.items())))
    if not ok:
        print(
            f"kdcache: verify failed: top-1 agreement {result['top1_agreement']:.4f} is below "
            f"--min-agreement {args.min_agreement}",
            file=sys.stderr,
        )
    return 0 if ok else 1


def cmd_train(args: argparse.Namespace) -> int:
    from kdcache.train import TrainConfig

    # Every train option is a TrainConfig field of the same name; `command` is the
    # subcommand's name here and the full command line there, so it is not taken.
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"command"}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    if args.smoke:
        cfg.epochs, cfg.limit = 1, min(cfg.limit or 256, 256)
        cfg.batch_size = min(cfg.batch_size, 32)
    result = _fit_with_bars(cfg)
    _emit(args, result, lambda: _table(list(result.items())))
    return 0


def _fit_with_bars(cfg: Any) -> dict[str, Any]:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from kdcache.train import fit

    bar: list[tqdm] = []

    def on_step(epoch: int, step: int, steps: int, loss: float) -> None:
        if step == 0 or not bar:
            if bar:
                bar.pop().close()
            bar.append(
                tqdm(
                    total=steps,
                    desc=f"epoch {epoch + 1}/{cfg.epochs}",
                    unit="step",
                    dynamic_ncols=True,
                    file=sys.stderr,
                    leave=False,
                    disable=not MAIN_PROCESS or bool(_QUIET),
                )
            )
        bar[0].update(1)
        if loss == loss:  # not NaN: fit reports the loss every few steps
            bar[0].set_postfix(loss=f"{loss:.4f}")

    def on_epoch(metrics: dict[str, Any]) -> None:
        if bar:
            bar.pop().close()

    with logging_redirect_tqdm():
        try:
            return fit(cfg, on_step=on_step, on_epoch=on_epoch)
        finally:
            if bar:
                bar.pop().close()


def cmd_eval(args: argparse.Namespace) -> int:
    from kdcache.train.evaluate import evaluate_saved

    result = evaluate_saved(
        args.model_path,
        args.data,
        args.model,
        args.image_size,
        args.num_classes,
        args.teacher,
        args.teacher_weights,
        args.teacher_image_size,
        args.device,
        args.workers,
        label_map=args.label_map,
        teacher_mean=args.teacher_mean,
        teacher_std=args.teacher_std,
    )
    _emit(args, result, lambda: _table(list(result.items())))
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from kdcache.cli.ablate import DEFAULT_MODES, AblateConfig, ablate, format_table, with_smoke

    def ints(text: str | None) -> tuple[int, ...]:
        try:
            return tuple(int(v) for v in text.split(",") if v.strip()) if text else ()
        except ValueError:
            raise KdcacheError(f"--patience takes epochs like 10,30,100, got {text!r}") from None

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip()) if args.modes else None
    cfg = AblateConfig(
        data=args.data,
        val=args.val,
        teacher=args.teacher,
        teacher_weights=args.teacher_weights,
        student=args.student,
        epochs=args.epochs,
        out=args.out,
        modes=modes or DEFAULT_MODES,
        seeds=args.seeds,
        patience=ints(args.patience),
        plan_seed=args.plan_seed,
        image_size=args.image_size,
        teacher_image_size=args.teacher_image_size,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        clip_grad=args.clip_grad,
        temperature=args.temperature,
        workers=args.workers,
        device=args.device,
        limit=args.limit,
    )
    if args.smoke:
        cfg = with_smoke(cfg)
    results = ablate(cfg, fit=_fit_with_bars, bar=_bar)
    where = f"wrote {args.out}/ablation.json, ablation.md, ablation.png"
    _emit(
        args,
        {k: v for k, v in results.items() if k != "config"},
        lambda: print(format_table(results) + "\n\n" + where),
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from kdcache.cli.demo import run_demo

    report = run_demo(
        args.out,
        smoke=args.smoke,
        workers=args.workers,
        device=args.device,
        bar=_bar,
        fit=_fit_with_bars,
    )
    from kdcache.cli.demo import format_report

    _emit(args, report, lambda: print(format_report(report)))
    return 0


# -- parser --------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, json_out: bool = True, smoke: bool = False) -> None:
    g = p.add_argument_group("general")
    g.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    g.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    if json_out:
        g.add_argument(
            "--json",
            action="store_true",
            help="print the result as one JSON object (the last line of output)",
        )
    if smoke:
        g.add_argument(
            "--smoke", action="store_true", help="shrink the job to seconds, for a first try"
        )


def _device(p: argparse.ArgumentParser, workers: bool = True) -> None:
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available) [auto]"
    )
    if not workers:
        return
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="DataLoader worker processes that decode and render (0: in-process) [2]",
    )


def _views(p: argparse.ArgumentParser, default: str | None) -> None:
    from kdcache.views import PRESETS

    p.add_argument(
        "--views",
        choices=list(PRESETS),
        default=default,
        help="view preset: function_matching (crop+flip+mixup), consistent "
        "(crop+flip), center (no randomness)"
        + (
            f" [{default}]"
            if default
            else " [cached: the cache's; fixed, independent: consistent; else function_matching]"
        ),
    )
    p.add_argument(
        "--plan-seed",
        type=int,
        default=0 if default else None,
        help="seed of the views (not of the model or order) [0]",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdcache",
        description="Patient and consistent knowledge distillation with a precomputed teacher "
        "cache. Typical flow: shards -> precompute -> train (cached) -> eval.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `kdcache COMMAND --help` for a command's options; `make demo` runs the "
        "whole flow on the bundled digits data.",
    )
    parser.add_argument("--version", action="version", version=f"kdcache {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "shards",
        help="write WebDataset tar shards from an image source",
        description="Write KEY.{png,jpg} (+ KEY.cls when labelled) tar shards "
        "OUT/SPLIT-NNNNNN.tar.",
    )
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        help="digits (scikit-learn's bundled 8x8 digits, upscaled) or imagefolder:PATH "
        "(PATH/CLASS/IMAGE: labelled; PATH/IMAGE, no class folders: unlabelled, no .cls)",
    )
    p.add_argument("--out", required=True, help="directory for the shards")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the split's shards already in --out (otherwise they are refused)",
    )
    p.add_argument("--split", default="train", choices=["train", "val"], help="[train]")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard [1000]")
    p.add_argument("--seed", type=int, default=0, help="seed of the order inside the split [0]")
    p.add_argument("--limit", type=int, default=None, help="write at most N samples")
    _common(p, smoke=True)
    p.set_defaults(func=cmd_shards)

    p = sub.add_parser(
        "index",
        help="index shards: counts, key hashes, labels, fingerprint",
        description="Read DATA once and save its index next to the shards "
        "(or in ~/.cache/kdcache when that is read-only).",
    )
    p.add_argument(
        "data",
        help="shard directory, brace pattern dir/train-{000000..000009}.tar, "
        "or a comma-separated list",
    )
    p.add_argument("--rebuild", action="store_true", help="re-read the shards even if indexed")
    _common(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser(
        "precompute",
        help="run the teacher over many epochs of views -> cache",
        description="Render the teacher's views for every (epoch, shard), run the "
        "teacher and write top-k logits with the view parameters to a "
        "Zarr cache. Re-running the same command resumes; a larger "
        "--epochs extends the cache.",
    )
    p.add_argument("--data", required=True, help="training shards (see `kdcache index`)")
    p.add_argument("--teacher", required=True, help="model spec, e.g. torchvision:resnet50")
    p.add_argument("--teacher-weights", help=WEIGHTS_HELP)
    p.add_argument("--out", required=True, help="cache path (a directory, conventionally .zarr)")
    p.add_argument("--epochs", type=int, required=True, help="epochs of views to store")
    p.add_argument("--topk", type=int, default=None, help="logits kept per view [min(10, C)]")
    _views(p, "function_matching")
    p.add_argument(
        "--teacher-image-size",
        type=_size,
        default=224,
        help="teacher input px, or auto (the data's median short side) [224]",
    )
    p.add_argument("--batch-size", type=int, default=256, help="[256]")
    _num_classes(p, "the teacher's own head; built-in nets: the data's label count")
    _convention(p, "teacher")
    _max_pixels(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the teacher")
    p.add_argument(
        "--strict",
        action="store_true",
        help="an unusable image (no image, undecodable, too large, a mixing partner that does "
        "not decode) or a shard cut short (no end-of-archive blocks) is an error; by default "
        "such rows are marked bad in the cache with their reason, counted, and skipped by "
        "training, and a cut shard is a warning. Labels are never needed",
    )
    _device(p)
    _common(p, smoke=True)
    p.set_defaults(func=cmd_precompute)

    p = sub.add_parser(
        "inspect",
        help="summarise a cache",
        description="Epochs done, rows, "
        "bytes per row on disk, teacher, view spec, data fingerprint.",
    )
    p.add_argument("cache")
    _common(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "verify",
        help="re-run the teacher on sampled cached views and compare",
        description="First read every chunk of the cache and check every checksum (damage "
        "is reported by array, epoch and unit, exit 2; --repair recomputes just those units). "
        "Then re-render N random cached views exactly as the trainer does, re-run the teacher "
        "and report agreement; exit 1 when top-1 agreement is below --min-agreement.",
    )
    p.add_argument("cache")
    p.add_argument("--data", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--teacher-weights", help=WEIGHTS_HELP)
    p.add_argument("--samples", type=int, default=256, help="views to check [256]")
    p.add_argument("--seed", type=int, default=0, help="which views are sampled [0]")
    p.add_argument("--batch-size", type=int, default=128, help="[128]")
    _convention(p, "teacher")
    p.add_argument("--min-agreement", type=float, default=0.99, help="[0.99]")
    p.add_argument(
        "--repair", action="store_true", help="recompute damaged units (needs write access)"
    )
    _device(p)
    _common(p, smoke=True)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "train",
        help="train a student (teacher modes: cached, online, fixed, independent, none)",
        description="Stream the shards, replay or draw the views, train the "
        "student. Writes OUT/config.json, metrics.jsonl, "
        "checkpoint.pt and model.pt.",
    )
    _add_train_options(p)
    _common(p, smoke=True)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "ablate",
        help="train one student under every teacher mode, compare",
        description="The teacher grid of Beyer et al. 2022 on one data path: "
        "builds the caches the modes need (reusing existing ones), "
        "trains every mode with the same student, budget and seeds, "
        "writes OUT/ablation.json, ablation.md and ablation.png.",
    )
    p.add_argument("--data", required=True, help="training shards")
    p.add_argument("--val", required=True, help="held-out shards")
    p.add_argument("--teacher", required=True)
    p.add_argument("--teacher-weights", help=WEIGHTS_HELP)
    p.add_argument("--student", required=True)
    p.add_argument("--epochs", type=int, required=True, help="student epochs of every mode")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--modes",
        default=None,
        help="comma-separated TEACHER_MODE[:PRESET] (default: none, fixed, "
        "independent, online:consistent, cached:consistent, "
        "online:function_matching, cached:function_matching)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="seeds of the student's init and order; views and caches stay fixed [1]",
    )
    p.add_argument(
        "--patience",
        default=None,
        help="comma-separated budgets (epochs) for the function-matching modes: "
        "the paper's patience curve",
    )
    p.add_argument("--limit", type=int, default=None, help="train on the first N samples only")
    p.add_argument("--plan-seed", type=int, default=0, help="seed of the views [0]")
    p.add_argument("--image-size", type=int, default=224, help="[224]")
    p.add_argument("--teacher-image-size", type=int, default=None, help="[--image-size]")
    _add_optim_options(p)
    _device(p)
    _common(p, smoke=True)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser(
        "eval",
        help="accuracy of a saved model on center views",
        description="Score a run directory (its model.pt and config.json) or a weights file.",
    )
    p.add_argument("model_path", metavar="RUN_OR_WEIGHTS")
    p.add_argument("--data", required=True, help="evaluation shards")
    p.add_argument("--model", help="model spec [the run's student]")
    p.add_argument(
        "--image-size", type=_size, default=None, help="px or auto [the run's, else 224]"
    )
    _num_classes(p, "the run's; else the teacher's, or the labels'")
    p.add_argument("--teacher", help="also report agreement (top-1, top-5) and KL to this teacher")
    p.add_argument("--teacher-weights", help=WEIGHTS_HELP)
    p.add_argument(
        "--teacher-image-size",
        type=_size,
        default=None,
        help="[the run's teacher's (the cache's), else --image-size]",
    )
    _convention(p, "teacher")
    _label_map(p)
    _device(p)
    _common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "demo",
        help="the whole flow on the bundled digits data (~7 min on 2 CPU cores)",
        description="digits shards -> teacher (hard labels) -> function-matching "
        "cache -> the same student three ways (hard labels, online "
        "teacher, cached teacher) -> OUT/report.json, "
        "OUT/accuracy.png.",
    )
    p.add_argument("--out", default="runs/demo", help="[runs/demo]")
    _device(p)
    _common(p, smoke=True)
    p.set_defaults(func=cmd_demo)
    return parser


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from kdcache.train.modes import MODES

    g = p.add_argument_group("data and run")
    g.add_argument("--data", required=True, help="training shards")
    g.add_argument("--val", required=True, help="held-out shards (center views)")
    g.add_argument("--out", required=True, help="run directory")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue OUT/checkpoint.pt; options that change the run (models, data, cache, "
        "views, seeds, sizes, batch size, optimiser) must be the run's own (OUT/config.json), "
        "--workers, --device, --checkpoint-every and --strict may change",
    )
    g.add_argument(
        "--extend",
        action="store_true",
        help="with --resume: allow more --epochs than the run had; the warm-up and cosine "
        "schedule are recomputed over the new --epochs and continue from the current step "
        "(the lr jumps to that curve's value)",
    )
    g.add_argument(
        "--strict",
        action="store_true",
        help="unusable rows (bad in the cache, unreadable images) and shards cut short are "
        "errors, not skipped or warned about",
    )
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="also checkpoint every N steps inside an epoch (0: at epoch ends) [0]",
    )
    g.add_argument(
        "--limit",
        type=int,
        default=None,
        help="train on the first N samples only (by global index)",
    )
    g = p.add_argument_group("models")
    g.add_argument("--student", required=True, help="model spec, e.g. kdcache:resnet_s")
    g.add_argument("--student-weights", help="initial weights of the student")
    g.add_argument(
        "--teacher-mode",
        choices=tuple(MODES),
        default="cached",
        help="where targets come from: cached (replay the --cache), online (run --teacher on "
        "the same views), fixed (the teacher's center-view predictions: a one-epoch --cache, "
        "made on first use), independent (--teacher on its own random view), none (hard "
        "labels) [cached]",
    )
    g.add_argument(
        "--cache",
        help="cached mode: a cache made by `kdcache precompute`; fixed mode: the teacher's "
        "one-epoch center-view cache (made there on first use when --teacher is given)",
    )
    g.add_argument(
        "--teacher",
        help="teacher spec (online mode; in cached mode it is checked "
        "against the cache and used for val agreement)",
    )
    g.add_argument("--teacher-weights", help=WEIGHTS_HELP)
    _num_classes(g, "the teacher's (the cache's); none mode: the labels'")
    _convention(g, "student")
    _convention(g, "teacher")
    _label_map(g)
    _max_pixels(g)
    g = p.add_argument_group("views")
    _views(g, None)
    g.add_argument(
        "--image-size",
        type=_size,
        default=224,
        help="student input px, or auto (the data's median short side) [224]",
    )
    g.add_argument(
        "--teacher-image-size",
        type=_size,
        default=None,
        help="teacher input px or auto [the cache's, or --image-size]",
    )
    g = p.add_argument_group("optimisation (Beyer et al. 2022 names)")
    g.add_argument("--epochs", type=int, required=True)
    _add_optim_options(g)
    g.add_argument(
        "--loss",
        metavar="SPEC",
        default=None,
        help="the loss: name(k=v) terms joined by +, each with a weight w, e.g. "
        "'kl(t=2)+ce(w=0.1)' or 'kl+myloss:Smooth(w=0.5)' (a class in ./myloss.py); built-ins "
        "kl, ce; see docs/extending.md [kl(t=--temperature), ce() with --teacher-mode none]",
    )
    g.add_argument("--seed", type=int, default=0, help="student init and data order [0]")
    _device(g)


def _size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected px (an integer) or auto, got {text!r}"
        ) from None


def _triple(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected R,G,B (or one value), got {text!r}")
    return values  # type: ignore[return-value]


def _convention(g: Any, who: str) -> None:
    g.add_argument(
        f"--{who}-mean",
        type=_triple,
        default=None,
        metavar="R,G,B",
        help=f"the {who}'s input mean on [0, 1] pixels [its own: timm's pretrained config, "
        "torchvision's weights transforms, a factory's pretrained_cfg; else ImageNet's]",
    )
    g.add_argument(
        f"--{who}-std", type=_triple, default=None, metavar="R,G,B", help="[as the mean]"
    )


def _num_classes(g: Any, default: str) -> None:
    g.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help=f"the class count models are built with; checked against the width each model "
        f"really has [{default}]",
    )


def _max_pixels(g: Any) -> None:
    g.add_argument(
        "--max-image-pixels",
        type=int,
        default=None,
        metavar="N",
        help="images of more pixels are bad rows ('too large'), never decoded [Pillow's limit, "
        "PIL.Image.MAX_IMAGE_PIXELS: about 89 M]",
    )


def _label_map(g: Any) -> None:
    g.add_argument(
        "--label-map",
        metavar="FILE",
        help="JSON: data label -> teacher class (a list, or an object), so val accuracy can "
        "be scored when the labels are not the teacher's classes",
    )


def _add_optim_options(g: Any) -> None:
    """The optimiser knobs train and ablate share."""
    g.add_argument("--batch-size", type=int, default=256, help="[256]")
    g.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate [1e-3]")
    g.add_argument(
        "--weight-decay",
        type=float,
        default=1e-4,
        help="AdamW weight decay (PyTorch convention, multiplied by lr) [1e-4]",
    )
    g.add_argument("--warmup", type=float, default=1.0, help="epochs of linear warm-up [1]")
    g.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clip, 0 off [1]")
    g.add_argument("--temperature", type=float, default=1.0, help="distillation T [1]")


def _setup_logging(args: argparse.Namespace) -> None:
    quiet = args.quiet or not MAIN_PROCESS
    _QUIET[:] = [True] if args.quiet else []
    level = logging.DEBUG if args.debug else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger("kdcache")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


RESUME_HINTS = {
    "precompute": "finished units are saved; re-run the same command to resume",
    "train": "re-run the same command with --resume to continue from the last checkpoint",
    "ablate": "re-run the same command: finished caches and runs are reused",
    "demo": "re-run the same command: what is finished is reused",
}
_stopped_by: list[int] = []


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (preemption, scancel, docker stop) stops a job like Ctrl-C does."""
    _stopped_by.append(signum)
    raise KeyboardInterrupt


def _interrupted(args: argparse.Namespace) -> int:
    hint = RESUME_HINTS.get(args.command, "")
    name = "SIGTERM" if _stopped_by else "interrupt"
    print(
        f"kdcache {args.command}: stopped by {name}" + (f"; {hint}" if hint else ""),
        file=sys.stderr,
    )
    return 143 if _stopped_by else 130


def _message(e: Exception) -> str:
    """The error's own sentence. An error raised in a DataLoader worker reaches the main
    process re-raised with the worker's traceback as its text: keep its last line only."""
    text = str(e)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    name = f"{type(e).__module__}.{type(e).__name__}: "
    return last.removeprefix(name).removeprefix(f"{type(e).__name__}: ")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except KdcacheError as e:
        if args.debug:
            raise
        print(f"kdcache {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable output, full disk, missing file: the OS said it best
        if args.debug:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"kdcache {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted(args)
    except Exception as e:
        if _stopped_by:  # e.g. DataLoader workers that got the same SIGTERM died first
            return _interrupted(args)
        if args.debug:
            raise
        print(
            f"kdcache {args.command}: internal error: {type(e).__name__}: {e} "
            "(re-run with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1
    finally:
        if "torch.distributed" in sys.modules:  # leave torchrun's process group cleanly
            from kdcache.dist import teardown

            teardown()
