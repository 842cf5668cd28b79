"""``kdcache verify``: the damage scan (:func:`scan`, every checksum of every committed unit),
``--repair`` (recompute only the damaged units), then re-render a random sample of cached views,
re-run the teacher and compare.

The views are rebuilt through :mod:`kdcache.replay`, the trainer's own path, so a pass means the
trainer replays what the teacher saw. Across machines expect ulp-level drift of the logits (and,
rarely, a swapped near-tie); on the machine that wrote the cache, top-1 agreement is 1.0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kdcache import avatars as A
from kdcache import pixels, schema
from kdcache.data.index import load_index
from kdcache.errors import CacheDamagedError, KdcacheError
from kdcache.models import Model, load_model, warn_random_teacher
from kdcache.render import RENDERER, Renderer, get_renderer
from kdcache.replay import cached_unit_views
from kdcache.runtime import loader_kwargs, prepare_model, resolve_device, teacher_logits
from kdcache.store import Cache, open_cache
from kdcache.teacher_pass import cache_identity
from kdcache.units import UnitReader, needed_images
from kdcache.views import view_keys

log = logging.getLogger(__name__)


def _usable(cache) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Done work units and their usable rows -> (cells (M, 2) epoch/unit, usable rows per
    cell (M,), status counts by name). Reads the status of every done unit once."""
    cells = np.argwhere(cache.done_mask())
    if len(cells) == 0:
        raise KdcacheError("the cache has no finished unit to verify; run `kdcache precompute`")
    usable = np.zeros(len(cells), dtype=np.int64)
    counts: dict[str, int] = {}
    for n, (epoch, unit) in enumerate(cells):
        status = cache.read_unit(int(epoch), int(unit), ("status",))["status"]
        values, k = np.unique(status, return_counts=True)
        for v, c in zip(values, k, strict=True):
            name = schema.STATUS_NAMES.get(int(v), str(v))
            counts[name] = counts.get(name, 0) + int(c)
        usable[n] = int((status == schema.OK).sum())
    return cells, usable, counts


def _pick(
    cells: np.ndarray, usable: np.ndarray, samples: int, seed: int
) -> list[tuple[int, int, int]]:
    """``samples`` random usable rows among done units -> [(epoch, unit, k)]: the k-th usable
    row of the unit."""
    total = int(usable.sum())
    rng = np.random.default_rng([0x7E21F1, seed])
    flat = np.sort(rng.choice(total, size=min(samples, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(usable)[:-1]])
    which = np.searchsorted(starts, flat, side="right") - 1
    return [
        (int(cells[w][0]), int(cells[w][1]), int(f - starts[w]))
        for w, f in zip(which, flat, strict=True)
    ]


def _batches(picked: list[tuple[int, int, int]], batch_size: int) -> list:
    """Picked rows grouped by (epoch, unit), in batches of at most ``batch_size``."""
    groups: dict[tuple[int, int], list[int]] = {}
    for epoch, unit, k in picked:
        groups.setdefault((epoch, unit), []).append(k)
    return [
        (epoch, unit, np.array(ks[lo : lo + batch_size]))
        for (epoch, unit), ks in sorted(groups.items())
        for lo in range(0, len(ks), batch_size)
    ]


class _Views(Dataset):
    """Item ``i``: a batch of picked rows of one unit, rendered as the teacher saw them, with
    their cached top-k (the trainer's own replay path, :mod:`kdcache.replay`)."""

    def __init__(
        self, cache, index, batches: list[tuple[int, int, np.ndarray]], renderer: Renderer
    ):
        self.cache, self.index, self.batches, self.renderer = cache, index, batches, renderer
        self.size = int(cache.meta["teacher_image_size"])
        self._reader: UnitReader | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        if self._reader is None:
            # Every row picked was usable when cached: decode it under the cache's pixel limit.
            limit = self.cache.meta.get("max_image_pixels")
            self._reader = UnitReader(self.index, 2, max_pixels=limit, renderer=self.renderer)
        epoch, unit, ks = self.batches[i]
        views, ok, targets = cached_unit_views(self.cache, self.index, unit, epoch)
        positions = np.flatnonzero(ok)[ks]
        rows = self.index.units[unit].start + positions
        views = views.take(positions)
        images, failed = self._reader.decode(needed_images(rows, views.partner))
        if failed:
            raise KdcacheError(
                f"shard {self.index.units[unit].name}: {len(failed)} images that the cache "
                "rendered no longer decode; the data changed since the cache was made"
            )
        convention = self.cache.teacher_input
        resample = self.cache.spec.resample("teacher", convention.interpolation)
        item = {
            "topk_index": torch.from_numpy(targets["topk_index"][positions].astype(np.int64)),
            "topk_logits": torch.from_numpy(targets["topk_logits"][positions].astype(np.float32)),
        }
        pixels.ship(item, "pixels", views, rows, images, self.size, resample, self.renderer)
        if schema.has_avatars(self.cache.avatars):  # the avatars' masks come from the view keys
            item["keys"] = view_keys(self.cache.plan_seed, epoch, rows).view(np.int64)
            for name, dtype in (("avatar_topk_index", np.int64), ("avatar_topk_logits", np.float32),
                                ("avatar_u", np.float32)):  # fmt: skip
                item[name] = torch.from_numpy(targets[name][positions].astype(dtype))
        return item


def verify(
    cache_path: str,
    data: str,
    teacher_spec: str,
    teacher_weights: str | None = None,
    samples: int = 256,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 128,
    progress: Callable[..., None] | None = None,
    repair: bool = False,
    workers: int = 0,
    teacher_mean: tuple[float, float, float] | None = None,
    teacher_std: tuple[float, float, float] | None = None,
    renderer: str | None = None,
) -> dict:
    """Check every checksum, then re-run the teacher on ``samples`` random usable cached views.

    renderer: render them with this one (``pillow``, ``ffcv``) instead of the cache's own, to
    measure how far two renderers' teacher outputs are apart on the same views and images; the
    result then also says ``renderer`` and ``cache_renderer``.

    -> {"checked", "requested", "top1_agreement", "topk_set_agreement", "max_abs_logit_error",
    ...; a cache with avatars also "avatar_top1_agreement", "avatar_topk_set_agreement",
    "avatar_max_abs_logp_error" and
    "avatar_max_abs_u_error": the avatars re-made from the stored views' keys}. Damage raises :class:`CacheDamagedError` naming each array, epoch and unit; with
    ``repair`` the damaged units are recomputed (and only those) before the views are checked.
    progress: called once with ``(0, total=views to check)``, then with views checked.
    """
    for name, value, low in (("samples", samples, 1), ("batch-size", batch_size, 1)):
        if value < low:
            raise KdcacheError(f"--{name} must be at least {low}, got {value}")
    cache = open_cache(cache_path, mode="a" if repair else "r")
    index = load_index(data, known=cache.dataset_index)
    own = cache.meta.get("renderer", RENDERER)
    cache.check_identity(cache_identity(index, renderer=own), what=f"data {data}")
    render = get_renderer(renderer or own)
    if render.name != own:
        render.check(cache.spec)
    teacher = load_model(
        teacher_spec,
        image_size=int(cache.meta["teacher_image_size"]),
        num_classes=cache.num_classes,
        weights=teacher_weights,
        mean=teacher_mean,
        std=teacher_std,
        asked_by=f"the cache {cache_path}",
    )
    warn_random_teacher(teacher_spec, teacher_weights)
    cache.check_identity(cache_identity(teacher=teacher), what="--teacher")
    damage = scan(cache)
    repaired = 0
    if damage and not repair:
        raise CacheDamagedError(_describe(cache_path, damage))
    if damage:
        repaired = _repair(cache, index, damage, teacher, data, device)
    cells, usable, counts = _usable(cache)
    if not usable.sum():
        raise KdcacheError("the cache's finished units hold no usable row to verify (all bad?)")
    if usable.sum() < samples:
        log.warning(
            "verifying all %d usable views of the cache's finished units (--samples %d asked "
            "for more)",
            int(usable.sum()),
            samples,
        )
    picked = _pick(cells, usable, samples, seed)
    if progress:
        progress(0, total=len(picked))
    result = _compare(
        cache,
        teacher.module,
        _Views(cache, index, _batches(picked, batch_size), render),
        device,
        workers,
        progress,
    )
    if render.name != own:
        result.update(renderer=render.name, cache_renderer=own)
    return {
        **result,
        "requested": samples,
        "damaged_units_repaired": repaired,
        "status_counts": counts,
    }


def scan(cache: Cache, progress: Callable[[int], Any] | None = None) -> list[dict[str, Any]]:
    """Read every committed chunk of every array, checking every checksum.

    Returns the damage found: ``{"array", "epoch" (None for per-sample arrays), "unit",
    "error"}`` each. A committed unit whose rows read back as padding (a lost unit file)
    counts as damaged too. progress: called with 1 per unit read.
    """
    damage: list[dict[str, Any]] = []

    def record(array: str, epoch: int | None, unit: int, error: str) -> None:
        damage.append({"array": array, "epoch": epoch, "unit": unit, "error": error})

    try:
        done = cache.done_mask()
    except (OSError, ValueError, RuntimeError):  # then cell by cell, to name the bad marks
        done = np.zeros((cache.epochs, len(cache.units)), dtype=bool)
        for epoch, unit in np.ndindex(done.shape):
            try:
                done[epoch, unit] = bool(cache.array(schema.DONE_ARRAY)[epoch, unit])
            except (OSError, ValueError, RuntimeError) as e:
                record(schema.DONE_ARRAY, epoch, unit, str(e))
    for unit in range(len(cache.units)):
        for name in schema.SAMPLE_NAMES:
            try:
                cache.read_samples(unit, (name,))
            except CacheDamagedError as e:
                record(name, None, unit, str(e))
    for epoch, unit in np.argwhere(done):
        epoch, unit = int(epoch), int(unit)
        try:
            cache.committed_entry(epoch, unit)
        except CacheDamagedError as e:  # nothing else of the unit can be checked
            record(schema.MANIFEST_ARRAY, epoch, unit, str(e))
            if progress:
                progress(1)
            continue
        for name in cache.row_names:
            try:
                values = cache.read_unit(epoch, unit, (name,))[name]
            except CacheDamagedError as e:
                record(name, epoch, unit, str(e))
                continue
            if name == "status" and (values == schema.PADDING).any():
                record("status", epoch, unit, "committed rows are missing (a lost unit file?)")
        if progress:
            progress(1)
    return damage


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
    teacher: Model,
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
            teacher=teacher.spec,
            teacher_weights=teacher.weights,
            teacher_mean=teacher.convention.mean,
            teacher_std=teacher.convention.std,
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
            renderer=m.get("renderer", RENDERER),  # the cache's own
            # the avatar ensembles of a cache that has them, at its site
            avatars=int(cache.avatars.get("n", 0)),
            avatar_drop=float(cache.avatars.get("drop", 0.1)),
            avatar_site=cache.avatars.get("site"),
        )
    )
    left = scan(cache)
    if left:
        raise CacheDamagedError("repair did not fix everything: " + _describe(cache.path, left))
    return len(units)


def _compare(
    cache,
    teacher: torch.nn.Module,
    views: _Views,
    device: str,
    workers: int,
    progress: Callable[..., None] | None,
) -> dict:
    dev = resolve_device(device)
    teacher = prepare_model(teacher, dev, eval_mode=True)
    k = cache.topk
    loader = DataLoader(views, batch_size=None, **loader_kwargs(workers))
    top1 = setk = checked = 0
    max_err = 0.0
    avatars = cache.avatars
    a_top1 = a_setk = 0
    a_err = u_err = 0.0
    for item in loader:
        x = pixels.take(item, "pixels", cache.teacher_input, dev)
        if schema.has_avatars(avatars):
            made = A.teacher_and_avatars(teacher, x, dev, avatars, item["keys"])
            logits, log_ens, u = (x.cpu() for x in made)
            a_idx = item["avatar_topk_index"]
            a_top1 += int((log_ens.argmax(1) == a_idx[:, 0]).sum())
            live = log_ens.topk(a_idx.shape[1], dim=1).indices.sort(1).values
            a_setk += int((live == a_idx.sort(1).values).all(1).sum())
            err = (log_ens.gather(1, a_idx) - item["avatar_topk_logits"]).abs()
            a_err = max(a_err, float(err.max()) if err.numel() else 0.0)
            u_err = max(u_err, float((u - item["avatar_u"]).abs().max()) if len(u) else 0.0)
        else:
            logits = teacher_logits(teacher, x, dev).cpu()
        cached_idx, cached_top = item["topk_index"], item["topk_logits"]
        live_idx = logits.topk(k, dim=1).indices
        top1 += int((live_idx[:, 0] == cached_idx[:, 0]).sum())
        setk += int((live_idx.sort(1).values == cached_idx.sort(1).values).all(1).sum())
        err = (logits.gather(1, cached_idx) - cached_top).abs()
        max_err = max(max_err, float(err.max()) if err.numel() else 0.0)
        checked += len(live_idx)
        if progress:
            progress(len(live_idx))
    out = {
        "checked": checked,
        "top1_agreement": top1 / checked,
        "topk_set_agreement": setk / checked,
        "max_abs_logit_error": max_err,
    }
    if schema.has_avatars(avatars):  # the avatar ensembles re-made from the stored view keys
        out["avatar_top1_agreement"] = a_top1 / checked
        out["avatar_topk_set_agreement"] = a_setk / checked
        out["avatar_max_abs_logp_error"] = a_err
        out["avatar_max_abs_u_error"] = u_err
    return out
