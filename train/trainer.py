"""The student loop: one data path for every teacher mode, targets from where the mode says.

``fit(cfg)`` trains ``cfg.epochs`` epochs and writes the run directory: ``config.json``
(written on a fresh start only), ``metrics.jsonl`` (one JSON object per epoch),
``steps.jsonl``, ``model.pt`` (the student's state dict) and ``checkpoint.pt`` (every epoch,
written atomically after ``model.pt``: it commits the epoch; ``--resume`` continues from it).
Rank 0 holds ``OUT.lock`` (:func:`kdcache.lock.output_lock`) for the whole run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from kdcache import dist, pixels, schema
from kdcache import targets as T
from kdcache.data import beton, fs
from kdcache.data.index import DatasetIndex, load_index
from kdcache.dist import Dist
from kdcache.errors import CacheMismatchError, KdcacheError
from kdcache.lock import output_lock, process_running
from kdcache.losses import Sum, needs_of
from kdcache.models import Model, load_model, warn_random_teacher
from kdcache.render import (
    IMAGENET,
    PILLOW,
    InputConvention,
    Renderer,
    get_renderer,
    resolve_image_size,
)
from kdcache.runtime import loader_kwargs, prepare_model, resolve_device
from kdcache.store import Cache, open_cache
from kdcache.teacher_pass import cache_identity, precompute
from kdcache.train import feature_distill
from kdcache.train.batches import EpochData, PackedBatches, TrainBatches, unpack
from kdcache.train.config import TrainConfig
from kdcache.train.evaluate import accuracy_basis, evaluate
from kdcache.train.modes import TeacherMode
from kdcache.train.order import epoch_order, pass_batches
from kdcache.train.retrieval import retrieval_scores
from kdcache.train.step import train_step, zero_pixels
from kdcache.views import ViewSpec, get_spec

log = logging.getLogger(__name__)

StepHook = Callable[[int, int, int, float], None]  # (epoch, step, steps, loss)
EpochHook = Callable[[dict[str, Any]], None]  # the epoch's metrics


@dataclass
class _Run:
    """What the options resolve to before the first step."""

    index: DatasetIndex
    val: DatasetIndex
    num_classes: int
    spec: ViewSpec
    plan_seed: int
    cache: Cache | None
    cache_epochs: list[int]
    teacher: Model | None
    image_size: int
    teacher_image_size: int
    teacher_input: InputConvention  # what the teacher is fed: the cache's, or the live one's
    accuracy_basis: str  # labels | label_map | none
    label_map: np.ndarray | None
    mode: TeacherMode
    loss: Sum  # --loss, or the mode's default; loss.describe() is its resolved spec
    # The data labels as the student's classes: identity, a (L,) label map, or None (unusable).
    train_labels: str | None = None
    train_label_map: np.ndarray | None = None
    renderer: Renderer = PILLOW  # --renderer: what renders every view of the run


def _resolve(cfg: TrainConfig) -> _Run:
    mode = cfg.mode
    loss = cfg.create_loss()  # first: a user's loss that does not import fails before any work
    cache, cache_epochs = None, []
    if mode.reads_cache:
        cache = open_cache(cfg.cache)
    index = load_index(cfg.data, known=cache.dataset_index if cache else None, strict=cfg.strict)
    val = load_index(cfg.val)
    image_size = resolve_image_size(cfg.image_size, index.short_sides, "--image-size")
    label_classes = max(index.num_classes, val.num_classes)
    num_classes, teacher_size = cfg.num_classes, None
    if cache is not None:
        _check_cache(cache, cfg, index)
        # With --limit only the units holding the first samples need to be there.
        needed = sum(1 for u in index.units if u.start < (cfg.limit or index.num_samples))
        cache_epochs = [int(e) for e in np.flatnonzero(cache.done_mask()[:, :needed].all(1))]
        if not cache_epochs:
            raise KdcacheError(
                f"cache {cfg.cache} has no epoch complete over the {needed} shards this run "
                "reads; finish it with `kdcache precompute` (the same command, without --smoke)"
            )
        if cfg.cache_limit is not None and mode.replays_cache_views:
            if cfg.cache_limit > len(cache_epochs):
                raise KdcacheError(
                    f"--cache-epochs {cfg.cache_limit}: cache {cfg.cache} has only "
                    f"{len(cache_epochs)} complete epochs; extend it with `kdcache precompute "
                    f"--epochs {cfg.cache_limit}` or ask for fewer"
                )
            cache_epochs = cache_epochs[: cfg.cache_limit]
        if cfg.num_classes and cfg.num_classes != cache.num_classes:
            raise KdcacheError(
                f"--num-classes {cfg.num_classes} differs from the cache's {cache.num_classes} "
                "classes (the teacher's); drop --num-classes"
            )
        num_classes, teacher_size = cache.num_classes, int(cache.meta["teacher_image_size"])
    if mode.replays_cache_views:
        spec, plan_seed = cache.spec, cache.plan_seed
        if cfg.epochs > len(cache_epochs) and cfg.reuse == "cycle":
            log.warning(
                "the cache holds %d complete epochs and the run has %d: cached epochs "
                "are cycled (student epoch e replays cache epoch e mod %d; --reuse sample "
                "draws one per sample and epoch instead)",
                len(cache_epochs),
                cfg.epochs,
                len(cache_epochs),
            )
    else:
        spec = get_spec(cfg.views or mode.default_views)
        plan_seed = cfg.plan_seed or 0
        if not mode.allows(spec):
            raise KdcacheError(
                f"--teacher-mode {cfg.teacher_mode} trains on unmixed views (the teacher never "
                f"sees the student's mix); --views {spec.name} mixes: use consistent or center"
            )
    _warn_short_function_matching(cfg, spec, mode)
    teacher = None
    if cfg.teacher:
        if teacher_size is None:
            teacher_size = resolve_image_size(
                cfg.teacher_image_size or image_size, index.short_sides, "--teacher-image-size"
            )
        teacher = load_model(
            cfg.teacher,
            image_size=teacher_size,
            num_classes=num_classes,
            default_classes=label_classes,
            weights=cfg.teacher_weights,
            mean=cfg.teacher_mean,
            std=cfg.teacher_std,
            asked_by=f"the cache {cfg.cache}" if cache is not None else "--num-classes",
        )
        if cache is not None:
            cache.check_identity(cache_identity(teacher=teacher), what="--teacher")
        elif mode.runs_teacher:
            warn_random_teacher(cfg.teacher, cfg.teacher_weights)
        num_classes = teacher.num_classes
    if num_classes is None:  # hard labels, no teacher: the labels' classes
        num_classes = label_classes
        _check_class_count(index, val, label_classes)
    if num_classes < 2:
        raise KdcacheError(
            f"{cfg.data} has {num_classes} labelled classes; label the data or set --num-classes"
        )
    if mode.trains_on_labels:
        _check_labels(index, num_classes, cfg.limit)
    teacher_input = cache.teacher_input if cache is not None else None
    if teacher is not None:
        teacher_input = teacher.convention
    basis, label_map = accuracy_basis(
        mode.trains_on_labels, num_classes, label_classes, val, cfg.label_map
    )
    train_labels = _train_labels(mode, cfg.label_map, index, num_classes, label_classes)
    _check_needs(cfg, loss, mode, cache, num_classes, train_labels, index)
    renderer = get_renderer(cfg.renderer)
    renderer.check(spec)
    renderer.check_data(index, cfg.data)
    run = _Run(
        index,
        val,
        num_classes,
        spec,
        plan_seed,
        cache,
        cache_epochs,
        teacher,
        image_size,
        teacher_size or image_size,
        teacher_input or IMAGENET,
        basis,
        label_map,
        mode,
        loss,
        train_labels,
        label_map if train_labels == "label_map" else None,
        renderer,
    )
    return run


def _train_labels(
    mode: TeacherMode,
    label_map: str | None,
    index: DatasetIndex,
    num_classes: int,
    label_classes: int,
) -> str | None:
    """How the training data's labels are the student's classes: ``labels`` (as they are),
    ``label_map`` (through ``--label-map``) or None (no labels, or another class space)."""
    if not index.num_classes:
        return None
    if label_map:
        return "label_map"
    if mode.trains_on_labels or label_classes == num_classes:
        return "labels"
    return None


def _check_needs(
    cfg: TrainConfig,
    loss: Sum,
    mode: TeacherMode,
    cache: Cache | None,
    num_classes: int,
    train_labels: str | None,
    index: DatasetIndex,
) -> None:
    """Refuse, before any work, a loss whose terms need what this run cannot give them."""
    needs, spec = needs_of(loss), loss.describe()
    if "labels" in needs and train_labels is None:
        why = (
            f"{cfg.data} has no labels"
            if not index.num_classes
            else f"the labels of {cfg.data} ({index.num_classes} classes) are not the "
            f"student's {num_classes} classes"
        )
        raise KdcacheError(
            f"--loss {spec} needs hard labels in the student's classes, and {why}; give "
            "--label-map FILE (data label -> class), or drop the term that needs labels (ce)"
        )
    if "teacher" in needs and mode.trains_on_labels:
        raise KdcacheError(
            f"--loss {spec} needs a teacher's distribution, and --teacher-mode "
            f"{mode.name} trains on labels; choose a teacher mode, or --loss ce"
        )
    if "avatars" in needs and not (
        mode.replays_cache_views and cache is not None and schema.has_avatars(cache.avatars)
    ):
        where = (
            f"cache {cfg.cache} holds none (its avatars: n 0)"
            if mode.replays_cache_views
            else f"--teacher-mode {mode.name} replays no cache"
        )
        raise KdcacheError(
            f"--loss {spec} needs avatar ensembles, and {where}; make a cache with `kdcache "
            "precompute --avatars N` and train with --teacher-mode cached"
        )
    if "full" in needs and mode.reads_cache and cache is not None and cache.topk < num_classes:
        raise KdcacheError(
            f"--loss {spec} needs the teacher's whole distribution, and cache {cfg.cache} holds "
            f"its top {cache.topk} of {num_classes} classes; precompute with --topk "
            f"{num_classes}, or train with a live teacher (--teacher-mode online)"
        )


def _labels(run: _Run, item: dict) -> T.Labels | None:
    """The batch's hard labels as the student's classes (-1 where unknown), or None."""
    if run.train_labels is None:
        return None
    label, partner = item["label"], item["partner_label"]
    if run.train_label_map is not None:
        table = torch.from_numpy(run.train_label_map)

        def mapped(x: torch.Tensor) -> torch.Tensor:
            inside = (x >= 0) & (x < len(table))
            return torch.where(inside, table[x.clamp(0, len(table) - 1)], -1)

        label, partner = mapped(label), mapped(partner)
    return T.Labels(label.long(), partner.long(), item["lam"].float())


def _check_labels(index: DatasetIndex, num_classes: int, limit: int | None) -> None:
    """Hard-label training needs a label in range on every sample it reads (the units holding
    the first ``limit`` samples: mixing partners come from the whole unit)."""
    units = [u for u in index.units if u.start < (limit or index.num_samples)]
    label = index.label[: units[-1].start + units[-1].count]
    bad = np.flatnonzero((label < 0) | (label >= num_classes))
    if len(bad):
        i = int(bad[0])
        u = index.units[index.unit_index_of(i)]
        what = (
            "no label" if label[i] < 0 else f"label {label[i]}, outside the {num_classes} classes"
        )
        raise KdcacheError(
            f"--teacher-mode none trains on labels, but {len(bad)} samples have none in range; "
            f"the first is sample {i} (position {i - u.start} of shard {u.name}): {what}. "
            "Label the data (or set --num-classes), or distil from a teacher: the teacher modes "
            "need no labels"
        )


def _check_class_count(index: DatasetIndex, val: DatasetIndex, label_classes: int) -> None:
    """A class count taken from the labels (largest + 1) is refused when it is far above the
    number of distinct labels, more than ``2 * distinct + 10`` (one stray label 99999 would
    make a 100,000-class student); ``--num-classes`` says it is meant."""
    labels = np.concatenate([index.label, val.label])
    distinct = len(np.unique(labels[labels >= 0]))
    if label_classes > 2 * distinct + 10:
        raise KdcacheError(
            f"the largest label is {label_classes - 1}, which would make a {label_classes}-class "
            f"student, but the data ({index.num_samples} train and {val.num_samples} val "
            f"samples) has only {distinct} distinct labels; fix the stray labels, or pass "
            f"--num-classes {label_classes} if that many classes are meant"
        )


# Function matching is patient: on digits (docs/patience.md) it trailed hard labels and
# consistent views at every budget up to 100 epochs; the paper's schedules start at 300.
PATIENT_EPOCHS = 300


def _warn_short_function_matching(cfg: TrainConfig, spec: ViewSpec, mode: TeacherMode) -> None:
    """Say so when a mixing run with a teacher on the student's views is short."""
    if spec.mixes and mode.sees_student_views and cfg.epochs < PATIENT_EPOCHS:
        log.warning(
            "--epochs %d with %s views: function matching needs long schedules (Beyer et al. "
            "train 300 to 9,600 epochs; on digits it trailed hard labels up to 300 epochs and "
            "consistent views up to 1,000: docs/patience.md); for a short budget use "
            "consistent views, or train for %d epochs or more",
            cfg.epochs,
            spec.name,
            PATIENT_EPOCHS,
        )


def _check_cache(cache: Cache, cfg: TrainConfig, index: DatasetIndex) -> None:
    """Refuse a cache made from other data or with other views than this run asks for."""
    if cfg.mode.needs_center_cache:
        if not cache.spec.same_views(get_spec("center")):
            raise CacheMismatchError(
                f"cache {cache.path} holds {cache.spec.name} views; a fixed teacher's cache "
                "holds its predictions on center views: make one with `kdcache precompute "
                "--views center --epochs 1` (or let `kdcache train` make it: name a new --cache)"
            )
    elif cfg.views is not None and not get_spec(cfg.views).same_views(cache.spec):
        raise CacheMismatchError(
            f"--views {cfg.views} asked for, but cache {cache.path} holds {cache.spec.name} "
            "views; in cached mode the cache decides: drop --views or use another cache"
        )
    expected = cache_identity(
        index,
        plan_seed=cfg.plan_seed if cfg.mode.replays_cache_views else None,
        image_size=cfg.teacher_image_size,
        renderer=get_renderer(cfg.renderer).name,
    )
    try:
        cache.check_identity(expected, what="the training data")
    except CacheMismatchError as e:
        data_beton = beton.is_beton(index.units[0].name)
        hint = ""
        if data_beton != beton.is_beton(cache.units[0].name):
            hint = (
                ". A .beton and the tar shards it was made from have different fingerprints "
                "(the same samples, hashed from other bytes): train from the data the cache was "
                "made from, or precompute a cache from this data"
            )
        raise CacheMismatchError(
            f"{e} (data {cfg.data}: {index.num_samples} samples in {len(index.units)} shards; "
            f"cache: {cache.meta['data']['num_samples']} samples in "
            f"{len(cache.units)} shards){hint}"
        ) from None


def _lr_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up from 0, then cosine decay to 0 (as in big_vision's distill configs)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _target(cfg: TrainConfig, run: _Run, item: dict, device: torch.device) -> T.SparseTarget:
    """The batch's target, made as the teacher mode says (cache rows, live teacher, labels),
    with the batch's hard labels for the losses that use them."""
    target = run.mode.target(item, run, device)
    labels = _labels(run, item)
    if labels is not None:
        target.labels = labels.to(device, non_blocking=True)
    return target


def _loss(
    run: _Run,
    logits: torch.Tensor,
    target: T.SparseTarget,
    features: feature_distill.FeatureDistill | None = None,
    epoch: int = 0,
) -> torch.Tensor:
    """The run's loss: ``--loss``, or the mode's default (KL at ``--temperature``, or
    cross-entropy on labels), plus its feature terms on the ``--features`` pairs; during a
    ``--curriculum`` stage (``epoch``: the pass's first) that stage's feature loss alone."""
    if features is None:
        return run.loss(logits, target)
    if features.stage(epoch) is not None:  # every parameter stays in the graph (DDP)
        return features(epoch) + logits.sum() * 0.0
    extra = features(epoch)
    value = run.loss(logits, target)
    return value if extra is None else value + extra


def _save_atomic(obj: Any, path: str) -> None:
    """Write ``path`` by rename; on a failed write (a full disk) the temp file is removed, the
    previous ``path`` stays as it was, and the error is one sentence naming the file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            reason = e.strerror or str(e)
        elif "write" in str(e).lower():  # torch's zip writer: "... file write failed"
            reason = str(e).strip().splitlines()[-1]
        else:
            raise
        raise KdcacheError(
            f"cannot write {path}: {reason}; the previous {os.path.basename(path)} is intact "
            "(make room, then re-run the same command with --resume)"
        ) from None


# Options that change what a run computes: --resume refuses another value of any of them.
# Those not listed (workers, device, checkpoint_every, strict, resume, command, out) may change;
# epochs may grow with --extend.
RUN_OPTIONS = (
    "data",
    "val",
    "student",
    "student_weights",
    "teacher_mode",
    "teacher",
    "teacher_weights",
    "cache",
    "views",
    "plan_seed",
    "seed",
    "image_size",
    "teacher_image_size",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup",
    "clip_grad",
    "temperature",
    "loss",
    "features",
    "feature_loss",
    "prune_teacher",
    "curriculum",
    "akd_features",
    "avatar_drop",
    "akd_loss",
    "avatar_weight",
    "avatar_uncertainty",
    "window",
    "limit",
    "num_classes",
    "student_mean",
    "student_std",
    "teacher_mean",
    "teacher_std",
    "label_map",
    "max_image_pixels",
    "renderer",
    "reuse",
    "cache_limit",
    "views_per_decode",
)


def _prepare_out(cfg: TrainConfig, held: contextlib.ExitStack) -> None:
    """Rank 0, before any work: create and lock the run directory (the lock is held until
    ``held`` closes), refuse a resume that would change the run, and clean up after a killed
    one (temp files of dead processes; the logs of a run that never checkpointed)."""
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as e:
        raise KdcacheError(f"cannot create the run directory {cfg.out}: {e.strerror}") from None
    held.enter_context(output_lock(cfg.out, "run directory"))
    ckpt = os.path.join(cfg.out, "checkpoint.pt")
    if os.path.exists(ckpt) and not cfg.resume:
        raise KdcacheError(
            f"{cfg.out} already holds a run; pass --resume to continue it, or choose another --out"
        )
    _remove_stale_temp_files(cfg.out)
    if not os.path.exists(ckpt):  # a start from scratch: epoch 1 must not be logged twice
        _cut_logs(cfg.out, _Position())
        return
    _check_resume(cfg, ckpt)


def _remove_stale_temp_files(out: str) -> None:
    """``NAME.tmpPID`` files of processes that no longer run (a kill mid-write)."""
    for name in os.listdir(out):
        m = re.fullmatch(r".+\.tmp(\d+)", name)
        if m and int(m.group(1)) != os.getpid() and not process_running(int(m.group(1))):
            log.info("removing %s, left by a process that is gone", name)
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out, name))


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _check_resume(cfg: TrainConfig, ckpt: str) -> None:
    """Refuse ``--resume`` with options that change the run, naming each with both values.

    The run's options are its ``config.json`` (the checkpoint's copy when that is missing);
    the epochs it was last set to are the checkpoint's (an ``--extend`` raises them).
    """
    try:  # mmap: only the small dicts are read, not the tensors
        state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # a checkpoint is replaced atomically: this is not a torn write
        raise KdcacheError(f"cannot read {ckpt}: {e}; it is damaged, start a new run") from None
    last = state.get("config") or {}
    try:
        with open(os.path.join(cfg.out, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        saved = last
    now = json.loads(json.dumps(asdict(cfg)))  # tuples as lists, as config.json has them
    changed = [
        f"--{key.replace('_', '-')} {_show(now[key])} (the run has {_show(saved[key])})"
        for key in RUN_OPTIONS
        if key in saved
        and saved[key] != now[key]
        # config.json holds the resolved class count: unset means "the same as before"
        and not (key == "num_classes" and now[key] is None)
    ]
    epochs, done = int(last.get("epochs", saved.get("epochs", cfg.epochs))), int(state["epoch"])
    if cfg.epochs > epochs and not cfg.extend:
        changed.append(
            f"--epochs {cfg.epochs} (the run has {epochs}: pass --extend to train it longer, "
            f"the schedule is then recomputed over {cfg.epochs} epochs)"
        )
    elif done < cfg.epochs < epochs:
        changed.append(
            f"--epochs {cfg.epochs} (the run has {epochs}: fewer epochs would change its schedule)"
        )
    if changed:
        raise KdcacheError(
            f"--resume would change the run in {cfg.out}: {'; '.join(changed)}; resume with "
            "the run's options (its config.json), or choose another --out"
        )


@dataclass
class _Position:
    """Where a run stands: ``epoch`` epochs done and ``step`` steps of the next one, with the
    next epoch's running sums so far (summed over ranks)."""

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    images: int = 0
    skipped: int = 0
    seconds: float = 0.0


def fit(
    cfg: TrainConfig,
    on_step: StepHook | None = None,
    on_epoch: EpochHook | None = None,
    expect: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a student as ``cfg`` says. Returns the final metrics and the run directory.

    expect: resolved values a run recorded (:data:`~kdcache.train.config.RESOLVED_KEYS` of its
    ``config.json``, given back with ``--config``); training starts only if this run resolves
    the same (``cache_epochs`` may grow: a cache can be extended)."""
    cfg.validate()
    ranks, device_name = dist.setup(cfg.device)
    device = resolve_device(device_name)
    with contextlib.ExitStack() as held:  # rank 0 holds the run directory's lock throughout
        if ranks.main:
            _prepare_out(cfg, held)
        ranks.barrier()
        if cfg.mode.needs_center_cache:
            _prepare_center_cache(cfg)
        return _fit(cfg, ranks, device, on_step, on_epoch, expect)


def _prepare_center_cache(cfg: TrainConfig) -> None:
    """The fixed teacher's predictions: a one-epoch cache of center views at ``cfg.cache``,
    made on first use when the teacher is named (finished, or only checked, when it exists).
    Every rank takes part, as in ``kdcache precompute``."""
    if not cfg.teacher:
        if not fs.exists(cfg.cache):
            raise KdcacheError(
                f"no cache at {cfg.cache}; to make the fixed teacher's cache there, "
                "name the teacher with --teacher (and --teacher-weights)"
            )
        return  # an existing center cache, used as it is (checked when opened)
    log.info("fixed teacher: the cache %s (center views, 1 epoch)", cfg.cache)
    precompute(cfg.teacher_pass(cfg.cache, epochs=1, views="center"))


def _fit(
    cfg: TrainConfig,
    ranks: Dist,
    device: torch.device,
    on_step: StepHook | None,
    on_epoch: EpochHook | None,
    expect: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    run = _resolve(cfg)
    if run.teacher is not None:
        run.teacher.module = prepare_model(run.teacher.module, device, eval_mode=True)
    # Every rank builds the same initial student from --seed; DDP keeps them equal after.
    built = load_model(
        cfg.student,
        image_size=run.image_size,
        num_classes=run.num_classes,
        weights=cfg.student_weights,
        seed=cfg.seed,
        mean=cfg.student_mean,
        std=cfg.student_std,
        asked_by="the labels" if run.mode.trains_on_labels else "the teacher's classes",
    )
    student_input = built.convention
    student = prepare_model(built.module, device, eval_mode=False)
    features = feature_distill.build(
        cfg.loss_spec,
        cfg.feature_pairs,
        run.teacher.module if run.teacher is not None else None,
        run.teacher_image_size,
        student,
        run.image_size,
        device,
        ranks.enabled,
        cfg.seed,
        prune=cfg.prune_teacher,
        curriculum=cfg.curriculum,
    )
    resolved = _resolved_config(cfg, run, student_input, features)
    _check_expected(expect or {}, resolved)
    if ranks.enabled:
        student = DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    bare = student.module if ranks.enabled else student  # what checkpoints and eval see
    trained = list(student.parameters())
    if features is not None:  # FitNets' regressors and the like train with the student
        trained += features.parameters()
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    samples = min(run.index.num_samples, cfg.limit or run.index.num_samples)
    steps_per_epoch = -(-samples // cfg.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(round(cfg.warmup * steps_per_epoch), _total_steps(cfg, samples))
    )
    pos = _resume(cfg, bare, optimizer, schedule, ranks, features)
    fresh = (pos.epoch, pos.step) == (0, 0)
    if ranks.main and (fresh or not os.path.exists(os.path.join(cfg.out, "config.json"))):
        _write_json(resolved, os.path.join(cfg.out, "config.json"))  # never rewritten
    save = _Saver(cfg, bare, optimizer, schedule, ranks, features)
    learner = _Learner(
        student, bare, student_input, optimizer, schedule, device, features, _ffcv(cfg, run)
    )
    metrics: dict[str, Any] = _last_metrics(cfg.out) if pos.epoch else {}
    if pos.epoch >= cfg.epochs:
        log.info("%s already holds %d epochs; nothing to do", cfg.out, pos.epoch)
        if ranks.main and pos.step == 0:  # model.pt is the checkpoint's model, whatever came before
            _save_atomic(bare.state_dict(), os.path.join(cfg.out, "model.pt"))
    while pos.epoch < cfg.epochs:
        epoch_started = time.perf_counter()
        epoch = pos.epoch
        views = _pass_length(cfg, epoch)
        metrics = _train_epoch(cfg, run, learner, pos, views, on_step, save)
        end = epoch + views  # epochs done after this pass (one epoch without --views-per-decode)
        # Every --eval-every epochs and after the last (the same on every rank: evaluate is
        # collective under torchrun); the other epochs record no val figures. A pass of V
        # epochs is evaluated when it reaches or crosses a multiple of --eval-every.
        metrics["val_accuracy"] = None
        if end // cfg.eval_every > epoch // cfg.eval_every or end == cfg.epochs:
            scores = evaluate(
                bare,
                run.val,
                run.image_size,
                device,
                cfg.workers,
                run.teacher.module if run.teacher else None,
                run.teacher_image_size,
                ranks,
                student_input=student_input,
                teacher_input=run.teacher_input,
                basis=run.accuracy_basis,
                label_map=run.label_map,
                renderer=run.renderer,
            )
            metrics["val_accuracy"] = scores.pop("accuracy")
            metrics.update(scores)
            if cfg.retrieval:
                metrics.update(
                    retrieval_scores(
                        bare,
                        run.index,
                        run.val,
                        run.image_size,
                        device,
                        cfg.workers,
                        student_input,
                        cfg.limit,
                        run.renderer,
                    )
                )
        metrics = {"epoch": end, **metrics}
        metrics["epoch_seconds"] = time.perf_counter() - epoch_started  # train + eval
        pos = _Position(end)
        save.epoch_end(metrics, pos)
        log.info(
            "epoch %d/%d  loss %.4f  val acc %s%s  %.0f img/s%s",
            end,
            cfg.epochs,
            metrics["train_loss"],
            "n/a" if metrics["val_accuracy"] is None else f"{metrics['val_accuracy']:.4f}",
            f"  agreement {metrics['teacher_agreement']:.4f}"
            if "teacher_agreement" in metrics
            else "",
            metrics["images_per_s"],
            f"  ({metrics['skipped_rows']} rows skipped)" if metrics["skipped_rows"] else "",
        )
        if on_epoch and ranks.main:
            on_epoch(metrics)
    ranks.barrier()  # rank 0's last files are written before any rank returns
    if learner.ffcv is not None:
        learner.ffcv.close()
    return {"out": cfg.out, **metrics}


class _Scalars:
    """Each epoch's numeric metrics as TensorBoard scalars in ``OUT/tensorboard`` when
    tensorboard is installed (``pip install 'kdcache[tb]'``); nothing otherwise."""

    def __init__(self, out: str):
        self.dir, self.writer, self.tried = os.path.join(out, "tensorboard"), None, False

    def write(self, metrics: dict[str, Any]) -> None:
        if not self.tried:
            self.tried = True
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                log.debug("no TensorBoard scalars (%s)", e)
            else:
                # A resumed run redoes the epochs after its checkpoint: TensorBoard then drops
                # what an earlier process wrote for them, as the resume cuts metrics.jsonl.
                self.writer = SummaryWriter(self.dir, purge_step=metrics["epoch"])
        if self.writer is None:
            return
        for name, value in metrics.items():
            if name != "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(name, value, metrics["epoch"])
        self.writer.flush()  # a killed run keeps the epochs it wrote

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _Saver:
    """Rank 0 writes the run's files: per-step losses, per-epoch metrics, checkpoints.

    Losses stay on the device until a checkpoint or the epoch's end (one sync then, none per
    step). Files are appended before the checkpoint that covers them is replaced, and a resume
    cuts them back to the checkpoint, so a kill at any point leaves them consistent. At an
    epoch's end ``model.pt`` is written before ``checkpoint.pt``: the checkpoint commits the
    epoch, so a checkpoint of the last epoch always comes with that epoch's ``model.pt``.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: torch.nn.Module,
        optimizer: Any,
        schedule: Any,
        ranks: Dist,
        features: feature_distill.FeatureDistill | None = None,
    ):
        self.cfg, self.model, self.optimizer, self.schedule, self.ranks = (
            cfg,
            model,
            optimizer,
            schedule,
            ranks,
        )
        self.features = features
        self.losses: list[tuple[int, int, torch.Tensor]] = []
        self.scalars = _Scalars(cfg.out)
        # The best evaluated epoch so far, by the headline metric (metrics.jsonl is already cut
        # back to the checkpoint when resuming).
        history = (
            read_metrics(cfg.out) if os.path.exists(os.path.join(cfg.out, "metrics.jsonl")) else []
        )
        scored = [h for h in map(headline, history) if h is not None]
        self.best: float | None = max((value for _, value in scored), default=None)

    def step(self, epoch: int, step: int, loss: torch.Tensor) -> None:
        self.losses.append((epoch, step, loss.detach()))

    def first_nonfinite(self) -> tuple[int, int, float] | None:
        """(epoch, step, loss), 1-based, of this rank's first non-finite loss not yet flushed."""
        if not self.losses:
            return None
        values = torch.stack([loss for _, _, loss in self.losses])
        bad = torch.nonzero(~torch.isfinite(values)).flatten().tolist()
        if not bad:
            return None
        epoch, step, _ = self.losses[bad[0]]
        return epoch + 1, step + 1, float(values[bad[0]])

    def _flush_losses(self) -> None:
        if self.losses and self.ranks.main:
            values = torch.stack([loss for _, _, loss in self.losses]).tolist()
            with open(os.path.join(self.cfg.out, "steps.jsonl"), "a") as f:
                for (epoch, step, _), value in zip(self.losses, values, strict=True):
                    f.write(
                        json.dumps({"epoch": epoch + 1, "step": step + 1, "loss": value}) + "\n"
                    )
        self.losses = []

    def checkpoint(self, pos: _Position) -> None:
        self._flush_losses()
        if not self.ranks.main:
            return
        _save_atomic(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(),
                "position": asdict(pos),
                "epoch": pos.epoch,
                "rng": torch.get_rng_state(),
                "config": asdict(self.cfg),
                # the loss's own trainable parts (FitNets' regressors), when it has any
                "feature_loss": None
                if self.features is None or self.features.loss is None
                else self.features.loss.state_dict(),
            },
            os.path.join(self.cfg.out, "checkpoint.pt"),
        )

    def epoch_end(self, metrics: dict[str, Any], pos: _Position) -> None:
        self._flush_losses()
        if self.ranks.main:
            with open(os.path.join(self.cfg.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(metrics) + "\n")
            self.scalars.write(metrics)
            if metrics["epoch"] >= self.cfg.epochs:
                self.scalars.close()
            _save_atomic(self.model.state_dict(), os.path.join(self.cfg.out, "model.pt"))
            head = headline(metrics)
            if head is not None and (self.best is None or head[1] > self.best):
                self.best = head[1]
                _save_atomic(self.model.state_dict(), os.path.join(self.cfg.out, "best.pt"))
                best = {"epoch": metrics["epoch"], "metric": head[0], "value": head[1]}
                _write_json(best, os.path.join(self.cfg.out, "best.json"))
        self.checkpoint(pos)  # the commit: a kill before it redoes the epoch


def _check_finite(total: float, save: _Saver, epoch: int, done: int) -> None:
    """Stop before any checkpoint is written once the loss is not finite (``total``: the
    epoch's loss sum over ranks, synced here anyway)."""
    if math.isfinite(total):
        return
    first = save.first_nonfinite()
    where = (
        f"a loss of {first[2]} at epoch {first[0]}, step {first[1]}"
        if first
        else f"a non-finite loss on another rank in epoch {epoch + 1}, by step {done}"
    )
    raise KdcacheError(
        f"training stopped at {where}; nothing was saved after it, so "
        f"{os.path.join(save.cfg.out, 'checkpoint.pt')} (if any) holds the last good state: "
        "check the data and options (a lower --lr, a longer --warmup, --clip-grad) and start "
        "a new run"
    )


@dataclass
class _Learner:
    """The student being trained and what steps it: ``module`` is what the loop calls (DDP
    under torchrun), ``bare`` what checkpoints and evaluation see."""

    module: torch.nn.Module
    bare: torch.nn.Module
    input: InputConvention  # the student's normalisation
    optimizer: torch.optim.Optimizer
    schedule: Any  # LambdaLR: warm-up, then cosine
    device: torch.device
    features: feature_distill.FeatureDistill | None = None  # --features: taps and their loss
    ffcv: Any = None  # --loader ffcv: the run's FfcvEpochs (kdcache.train.ffcv_loader)


def _ffcv(cfg: TrainConfig, run: _Run) -> Any:
    """--loader ffcv: FFCV's loader makes the crops of a ``.beton`` with --renderer ffcv
    (:mod:`kdcache.train.ffcv_loader`); None for --loader torch."""
    if cfg.loader != "ffcv":
        return None
    problems = []
    if not beton.is_beton(cfg.data):
        problems.append(f"it reads an FFCV file: --data {cfg.data} is not a .beton")
    if cfg.renderer != "ffcv":
        problems.append("its crops are FFCV's decode and resize: pass --renderer ffcv")
    if cfg.views_per_decode != 1:
        problems.append("it renders one view per sample and epoch: drop --views-per-decode")
    mode = run.mode
    if mode.teacher_stream is not None or (
        mode.runs_teacher and run.teacher_image_size != run.image_size
    ):
        problems.append(
            "it renders one view per row at one size: a live teacher on its own views or at "
            "another size needs --loader torch"
        )
    from kdcache.train.ffcv_loader import FfcvEpochs, unsupported

    if why := unsupported(run.spec):
        problems.append(why)
    if problems:
        raise KdcacheError("--loader ffcv: " + "; ".join(problems))

    return FfcvEpochs(cfg.data, run.index.size, run.image_size, cfg.workers)


def _pass_length(cfg: TrainConfig, epoch: int) -> int:
    """Epochs in the pass that starts at ``epoch``: ``--views-per-decode``, or what is left."""
    return min(cfg.views_per_decode, cfg.epochs - epoch)


def _total_steps(cfg: TrainConfig, samples: int) -> int:
    """Optimizer steps of the whole run: per pass, its V epochs' views in global batches."""
    v = cfg.views_per_decode
    passes = [min(v, cfg.epochs - e) for e in range(0, cfg.epochs, v)]
    return sum(-(-samples * n // cfg.batch_size) for n in passes)


def _train_epoch(
    cfg: TrainConfig,
    run: _Run,
    learner: _Learner,
    pos: _Position,
    views: int,
    on_step: StepHook | None,
    save: _Saver,
) -> dict[str, Any]:
    """Train the rest of the pass of ``views`` epochs from epoch ``pos.epoch``, from step
    ``pos.step``; its metrics (all ranks)."""
    ranks, epoch = save.ranks, pos.epoch
    student, optimizer, schedule, device = (
        learner.module,
        learner.optimizer,
        learner.schedule,
        learner.device,
    )
    order = epoch_order(run.index.counts, cfg.seed, epoch, cfg.window)
    if cfg.limit is not None:
        order = order[order < cfg.limit]
    batches, row_epochs = pass_batches(order, epoch, views, cfg.batch_size, ranks.world, ranks.rank)
    cache_epoch = run.cache_epochs[epoch % len(run.cache_epochs)] if run.cache_epochs else 0
    mode = run.mode
    sampled = cfg.reuse == "sample" and mode.replays_cache_views
    epoch_data = EpochData(
        run.index,
        batches[pos.step :],  # a resumed pass skips straight to its step: order is a function
        epoch,
        run.image_size,
        run.spec,
        run.plan_seed,
        cache=run.cache if mode.replays_cache_views else None,
        cache_epoch=cache_epoch,
        reuse_epochs=tuple(run.cache_epochs) if sampled else (),
        row_epochs=None if row_epochs is None else row_epochs[pos.step :],
        cache_cycle=tuple(run.cache_epochs) if row_epochs is not None else (),
        teacher_image_size=run.teacher_image_size if mode.runs_teacher else None,
        target_cache=run.cache if mode.needs_center_cache else None,
        teacher_stream=mode.teacher_stream,
        student_input=learner.input,
        teacher_input=run.teacher_input,
        strict=cfg.strict,
        # Rows a cache calls usable were judged by its pixel limit: decode up to it.
        max_image_pixels=cfg.max_image_pixels
        or (run.cache.meta.get("max_image_pixels") if run.cache is not None else None),
        renderer=run.renderer,
    )
    if learner.ffcv is not None:  # --loader ffcv: the same items, crops from FFCV's loader
        items = learner.ffcv.items(TrainBatches(epoch_data))
    else:
        loader = DataLoader(
            PackedBatches(TrainBatches(epoch_data)),
            batch_size=None,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(epoch),  # leaves the global RNG alone
            **loader_kwargs(cfg.workers),
        )
        items = (unpack(packed) for packed in loader)
    student.train()
    total_loss = torch.zeros((), device=device)  # summed on the device: no sync per step
    images = skipped = 0
    started = time.perf_counter()
    for step, item in enumerate(items, start=pos.step):
        skipped += item["skipped"]
        if len(item["rows"]) == 0:
            # No usable row: step with a zero loss, as every rank must under DDP (and so the
            # schedule and the step count do not depend on which rows were usable).
            x, target = zero_pixels(run.image_size, device), None
        else:
            x = pixels.take(item, "pixels", learner.input, device)
            target = _target(cfg, run, item, device)
        loss = train_step(
            student,
            optimizer,
            x,
            target,
            lambda z, t: _loss(run, z, t, learner.features, epoch),
            cfg.clip_grad,
            device,
        )
        schedule.step()
        total_loss += loss.detach() * len(item["rows"])
        images += len(item["rows"])
        save.step(epoch, step, loss)
        if on_step and ranks.main:
            on_step(epoch, step, len(batches), float(loss.detach()) if step % 10 == 0 else math.nan)
        done = step + 1
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < len(batches):
            sums = ranks.sum(
                [float(total_loss), images, skipped, time.perf_counter() - started], device
            )
            _check_finite(sums[0], save, epoch, done)
            save.checkpoint(
                _Position(
                    epoch,
                    done,
                    pos.loss_sum + sums[0],
                    pos.images + int(sums[1]),
                    pos.skipped + int(sums[2]),
                    pos.seconds + sums[3] / ranks.world,
                )
            )
    seconds = time.perf_counter() - started
    loss_sum, images, skipped, seconds = ranks.sum(
        [float(total_loss), images, skipped, seconds], device
    )
    _check_finite(loss_sum, save, epoch, len(batches))
    # The ranks ran side by side; a resumed epoch adds what its first part did.
    seconds = pos.seconds + seconds / ranks.world
    loss_sum, images, skipped = pos.loss_sum + loss_sum, pos.images + images, pos.skipped + skipped
    if skipped and cfg.strict:
        raise KdcacheError(
            f"--strict: epoch {epoch + 1} met {int(skipped)} unusable rows (bad input in the "
            "cache or an unreadable image); fix the data or drop --strict to skip them"
        )
    if skipped:
        log.warning(
            "epoch %d: skipped %d unusable rows (bad input or unreadable image)", epoch + 1, skipped
        )
    return {
        "train_loss": loss_sum / max(images, 1),
        "images_per_s": images / seconds if seconds > 0 else 0.0,
        "seconds": seconds,
        "skipped_rows": int(skipped),
        # the cache epoch replayed (one epoch per pass and --reuse cycle; else several)
        "cache_epoch": cache_epoch
        if run.cache is not None and not sampled and views == 1
        else None,
        "lr": schedule.get_last_lr()[0],
    }


def _resume(
    cfg: TrainConfig,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    ranks: Dist,
    features: feature_distill.FeatureDistill | None = None,
) -> _Position:
    path = os.path.join(cfg.out, "checkpoint.pt")
    if not cfg.resume:
        return _Position()
    if not os.path.exists(path):
        log.debug("--resume: no checkpoint in %s yet, starting from scratch", cfg.out)
        return _Position()
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a checkpoint is replaced atomically: this is not a torn write
        raise KdcacheError(f"cannot read {path}: {e}; it is damaged, start a new run") from None
    try:
        student.load_state_dict(state["model"])
    except RuntimeError:
        before = state.get("config", {}).get("student", "another model")
        raise KdcacheError(
            f"{path} holds a run of {before}, whose weights do not fit --student {cfg.student}; "
            "resume with the run's own options, or choose another --out"
        ) from None
    if features is not None and features.loss is not None:
        features.loss.load_state_dict(state["feature_loss"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    before = state.get("config", {}).get("epochs", cfg.epochs)
    if cfg.epochs > before:  # --extend (checked by _prepare_out)
        _recompute_schedule(cfg, optimizer, schedule, before)
    torch.set_rng_state(state["rng"])
    pos = _Position(**state.get("position", {"epoch": state["epoch"]}))
    if not ranks.main:  # rank 0 carries the partial epoch's sums (they are over all ranks)
        pos = _Position(pos.epoch, pos.step)
    else:
        _cut_logs(cfg.out, pos)
    log.info("resumed %s at epoch %d, step %d", cfg.out, pos.epoch + 1, pos.step)
    return pos


def _recompute_schedule(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, schedule: Any, before: int
) -> None:
    """``--extend``: the warm-up and cosine schedule are those of a run of the new ``--epochs``
    (the scheduler was built with them), continued from the current step; the lr of the next
    step is set to that curve's value (it jumps up when the old cosine had decayed further)."""
    step = schedule.last_epoch
    old = optimizer.param_groups[0]["lr"]
    for group, base, factor in zip(
        optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas, strict=True
    ):
        group["lr"] = base * factor(step)
    schedule._last_lr = [group["lr"] for group in optimizer.param_groups]
    log.info(
        "--extend: %d -> %d epochs; the schedule is recomputed over %d epochs from step %d "
        "(lr %.3g -> %.3g)",
        before,
        cfg.epochs,
        cfg.epochs,
        step,
        old,
        optimizer.param_groups[0]["lr"],
    )


def _cut_logs(out: str, pos: _Position) -> None:
    """Drop log lines written after the checkpoint (a kill between the two)."""
    for name, keep in (
        ("metrics.jsonl", lambda m: m["epoch"] <= pos.epoch),
        ("steps.jsonl", lambda m: (m["epoch"] - 1, m["step"]) <= (pos.epoch, pos.step)),
    ):
        path = os.path.join(out, name)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        kept = [line for line in lines if keep(json.loads(line))]
        if len(kept) != len(lines):
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, path)


def headline(metrics: Mapping[str, Any]) -> tuple[str, float] | None:
    """An epoch's headline figure, which ``best.pt`` is chosen by: val accuracy, or the teacher
    agreement when accuracy cannot be scored (labels that are not the teacher's classes); None
    for an epoch that was not evaluated (``--eval-every``)."""
    for name in ("val_accuracy", "teacher_agreement"):
        value = metrics.get(name)
        if value is not None and value == value:
            return name, float(value)
    return None


def read_metrics(out: str) -> list[dict[str, Any]]:
    """A run directory's ``metrics.jsonl``: one dict per finished epoch."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _last_metrics(out: str) -> dict[str, Any]:
    try:
        history = read_metrics(out)
    except (OSError, ValueError):
        return {}
    return history[-1] if history else {}


def _resolved_config(
    cfg: TrainConfig,
    run: _Run,
    student_input: InputConvention,
    features: feature_distill.FeatureDistill | None = None,
) -> dict:
    """What ``config.json`` holds: the options, and what the run resolved them to."""
    return json.loads(
        json.dumps(
            {
                **asdict(cfg),
                "num_classes": run.num_classes,
                "image_size_resolved": run.image_size,
                "student_input": student_input.identity(),
                "teacher_input": run.teacher_input.identity(),
                "accuracy_basis": run.accuracy_basis,
                "view_spec": run.spec.to_dict(),
                "resolved_plan_seed": run.plan_seed,
                "teacher_image_size_resolved": run.teacher_image_size,
                "train_samples": run.index.num_samples,
                "data_fingerprint": run.index.fingerprint,
                "cache_epochs": len(run.cache_epochs) or None,
                "loss_resolved": "+".join(
                    x for x in (run.loss.describe(), features and features.describe()) if x
                ),
            }
        )
    )  # as JSON has it (tuples as lists), to compare with a config.json read back


def _check_expected(expect: Mapping[str, Any], resolved: Mapping[str, Any]) -> None:
    """Refuse a run that resolves differently from the run whose config.json it repeats."""
    if isinstance(expect.get("view_spec"), dict):  # a run made before view ops: the old dict
        expect = {**expect, "view_spec": ViewSpec.from_dict(expect["view_spec"]).to_dict()}
    changed = [
        f"{key}: the --config run has {expect[key]!r}, this one {resolved.get(key)!r}"
        for key in expect
        if key != "cache_epochs" and expect[key] != resolved.get(key)
    ]
    if (expect.get("cache_epochs") or 0) > (resolved.get("cache_epochs") or 0):
        changed.append(
            f"cache_epochs: the --config run had {expect['cache_epochs']} cached epochs, "
            f"the cache now has {resolved.get('cache_epochs')}"
        )
    if changed:
        raise KdcacheError(
            "this run would not repeat the --config run: " + "; ".join(changed) + " (the data, "
            "a model's weights or input convention, or the cache differ from that run's; drop "
            "the key from the file to accept the difference)"
        )


def _write_json(values: Mapping[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(values, f, indent=2)
