"""The views of one unit and epoch, fresh from the view generator or replayed from a cache.

Both the trainer and ``kdcache verify`` get their views here, so what verify checks is what the
trainer trains on. A replayed unit is checked against the data before any row is used: the
stored key hashes must be the samples being read, and the stored seeds the view generator's.
"""

from __future__ import annotations

import numpy as np

from kdcache import schema
from kdcache.data.index import DatasetIndex
from kdcache.errors import CacheDamagedError, CacheMismatchError
from kdcache.store import Cache
from kdcache.views import STUDENT_STREAM, Views, ViewSpec, sample_unit_views, view_keys

TARGET_FIELDS = ("topk_logits", "topk_index", "lse")


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
    targets = {name: rows[name] for name in TARGET_FIELDS}
    return views, rows["status"] == schema.OK, targets


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
