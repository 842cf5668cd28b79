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
from kdcache.options import (
    DEVICE_HELP,
    LABEL_MAP_HELP,
    WEIGHTS_HELP,
    WORKERS_HELP,
    add_config_option,
    add_options,
    build,
    image_size,
    mean_help,
    num_classes_help,
    read_config_file,
    rgb,
)
from kdcache.precompute_config import PrecomputeConfig
from kdcache.version import __version__

log = logging.getLogger("kdcache")
# Under torchrun only rank 0 draws progress bars and prints results; the others log warnings.
MAIN_PROCESS = os.environ.get("RANK", "0") == "0"
_QUIET: list[bool] = []  # set by -q: no progress bars either


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
    from kdcache.cli.shards import write_beton, write_shards

    limit = 200 if args.smoke else args.limit
    if args.to == "ffcv":
        with _bar(limit, f"shards {args.split}") as update:
            path = write_beton(
                args.source, args.out, args.split, args.shard_size, args.seed, limit,
                progress=update, overwrite=args.overwrite,
            )  # fmt: skip
        _emit(args, {"beton": path}, lambda: print(f"wrote {path}"))
        return 0
    if args.source.startswith("shards:"):
        raise KdcacheError("--from shards:DATA converts tar shards: use it with --to ffcv")
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
    from kdcache.cache import precompute

    cfg = precompute_config(args)
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
            f"{cfg.out}: {result['images']} views in {result['seconds']:.1f} s "
            f"({result['images_per_s']} img/s), {result['epochs_complete']} epochs complete, "
            f"{result['bad_rows']} bad rows" + (f" ({reasons})" if reasons else "")
        ),
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from kdcache.cache.inspect import summary as cache_summary
    from kdcache.store import open_cache

    summary = cache_summary(open_cache(args.cache))

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
            renderer=args.renderer,
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
    cfg, expect = train_config(args)
    if args.smoke:
        cfg.epochs, cfg.limit = 1, min(cfg.limit or 256, 256)
        cfg.batch_size = min(cfg.batch_size, 32)
    result = _fit_with_bars(cfg, expect=expect)
    _emit(args, result, lambda: _table(list(result.items())))
    return 0


def _fit_with_bars(cfg: Any, expect: dict[str, Any] | None = None) -> dict[str, Any]:
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
            return fit(cfg, on_step=on_step, on_epoch=on_epoch, expect=expect)
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
        retrieval=args.retrieval,
        database=args.database,
        renderer=args.renderer,
    )
    _emit(args, result, lambda: _table(list(result.items())))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from kdcache.features import layer_table
    from kdcache.models import BUILTIN, load_model

    if not args.layers:
        forms = ["kdcache:" + n for n in BUILTIN] + [
            "torchvision:NAME",
            "timm:NAME[.TAG]",
            "pkg.module:factory",
        ]
        _emit(args, {"specs": forms}, lambda: print("\n".join(forms)))
        return 0
    model = load_model(
        args.layers,
        image_size=args.image_size,
        num_classes=args.num_classes,
        default_classes=10,
        weights=None,
    )
    rows = layer_table(model.module, args.image_size)
    result = {"model": args.layers, "image_size": args.image_size, "layers": rows}

    def human() -> None:
        width = max(len(name) for name, _, _ in rows)
        kinds = max(len(kind) for _, kind, _ in rows)
        for name, kind, shape in rows:
            print(f"{name:<{width}}  {kind:<{kinds}}  {' x '.join(map(str, shape))}")

    _emit(args, result, human)
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from kdcache.cli.ablate import SHARED_OPTIONS, AblateConfig, ablate, format_table, with_smoke
    from kdcache.train.config import TrainConfig

    grid = _names(AblateConfig) - {"train"}
    values = _file_options(args, set(SHARED_OPTIONS) | grid, nested="train")
    where = _where(args)
    train = build(
        TrainConfig, args, values, only=SHARED_OPTIONS, required=("teacher",), where=where
    )
    cfg = build(AblateConfig, args, values, only=grid, extra={"train": train}, where=where)
    if args.smoke:
        cfg = with_smoke(cfg)
    results = ablate(cfg, fit=_fit_with_bars, bar=_bar)
    where = f"wrote {cfg.out}/ablation.json, ablation.md, ablation.png"
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


# -- options -------------------------------------------------------------------------------


def _names(cls: type) -> set[str]:
    """The fields of a config that a --config file may set (``command`` is recorded, not set)."""
    return {f.name for f in dataclasses.fields(cls)} - {"command"}


def _where(args: argparse.Namespace) -> str:
    return f"--config {args.config}" if getattr(args, "config", None) else "the options"


def _file_options(
    args: argparse.Namespace,
    known: set[str],
    resolved: Sequence[str] = (),
    nested: str | None = None,
) -> dict[str, Any]:
    """The options of ``--config FILE`` (none without one); a key that is no option of the
    command is an error naming it. resolved: keys a run records beside its options (kept, for
    the caller to check); nested: a key whose object holds more options (ablate's ``train``)."""
    if not getattr(args, "config", None):
        return {}
    values = read_config_file(args.config)
    if nested and isinstance(values.get(nested), dict):
        values = {**values.pop(nested), **values}
    unknown = sorted(set(values) - known - set(resolved) - {"command"})
    if unknown:
        raise KdcacheError(
            f"--config {args.config}: {', '.join(unknown)} "
            f"{'is not an option' if len(unknown) == 1 else 'are not options'} of "
            f"`kdcache {args.command}` (options: {', '.join(sorted(known))})"
        )
    return values


def precompute_config(args: argparse.Namespace) -> PrecomputeConfig:
    """``kdcache precompute``'s options (and its --config file) as a PrecomputeConfig."""
    values = _file_options(args, _names(PrecomputeConfig))
    return build(PrecomputeConfig, args, values, where=_where(args))


def train_config(args: argparse.Namespace) -> tuple[Any, dict[str, Any] | None]:
    """``kdcache train``'s options (and its --config file) -> (TrainConfig, expect).

    A run's config.json also holds what the run resolved (view spec, data fingerprint, ...):
    those come back as ``expect``, for ``fit`` to check against what this run resolves."""
    from kdcache.train.config import RESOLVED_KEYS, TrainConfig

    values = _file_options(args, _names(TrainConfig), resolved=RESOLVED_KEYS)
    expect = {k: values.pop(k) for k in RESOLVED_KEYS if k in values}
    return build(TrainConfig, args, values, where=_where(args)), expect or None


def ablate_config(args: argparse.Namespace) -> Any:
    """``kdcache ablate``'s options (and its --config file) as an AblateConfig: the grid's
    own fields, and the train options every run shares (a file may nest them under train)."""
    from kdcache.cli.ablate import SHARED_OPTIONS, AblateConfig
    from kdcache.train.config import TrainConfig

    grid = _names(AblateConfig) - {"train"}
    values = _file_options(args, set(SHARED_OPTIONS) | grid, nested="train")
    where = _where(args)
    train = build(
        TrainConfig, args, values, only=SHARED_OPTIONS, required=("teacher",), where=where
    )
    return build(AblateConfig, args, values, only=grid, extra={"train": train}, where=where)


# -- parser --------------------------------------------------------------------------------


def _common(
    p: argparse.ArgumentParser, json_out: bool = True, smoke: bool = False, config: bool = False
) -> None:
    g = p.add_argument_group("general")
    if config:
        add_config_option(g)
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


def _device(p: Any, workers: bool = True) -> None:
    """--device and --workers of the commands without a config (verify, eval, demo)."""
    p.add_argument("--device", default="auto", help=f"{DEVICE_HELP} [auto]")
    if workers:
        p.add_argument("--workers", type=int, default=2, help=f"{WORKERS_HELP} [2]")


def _convention(g: Any, who: str) -> None:
    g.add_argument(f"--{who}-mean", type=rgb, metavar="R,G,B", help=mean_help(who))
    g.add_argument(f"--{who}-std", type=rgb, metavar="R,G,B", help="[as the mean]")


def build_parser() -> argparse.ArgumentParser:
    from kdcache.cli.ablate import SHARED_OPTIONS, AblateConfig
    from kdcache.train.config import MODELS, OPTIM, RUN, VIEWS, TrainConfig

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
        help="write WebDataset tar shards (or an FFCV .beton) from an image source",
        description="Write KEY.{png,jpg} (+ KEY.cls when labelled) tar shards "
        "OUT/SPLIT-NNNNNN.tar, or with --to ffcv the FFCV file OUT/SPLIT.beton holding the same "
        "samples: each image's encoded bytes as they are (FFCV's raw bytes field, not its "
        "re-encoding RGBImageField), its key, label and unit (the shard it would be in). "
        "Pass the .beton as --data anywhere; it renders to the same pixels as the shards, but "
        "its fingerprint is its own: caches made from tar shards do not replay from it.",
    )
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        help="digits (scikit-learn's bundled 8x8 digits, upscaled) or imagefolder:PATH "
        "(PATH/CLASS/IMAGE: labelled; PATH/IMAGE, no class folders: unlabelled, no .cls); "
        "with --to ffcv also shards:DATA (existing tar shards, converted as they are)",
    )
    p.add_argument(
        "--to",
        choices=["tar", "ffcv"],
        default="tar",
        help="tar shards, or one FFCV .beton per split (needs the ffcv extra) [tar]",
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
    add_options(p, PrecomputeConfig)
    _common(p, smoke=True, config=True)
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
        "--renderer",
        choices=["pillow", "ffcv"],
        help="render the checked views with this renderer instead of the cache's own: how far "
        "the teacher's outputs move between renderers (top-1 agreement, logit error) [the "
        "cache's]",
    )
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
        "checkpoint.pt and model.pt; `--config OUT/config.json --out NEW` repeats a run.",
    )
    groups = {title: p.add_argument_group(title) for title in (RUN, MODELS, VIEWS, OPTIM)}
    add_options(p, TrainConfig, groups=groups)
    _common(p, smoke=True, config=True)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "ablate",
        help="train one student under every teacher mode, compare",
        description="The teacher grid of Beyer et al. 2022 on one data path: "
        "builds the caches the modes need (reusing existing ones), "
        "trains every mode (and every --loss) with the same student, budget and seeds, "
        "writes OUT/ablation.json, ablation.md and ablation.png. The other options are "
        "`kdcache train`'s, shared by every run.",
    )
    groups = {title: p.add_argument_group(title) for title in ("grid", RUN, MODELS, VIEWS, OPTIM)}
    add_options(p, AblateConfig, groups=groups, overrides=_grid_group(AblateConfig))
    add_options(
        p,
        TrainConfig,
        only=SHARED_OPTIONS,
        groups=groups,
        overrides={
            "out": {"help": "directory of the caches, runs and results"},
            "epochs": {"help": "student epochs of every mode"},
            "teacher": {"help": "teacher spec", "required": True},
        },
    )
    _common(p, smoke=True, config=True)
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
        "--image-size", type=image_size, default=None, help="px or auto [the run's, else 224]"
    )
    p.add_argument(
        "--num-classes",
        type=int,
        help=num_classes_help("the run's; else the teacher's, or the labels'"),
    )
    p.add_argument("--teacher", help="also report agreement (top-1, top-5) and KL to this teacher")
    p.add_argument("--teacher-weights", help=WEIGHTS_HELP)
    p.add_argument(
        "--teacher-image-size",
        type=image_size,
        default=None,
        help="[the run's teacher's (the cache's), else --image-size]",
    )
    _convention(p, "teacher")
    p.add_argument("--label-map", metavar="FILE", help=LABEL_MAP_HELP)
    p.add_argument(
        "--retrieval",
        action="store_true",
        help="also report retrieval_map_cosine and retrieval_map_euclidean: 11-point "
        "interpolated mAP of --data as queries against the database (embeddings: the input of "
        "the model's last linear layer)",
    )
    p.add_argument(
        "--database", metavar="DATA", help="retrieval database shards [the run's training data]"
    )
    p.add_argument(
        "--renderer",
        choices=["pillow", "ffcv"],
        help="what renders the center views [the run's --renderer; pillow for a weights file]",
    )
    _device(p)
    _common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "models",
        help="the model specs, and a model's layers with their output shapes",
        description="Without --layers: the forms a model spec takes. With --layers SPEC: every "
        "layer the model's forward calls, by the module path --features names it by, with its "
        "class and output shape (C x H x W) for one input of --image-size px. Random weights: "
        "nothing is loaded or downloaded.",
    )
    p.add_argument("--layers", metavar="SPEC", help="a model spec, e.g. torchvision:resnet18")
    p.add_argument("--image-size", type=int, default=224, help="input px [224]")
    p.add_argument(
        "--num-classes", type=int, default=None, help="classes of the head [its own, else 10]"
    )
    _common(p)
    p.set_defaults(func=cmd_models)

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


def _grid_group(cls: type) -> dict[str, dict[str, str]]:
    return {f.name: {"group": "grid"} for f in dataclasses.fields(cls)}


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
