"""The views of one unit and epoch, fresh from the view generator or replayed from a cache.

Both the trainer and ``kdcache verify`` get their views here, so what verify checks is what the
trainer trains on. A replayed unit is checked against the data before any row is used: the
stored key hashes must be the samples being read, and the stored seeds the view generator's.
"""

from __future__ import annotations

import numpy as np

from kdcache import schema
from kdcache.data.index import DatasetIndex
from kdcache.draws import uniform
from kdcache.errors import CacheDamagedError, CacheMismatchError
from kdcache.store import Cache
from kdcache.views import (
    REUSE_STREAM,
    STUDENT_STREAM,
    Views,
    ViewSpec,
    sample_unit_views,
    view_keys,
)

TARGET_FIELDS = ("topk_logits", "topk_index", "lse")
# A cache made with --avatars also gives each row its avatar ensemble's target.
AVATAR_TARGET_FIELDS = ("avatar_topk_logits", "avatar_topk_index", "avatar_lse", "avatar_u")


def target_fields(cache: Cache) -> tuple[str, ...]:
    """The target arrays a replayed row carries: the teacher's, and the avatars' if any."""
    extra = AVATAR_TARGET_FIELDS if schema.has_avatars(cache.avatars) else ()
    return TARGET_FIELDS + extra


def fresh_unit_views(
    index: DatasetIndex,
    unit: int,
    spec: ViewSpec,
    plan_seed: int,
    epoch: int,
    stream: int = STUDENT_STREAM,
) -> tuple[Views, np.ndarray]:
    """Views of every sample of ``unit`` -> (views, usable (n,) bool: image readable)."""
    u = index.units[unit]
    sizes = index.size[u.start : u.start + u.count]
    views = sample_unit_views(spec, plan_seed, epoch, u.start, sizes, stream)
    return views, (sizes > 0).all(axis=1)


def cached_unit_views(
    cache: Cache, index: DatasetIndex, unit: int, epoch: int
) -> tuple[Views, np.ndarray, dict[str, np.ndarray]]:
    """A unit's rows of one cache epoch -> (views, usable (n,) bool: status ok, target rows).

    One contiguous read per array; raises :class:`CacheMismatchError` when the rows are not the
    views of these samples.
    """
    rows = cache.read_unit(epoch, unit)
    check_unit(cache, index, unit, epoch, rows)
    spec = cache.spec
    views = Views(
        **{name: rows[name] for name in schema.VIEW_FIELDS},
        ops={name: rows[name] for name, *_ in spec.op_fields()},
        spec=spec,
    )
    views.partner = views.partner.astype(np.int64)
    targets = {name: rows[name] for name in target_fields(cache)}
    return views, rows["status"] == schema.OK, targets


def sampled_cache_epochs(
    plan_seed: int, epoch: int, indices: np.ndarray, epochs: tuple[int, ...]
) -> np.ndarray:
    """``--reuse sample``: the cache epoch each of ``indices`` (N,) replays in student epoch
    ``epoch``, one of ``epochs`` drawn uniformly from (plan seed, epoch, sample) -> (N,) int64."""
    keys = view_keys(plan_seed, epoch, np.asarray(indices, dtype=np.int64), REUSE_STREAM)
    pick = np.minimum((uniform(keys, 0) * len(epochs)).astype(np.int64), len(epochs) - 1)
    return np.asarray(epochs, dtype=np.int64)[pick]


def sampled_unit_views(
    cache: Cache, index: DatasetIndex, unit: int, epoch: int, epochs: tuple[int, ...]
) -> tuple[Views, np.ndarray, dict[str, np.ndarray]]:
    """:func:`cached_unit_views` of a unit whose samples each replay the cache epoch
    :func:`sampled_cache_epochs` draws for them (one read per cache epoch used)."""
    u = index.units[unit]
    chosen = sampled_cache_epochs(cache.plan_seed, epoch, u.start + np.arange(u.count), epochs)
    parts = {int(e): cached_unit_views(cache, index, unit, int(e)) for e in np.unique(chosen)}
    first = next(iter(parts.values()))
    views = first[0].take(np.arange(u.count))  # copies, filled in below epoch by epoch
    ok, targets = first[1].copy(), {k: v.copy() for k, v in first[2].items()}
    for e, (v, usable, rows) in parts.items():
        mine = chosen == e
        for name in ("seed", "box", "flip", "partner", "partner_box", "partner_flip", "lam"):
            getattr(views, name)[mine] = getattr(v, name)[mine]
        for name, values in v.ops.items():
            views.ops[name][mine] = values[mine]
        ok[mine] = usable[mine]
        for name, values in rows.items():
            targets[name][mine] = values[mine]
    return views, ok, targets


def check_unit(
    cache: Cache, index: DatasetIndex, unit: int, epoch: int, rows: dict[str, np.ndarray]
) -> None:
    """Refuse a unit whose rows are not the views of these samples (other data, other plan)."""
    u = index.units[unit]
    keys = cache.read_samples(unit)["key_hash"]
    if not np.array_equal(keys, index.key_hash[u.start : u.start + u.count]):
        raise CacheMismatchError(
            f"cache {cache.path} unit {unit} ({u.name}) holds other samples than the data "
            "(key hashes differ); train with the data the cache was made from"
        )
    written = rows["status"] != schema.PADDING
    if not written.any():
        if bool(cache.array(schema.DONE_ARRAY)[epoch, unit]):  # committed, yet its rows are gone
            raise CacheDamagedError(
                f"cache {cache.path} epoch {epoch} unit {unit} ({u.name}) is committed but its "
                "rows read as padding (a lost unit file?); find all damage with `kdcache "
                "verify` and fix it with `kdcache verify --repair`"
            )
        raise CacheMismatchError(
            f"cache {cache.path} epoch {epoch} unit {unit} ({u.name}) was "
            "never written; finish it with `kdcache precompute`"
        )
    expected = (
        view_keys(cache.plan_seed, epoch, u.start + np.arange(u.count)) & np.uint64(0xFFFF)
    ).astype(np.uint16)
    if not np.array_equal(rows["seed"][written], expected[written]):
        raise CacheMismatchError(
            f"cache {cache.path} epoch {epoch} unit {unit} ({u.name}): stored view seeds differ "
            "from the view generator's; the cache was made by an incompatible kdcache or its "
            "rows were damaged; re-make it with `kdcache precompute`"
        )
