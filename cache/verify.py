"""``kdcache verify``: re-render a random sample of cached views, re-run the teacher, compare.

The views are rebuilt through :mod:`kdcache.replay`, the trainer's own path, so a pass means the
trainer replays what the teacher saw. Across machines expect ulp-level drift of the logits (and,
rarely, a swapped near-tie); on the machine that wrote the cache, top-1 agreement is 1.0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from kdcache import schema
from kdcache.data.index import load_index
from kdcache.errors import CacheDamagedError, KdcacheError
from kdcache.models import create_model, weights_hash
from kdcache.render import RENDERER, render_views
from kdcache.replay import cached_unit_views
from kdcache.runtime import prepare_model, resolve_device, teacher_logits
from kdcache.store import open_cache
from kdcache.units import UnitReader, needed_images

log = logging.getLogger(__name__)


def _pick(
    done: np.ndarray, counts: list[int], samples: int, seed: int
) -> dict[tuple[int, int], np.ndarray]:
    """``samples`` random (epoch, unit, position) among done work units, grouped by unit."""
    cells = np.argwhere(done)
    if len(cells) == 0:
        raise KdcacheError("the cache has no finished unit to verify; run `kdcache precompute`")
    sizes = np.array([counts[u] for _, u in cells], dtype=np.int64)
    rng = np.random.default_rng([0x7E21F1, seed])
    flat = rng.choice(int(sizes.sum()), size=min(samples, int(sizes.sum())), replace=False)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    which = np.searchsorted(starts, flat, side="right") - 1
    picked: dict[tuple[int, int], list[int]] = {}
    for w, f in zip(which, flat, strict=True):
        epoch, unit = (int(v) for v in cells[w])
        picked.setdefault((epoch, unit), []).append(int(f - starts[w]))
    return {key: np.sort(np.array(pos)) for key, pos in sorted(picked.items())}


def verify(
    cache_path: str,
    data: str,
    teacher_spec: str,
    teacher_weights: str | None = None,
    samples: int = 256,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 128,
    progress: Callable[[int], None] | None = None,
    repair: bool = False,
) -> dict:
    """Check every checksum, then re-run the teacher on ``samples`` random cached views.

    -> {"checked", "top1_agreement", "topk_set_agreement", "max_abs_logit_error", ...}.
    Damage raises :class:`CacheDamagedError` naming each array, epoch and unit; with
    ``repair`` the damaged units are recomputed (and only those) before the views are checked.
    """
    cache = open_cache(cache_path, mode="a" if repair else "r")
    index = load_index(data, known=cache.dataset_index)
    cache.check_identity(
        {"data_fingerprint": index.fingerprint, "renderer": RENDERER}, what=f"data {data}"
    )
    teacher = create_model(teacher_spec, cache.num_classes, teacher_weights)
    cache.check_identity(
        {"teacher": teacher_spec, "teacher_weights_hash": weights_hash(teacher)}, what="--teacher"
    )
    damage = cache.scan()
    repaired = 0
    if damage and not repair:
        raise CacheDamagedError(_describe(cache_path, damage))
    if damage:
        repaired = _repair(cache, index, damage, teacher_spec, teacher_weights, data, device)
    result = _compare(cache, index, teacher, samples, seed, device, batch_size, progress)
    return {**result, "damaged_units_repaired": repaired, "status_counts": _status_counts(cache)}


def _describe(path: str, damage: list[dict]) -> str:
    where = [
        f"{d['array']} epoch {d['epoch']} unit {d['unit']}"
        if d["epoch"] is not None
        else f"{d['array']} unit {d['unit']}"
        for d in damage
    ]
    more = f" and {len(where) - 10} more" if len(where) > 10 else ""
    return (
        f"cache {path} is damaged in {len(damage)} places: {'; '.join(where[:10])}{more}. "
        "Recompute only those units with `kdcache verify --repair` (same --data and --teacher)"
    )


def _repair(
    cache,
    index,
    damage: list[dict],
    teacher_spec: str,
    teacher_weights: str | None,
    data: str,
    device: str,
) -> int:
    """Rewrite damaged per-sample rows from the index, uncommit damaged units, recompute."""
    from kdcache.cache.precompute import PrecomputeConfig, precompute

    units = set()
    for d in damage:
        if d["epoch"] is None:  # per-sample arrays come from the data index
            u = index.units[d["unit"]]
            sl = slice(u.start, u.start + u.count)
            cache.rewrite_samples(
                d["unit"],
                {"key_hash": index.key_hash[sl], "label": index.label[sl], "size": index.size[sl]},
            )
        else:
            units.add((d["epoch"], d["unit"]))
    for epoch, unit in sorted(units):
        cache.uncommit(epoch, unit)
    log.warning("recomputing %d damaged units of %s", len(units), cache.path)
    m = cache.meta
    precompute(
        PrecomputeConfig(
            data=data,
            teacher=teacher_spec,
            teacher_weights=teacher_weights,
            out=cache.path,
            epochs=cache.epochs,
            topk=cache.topk,
            views=cache.spec.name,
            plan_seed=cache.plan_seed,
            teacher_image_size=int(m["teacher_image_size"]),
            num_classes=cache.num_classes,
            device=device,
            workers=0,
            command=m.get("command", "kdcache verify --repair"),
        )
    )
    left = cache.scan()
    if left:
        raise CacheDamagedError("repair did not fix everything: " + _describe(cache.path, left))
    return len(units)


def _compare(
    cache,
    index,
    teacher,
    samples: int,
    seed: int,
    device: str,
    batch_size: int,
    progress: Callable[[int], None] | None,
) -> dict:
    dev = resolve_device(device)
    teacher = prepare_model(teacher, dev, eval_mode=True)
    size, k = int(cache.meta["teacher_image_size"]), cache.topk
    reader = UnitReader(index, capacity=2)
    top1 = setk = checked = 0
    max_err = 0.0
    for (epoch, unit), positions in _pick(cache.done_mask(), index.counts, samples, seed).items():
        views, ok, targets = cached_unit_views(cache, index, unit, epoch)
        positions = positions[ok[positions]]  # bad-input rows have no teacher output to check
        rows = index.units[unit].start + positions
        views = views.take(positions)
        images, _ = reader.decode(needed_images(rows, views.partner))
        for lo in range(0, len(rows), batch_size):
            sel = slice(lo, lo + batch_size)
            pixels = render_views(views.take(sel), rows[sel], images, size)
            logits = teacher_logits(teacher, pixels, dev).cpu()
            cached_idx = torch.from_numpy(targets["topk_index"][positions[sel]].astype(np.int64))
            cached_top = torch.from_numpy(targets["topk_logits"][positions[sel]].astype(np.float32))
            live_idx = logits.topk(k, dim=1).indices
            top1 += int((live_idx[:, 0] == cached_idx[:, 0]).sum())
            setk += int((live_idx.sort(1).values == cached_idx.sort(1).values).all(1).sum())
            err = (logits.gather(1, cached_idx) - cached_top).abs()
            max_err = max(max_err, float(err.max()) if err.numel() else 0.0)
            checked += len(live_idx)
            if progress:
                progress(len(live_idx))
    if checked == 0:
        raise KdcacheError("no usable row among the sampled ones (all bad input?)")
    return {
        "checked": checked,
        "top1_agreement": top1 / checked,
        "topk_set_agreement": setk / checked,
        "max_abs_logit_error": max_err,
    }


def _status_counts(cache) -> dict[str, int]:
    counts: dict[str, int] = {}
    status = cache.array("status")
    for epoch in cache.complete_epochs():
        values, n = np.unique(status[epoch], return_counts=True)
        for v, c in zip(values, n, strict=True):
            if v == schema.PADDING:
                continue
            name = schema.STATUS_NAMES.get(int(v), str(v))
            counts[name] = counts.get(name, 0) + int(c)
    return counts
