"""The teacher pass: render teacher views, run the teacher, write the cache unit by unit.

``kdcache precompute`` runs it (:mod:`kdcache.cache.precompute`), and so does the fixed teacher
of the training stage (a one-epoch cache of center views), which is why it lives in the core.
A work unit is one block of a unit: the epochs of one block (``--epochs-per-block``; the epochs
of it not done yet) of one tar shard. DataLoader workers decode a batch of a unit's images once
and render every epoch's view of each (batches never straddle units), the main process runs the
teacher and keeps the top-k, and a background thread writes each finished block whole (one file
per array), then marks its epochs done. Re-running the same command skips done epochs; asking
for more epochs extends the cache, rewriting only a block that was cut short, whole.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kdcache import avatars as A
from kdcache import dist, faults, pixels, schema
from kdcache.data.index import DatasetIndex, load_index
from kdcache.dist import Dist
from kdcache.errors import KdcacheError
from kdcache.lock import output_lock
from kdcache.models import Model, load_model, warn_random_teacher, weights_hash
from kdcache.precompute_config import DEFAULT_EPOCHS_PER_BLOCK, PrecomputeConfig
from kdcache.render import (
    PILLOW,
    RENDERER,
    InputConvention,
    Renderer,
    get_renderer,
    resolve_image_size,
)
from kdcache.runtime import (
    HostCopy,
    library_versions,
    loader_kwargs,
    prepare_model,
    resolve_device,
    teacher_logits,
    topk_rows,
)
from kdcache.store import Cache, create_cache, open_cache
from kdcache.unit_writer import UnitWriter
from kdcache.units import UnitReader, needed_images, row_status
from kdcache.views import Views, ViewSpec, get_spec, sample_unit_views, view_keys

log = logging.getLogger(__name__)


def cache_identity(
    index: DatasetIndex | None = None,
    teacher: Model | None = None,
    spec: ViewSpec | None = None,
    plan_seed: int | None = None,
    k: int | None = None,
    image_size: int | None = None,
    avatars: dict[str, Any] | None = None,
    renderer: str = RENDERER,
) -> dict[str, Any]:
    """The attributes that say what a cache is (:data:`kdcache.schema.IDENTITY_KEYS`), as far
    as the parts given tell them, in that order; what a part not given (None) would say is left
    out, so ``cache.check_identity(cache_identity(...))`` checks what the caller knows.

    index: the data (``data_fingerprint``, and ``renderer``, the id of what turns it into
    views: Pillow's unless said);
    teacher: ``teacher``, ``teacher_weights_hash``, ``num_classes``, ``teacher_input``;
    spec: ``views``; plan_seed, k (``topk``), image_size (``teacher_image_size``); avatars
    (``avatars``: {"n": 0} for none).
    A precompute job gives every part: the full identity, a new cache's attributes.
    """
    known: dict[str, Any] = {
        "plan_seed": plan_seed,
        "topk": k,
        "teacher_image_size": image_size,
        "avatars": avatars,
    }
    if index is not None:
        known.update(data_fingerprint=index.fingerprint, renderer=renderer)
    if teacher is not None:
        known.update(
            teacher_weights_hash=weights_hash(teacher.module),
            teacher=teacher.spec,
            num_classes=teacher.num_classes,
            teacher_input=teacher.convention.identity(),
        )
    if spec is not None:
        known["views"] = spec.to_dict()
    return {key: known[key] for key in schema.IDENTITY_KEYS if known.get(key) is not None}


Batch = tuple[tuple[int, ...], int, int, int]  # (epochs, unit, lo, hi): rows lo..hi, each epoch


class _WorkBatches(Dataset):
    """Item ``b``: the rendered teacher views of batch ``b`` of the work list, epoch-major
    (every row's view of the first epoch, then of the next): each image is decoded once."""

    def __init__(
        self,
        index: DatasetIndex,
        spec: ViewSpec,
        plan_seed: int,
        size: int,
        batches: list[Batch],
        convention: InputConvention,
        labels_rule: int | None,
        strict: bool = False,
        max_pixels: int | None = None,
        renderer: Renderer = PILLOW,
    ):
        """labels_rule: None, or the class count of a schema-1 cache being extended, whose rule
        also marks rows without a label, or with one outside the classes, bad."""
        self.renderer = renderer
        self.index, self.spec, self.plan_seed, self.size = index, spec, plan_seed, size
        self.batches, self.convention, self.labels_rule = batches, convention, labels_rule
        self.strict = strict  # a shard cut short: an error, not a warning
        self.max_pixels = max_pixels
        self._reader: UnitReader | None = None
        self._views: dict[tuple[int, int], Views] = {}  # (unit, epoch): the unit's whole table

    def __len__(self) -> int:
        return len(self.batches)

    def _unit_views(self, unit: int, epoch: int) -> Views:
        """The views of a whole unit at ``epoch``, made once for all of the block's batches
        (a batch of a B-epoch block holds 1/B of the rows an epoch's batch would)."""
        if (unit, epoch) not in self._views:
            if any(u != unit for u, _ in self._views):  # the work moved on to another unit
                self._views.clear()
            u = self.index.units[unit]
            sizes = self.index.size[u.start : u.start + u.count]
            self._views[unit, epoch] = sample_unit_views(
                self.spec, self.plan_seed, epoch, u.start, sizes
            )
        return self._views[unit, epoch]

    def __getitem__(self, b: int) -> dict:
        epochs, unit, lo, hi = self.batches[b]
        if self._reader is None:
            self._reader = UnitReader(
                self.index,
                2,
                strict=self.strict,
                max_pixels=self.max_pixels,
                renderer=self.renderer,
            )
        u = self.index.units[unit]
        rows = np.arange(u.start + lo, u.start + hi)
        # Epoch-major: the rows' views of the first epoch, then of the next. One decode of each
        # image, and one status and one render call for the batch, as with a single epoch.
        views = Views.concat([self._unit_views(unit, e).take(slice(lo, hi)) for e in epochs])
        every = np.tile(rows, len(epochs))
        images, failed = self._reader.decode(needed_images(rows, views.partner))
        status = self._status(every, views, failed)
        good = status == schema.OK
        # the rows' view keys (avatar masks), as int64 for the trip out of the worker
        keys = np.concatenate([view_keys(self.plan_seed, e, rows) for e in epochs]).view(np.int64)
        item = {"batch": b, "views": views, "status": status, "keys": keys}
        resample = self.spec.resample("teacher", self.convention.interpolation)
        pixels.ship(
            item, "pixels", views.take(good), every[good], images, self.size, resample,
            self.renderer,
        )  # fmt: skip
        return item

    def _status(self, rows: np.ndarray, views: Views, failed: dict[int, int]) -> np.ndarray:
        status = row_status(rows, views.partner, views.box, failed)
        if self.labels_rule is not None:  # a schema-1 cache: its one status, its label rule
            label = self.index.label[rows]
            bad = (status != schema.OK) | (label < 0) | (label >= self.labels_rule)
            status = np.where(bad, schema.BAD_INPUT, schema.OK).astype(np.uint8)
        return status


def _work_list(
    cache: Cache, epochs: int, batch_size: int, limit_units: int | None, ranks: Dist | None = None
) -> list[Batch]:
    """(epochs, unit, lo, hi) batches of this rank's work not yet done, block-major: per block of
    a unit, its epochs not done, in batches of about ``batch_size`` views (``batch_size //
    len(epochs)`` rows, at least one).

    Block b of unit u belongs to rank ``(b * units + u) % world``: a pure function of the block,
    so ranks agree without talking, whenever each of them reads the done marks, no two ranks
    ever write one file, and a resumed job may use any number of ranks (the done marks, not the
    assignment, say what is left). With one epoch per block, blocks are epochs.
    """
    ranks = ranks or Dist()
    done = cache.done_mask()
    per_block = cache.epochs_per_block
    n_units = len(cache.units) if limit_units is None else min(limit_units, len(cache.units))
    batches = []
    for first in range(0, epochs, per_block):
        block = range(first, min(first + per_block, epochs))
        for unit in range(n_units):
            if (first // per_block * len(cache.units) + unit) % ranks.world != ranks.rank:
                continue
            todo = tuple(e for e in block if not done[e, unit])
            if not todo:
                continue
            count = cache.units[unit].count
            step = max(1, batch_size // len(todo))
            batches += [(todo, unit, lo, min(lo + step, count)) for lo in range(0, count, step)]
    return batches


def _stored_index(path: str) -> DatasetIndex | None:
    """The index held by an existing cache at ``path`` (a job resumed on another machine)."""
    try:
        return open_cache(path).dataset_index()
    except KdcacheError:
        return None


def _open_or_create(
    cfg: PrecomputeConfig, index: DatasetIndex, identity: dict, teacher: Model
) -> Cache:
    meta_extra = {
        "teacher_weights": cfg.teacher_weights,
        "teacher_random_init": not cfg.teacher_weights,
        "teacher_interpolation": teacher.convention.interpolation,
        # the pixel limit its rows were judged by: readers of OK rows decode up to it
        "max_image_pixels": cfg.max_image_pixels,
        "versions": library_versions(),
        "command": cfg.command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        cache = open_cache(cfg.out, mode="a")
    except KdcacheError:
        cache = None
    if cache is None:
        meta = {**identity, **meta_extra, "data": index.describe()}
        samples = {"key_hash": index.key_hash, "label": index.label, "size": index.size}
        per_block = cfg.epochs_per_block or DEFAULT_EPOCHS_PER_BLOCK
        return create_cache(cfg.out, meta, samples, cfg.epochs, cfg.chunk_rows, per_block)
    cache.check_identity(identity, what="this precompute job")
    if cfg.epochs_per_block not in (None, cache.epochs_per_block):
        log.warning(
            "--epochs-per-block %d: %s keeps its own layout of %d epochs per block",
            cfg.epochs_per_block,
            cfg.out,
            cache.epochs_per_block,
        )
    cache.extend(cfg.epochs)
    return cache


Progress = Callable[..., None]  # progress(n, total=None): n views done; total once, at the start


def precompute(cfg: PrecomputeConfig, progress: Progress | None = None) -> dict:
    """Run (or resume, or extend) a precompute job. Returns a summary dict.

    progress: called once with ``(0, total=views to do)``, then with the number of views just
        finished (the CLI's progress bar).
    """
    cfg.validate()
    spec = get_spec(cfg.views)
    ranks, device_name = dist.setup(cfg.device)
    device = resolve_device(device_name)
    # One job per cache: a second one (a requeue race) says who holds it instead of wiping a
    # cache being created or writing the same units twice. Rank 0 holds it for the job.
    with output_lock(cfg.out, "cache", enabled=ranks.main):
        return _precompute(cfg, spec, ranks, device, progress)


def _precompute(
    cfg: PrecomputeConfig,
    spec: ViewSpec,
    ranks: Dist,
    device: torch.device,
    progress: Progress | None,
) -> dict:
    index = load_index(cfg.data, known=lambda: _stored_index(cfg.out), strict=cfg.strict)
    size = resolve_image_size(cfg.teacher_image_size, index.short_sides, "--teacher-image-size")
    teacher = load_model(
        cfg.teacher,
        image_size=size,
        num_classes=cfg.num_classes,
        default_classes=index.num_classes,
        weights=cfg.teacher_weights,
        mean=cfg.teacher_mean,
        std=cfg.teacher_std,
    )
    warn_random_teacher(cfg.teacher, cfg.teacher_weights)
    # An interpolation op that leaves the teacher's filter to its convention is resolved here,
    # so the cache's view spec (its identity) names the filter its bytes were made with.
    spec = spec.with_teacher_filter(teacher.convention.interpolation)
    num_classes = teacher.num_classes
    k = cfg.topk or min(10, num_classes)
    if k > num_classes:
        raise KdcacheError(f"--topk {k} is more than the teacher's {num_classes} classes")
    log.info(
        "teacher %s: %d classes, input %s, %d px",
        cfg.teacher,
        num_classes,
        teacher.convention.describe(),
        size,
    )
    if teacher.convention.interpolation != "bilinear":
        log.info(
            "the teacher names %s interpolation; kdcache resizes bilinearly (recorded as "
            "teacher_interpolation)",
            teacher.convention.interpolation,
        )
    avatars = dict(schema.NO_AVATARS)
    if cfg.avatars:
        site = cfg.avatar_site or A.default_site(teacher.module, size)
        A.module_at(teacher.module, site, "--avatar-site")
        avatars = {"n": cfg.avatars, "drop": float(cfg.avatar_drop), "site": site}
        log.info("avatars: %d per view, dropout %.3g on the input of %s", *avatars.values())
    renderer = get_renderer(cfg.renderer)
    renderer.check(spec)
    renderer.check_data(index, cfg.data)
    identity = cache_identity(
        index, teacher, spec, cfg.plan_seed, k, size, avatars, renderer=renderer.name
    )
    # Rank 0 alone creates or extends the cache and writes its attributes; the others open it
    # once it is there, and every rank checks it is the cache this job means.
    cache = _open_or_create(cfg, index, identity, teacher) if ranks.main else None
    ranks.barrier()
    if cache is None:
        cache = open_cache(cfg.out, mode="a")
        cache.check_identity(identity, what="this precompute job")
    if schema.labels_rule(cache.schema_version):
        log.info(
            "%s is a schema-%d cache: extending it keeps its rule (rows without a label, or "
            "with one outside the teacher's classes, are marked bad)",
            cfg.out,
            cache.schema_version,
        )
    module = prepare_model(teacher.module, device, eval_mode=True, compile=cfg.compile)
    limit_units = cfg.limit_units
    if cfg.limit is not None:
        holding = sum(1 for u in index.units if u.start < cfg.limit)
        limit_units = holding if limit_units is None else min(limit_units, holding)
    batches = _work_list(cache, cfg.epochs, cfg.batch_size, limit_units, ranks)
    total = sum((hi - lo) * len(epochs) for epochs, _, lo, hi in batches)
    if progress:
        progress(0, total=total)
    log.info(
        "precompute: %d views to do in %d batches (%d epochs in blocks of %d, %d units)",
        total,
        len(batches),
        cfg.epochs,
        cache.epochs_per_block,
        len(cache.units),
    )
    started = time.perf_counter()
    stats = _run(
        cache, module, device, index, spec, cfg, batches, k, size, teacher.convention, progress
    )
    seconds = time.perf_counter() - started
    # Every rank's units are committed before anyone reports; the counts are the job's.
    reasons = schema.BAD_STATUSES
    counts = ranks.sum([total, stats["units"], *(stats["bad"].get(r, 0) for r in reasons)], device)
    total, units, by_reason = int(counts[0]), int(counts[1]), [int(c) for c in counts[2:]]
    return {
        "cache": cfg.out,
        "images": total,
        "seconds": round(seconds, 3),
        "images_per_s": round(total / seconds, 1) if seconds > 0 else None,
        "bad_rows": sum(by_reason),
        "bad_rows_by_reason": {
            schema.STATUS_NAMES[r]: c for r, c in zip(reasons, by_reason, strict=True) if c
        },
        "units_written": units,
        "world_size": ranks.world,
        "epochs_complete": len(cache.complete_epochs()),
        "config": asdict(cfg),
    }


def _run(
    cache: Cache,
    teacher: torch.nn.Module,
    device: torch.device,
    index: DatasetIndex,
    spec: ViewSpec,
    cfg: PrecomputeConfig,
    batches: list,
    k: int,
    size: int,
    convention: InputConvention,
    progress: Progress | None,
) -> dict:
    labels_rule = cache.num_classes if schema.labels_rule(cache.schema_version) else None
    dataset = _WorkBatches(
        index,
        spec,
        cfg.plan_seed,
        size,
        batches,
        convention,
        labels_rule,
        cfg.strict,
        cfg.max_image_pixels,
        get_renderer(cache.meta.get("renderer", RENDERER)),
    )
    loader = DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        pin_memory=device.type == "cuda",
        **loader_kwargs(cfg.workers),
    )
    pending: dict[int, dict[int, list]] = {}  # unit -> epoch -> its finished batches
    stats: dict = {"bad": {}, "units": 0}

    def finish(item: dict, host: HostCopy) -> None:
        epochs, unit, lo, hi = batches[item["batch"]]
        top = host.numpy()
        parts = pending.setdefault(unit, {})
        n = hi - lo
        for i, epoch in enumerate(epochs):
            mine = slice(i * n, (i + 1) * n)
            views, status = item["views"].take(mine), item["status"][mine]
            bad = status != schema.OK
            if cfg.strict and bad.any():
                at = int(np.flatnonzero(bad)[0])
                first = index.units[unit].start + lo + at
                raise KdcacheError(
                    f"--strict: {int(bad.sum())} unusable rows in shard "
                    f"{index.units[unit].name} (first: sample {first}, position {lo + at}: "
                    f"{schema.STATUS_NAMES[int(status[at])]}); fix the data or drop --strict "
                    "to mark them bad and skip them"
                )
            rows = {name: values[mine] for name, values in top.items()}
            parts.setdefault(epoch, []).append((lo, views, status, rows))
        if hi == cache.units[unit].count:  # the block's last batch: write it whole
            block = {e: _assemble(p) for e, p in pending.pop(unit).items()}
            writer.submit(unit, block)
            for rows in block.values():
                values, counts = np.unique(rows["status"], return_counts=True)
                for reason, count in zip(values, counts, strict=True):
                    if reason != schema.OK:
                        stats["bad"][int(reason)] = stats["bad"].get(int(reason), 0) + int(count)
                stats["units"] += 1
        if progress:
            progress((hi - lo) * len(epochs))

    # Batch b's top-k is copied to the host while batch b+1 runs on the device: the teacher
    # is given its next batch before anyone waits on the previous copy.
    in_flight: tuple[dict, HostCopy] | None = None
    with UnitWriter(cache) as writer:
        for item in loader:
            x = teacher_input(item, convention, size, device)
            rows = teacher_rows(teacher, x, device, k, cache.avatars, item["keys"])
            host = HostCopy(rows)
            faults.point("batch")
            if in_flight is not None:
                finish(*in_flight)
            in_flight = (item, host)
        if in_flight is not None:
            finish(*in_flight)
    return stats


TEACHER_ROWS = (
    "topk_logits",
    "topk_index",
    "lse",
    "avatar_topk_logits",
    "avatar_topk_index",
    "avatar_lse",
    "avatar_u",
)


def teacher_input(
    item: dict, convention: InputConvention, size: int, device: torch.device
) -> torch.Tensor:
    """A work batch's teacher input on ``device``: (R, 3, S, S) float32, its good rows
    (``status`` OK) rendered and normalised (:mod:`kdcache.pixels`), the others zeros."""
    good = torch.as_tensor(item["status"]) == schema.OK
    x = pixels.take(item, "pixels", convention, device)
    if bool(good.all()):
        return x
    full = torch.zeros(len(good), 3, size, size, device=device)
    full[good.to(device)] = x
    return full


def teacher_rows(
    teacher: torch.nn.Module,
    pixels: torch.Tensor,
    device: torch.device,
    k: int,
    avatars: dict[str, Any],
    keys: np.ndarray,
) -> dict[str, torch.Tensor]:
    """A batch's teacher rows on ``device``: top-k logits and lse, and with avatars their
    ensemble's rows and the uncertainty (:mod:`kdcache.avatars`; ``keys``: (R,) the rows' view
    keys, uint64 or their int64 view)."""
    if not schema.has_avatars(avatars):
        return topk_rows(teacher_logits(teacher, pixels, device), k)
    vanilla, log_ens, u = A.teacher_and_avatars(teacher, pixels, device, avatars, keys)
    rows = topk_rows(vanilla, k)
    rows.update({f"avatar_{name}": v for name, v in topk_rows(log_ens, k).items()})
    rows["avatar_u"] = u
    return rows


def _assemble(parts: list) -> dict[str, np.ndarray]:
    """Concatenate a work unit's batches into its row fields."""
    parts.sort(key=lambda p: p[0])
    out: dict[str, list] = {}
    for _, views, status, rows in parts:
        for name in schema.VIEW_FIELDS:
            out.setdefault(name, []).append(getattr(views, name))
        for name, values in views.ops.items():  # the view ops' own fields
            out.setdefault(name, []).append(values)
        for name, values in rows.items():
            out.setdefault(name, []).append(values)
        out.setdefault("status", []).append(status)
    fields = {name: np.concatenate(chunks) for name, chunks in out.items()}
    bad = fields["status"] != schema.OK
    for name in TEACHER_ROWS:  # the teacher saw a blank image there
        if name in fields:
            fields[name][bad] = 0
    return fields
