"""The training data path, shared by every teacher mode: item ``b`` is batch ``b`` of an epoch.

A batch holds the student's rendered views and whatever its targets need: labels (``none``),
the teacher's input (``online``), or the cache rows of the views it replays (``cached``). In
``cached`` mode the views come *from* the cache (boxes, flips, partners, lam), so the student
sees exactly what the teacher saw; each unit is checked against the data (key hashes) and the
view generator (seeds) before any of its rows is used.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from kdcache import schema
from kdcache.data.index import DatasetIndex
from kdcache.errors import CacheMismatchError
from kdcache.render import render_views
from kdcache.store import Cache
from kdcache.units import UnitReader, needed_images
from kdcache.views import Views, ViewSpec, sample_unit_views, view_keys

log = logging.getLogger(__name__)


@dataclass
class StreamSpec:
    """What the batches of one epoch are made of."""

    index: DatasetIndex
    batches: list[np.ndarray]  # global sample indices per batch
    epoch: int  # the student's epoch (views of online/none modes)
    image_size: int
    spec: ViewSpec
    plan_seed: int
    cache: Cache | None = None  # cached mode: views and targets from here
    cache_epoch: int = 0
    teacher_image_size: int | None = None  # online: render the teacher's input too


class TrainBatches(Dataset):
    def __init__(self, stream: StreamSpec):
        self.s = stream
        self._reader: UnitReader | None = None
        self._rows: OrderedDict[int, tuple[Views, np.ndarray, dict]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.s.batches)

    def __getitem__(self, b: int) -> dict:
        s = self.s
        if self._reader is None:
            self._reader = UnitReader(s.index, capacity=8)
        rows = np.asarray(s.batches[b], dtype=np.int64)
        views, ok, cached = self._gather(rows)
        rows, views = rows[ok], views.take(ok)
        images, failed = self._reader.decode(needed_images(rows, views.partner))
        keep = np.array([r not in failed and p not in failed for r, p in
                         zip(rows, views.partner)], dtype=bool)
        rows, views = rows[keep], views.take(keep)
        partner = np.where(views.partner >= 0, views.partner, rows)
        item = {
            "pixels": render_views(views, rows, images, s.image_size),
            "label": torch.from_numpy(s.index.label[rows]),
            "partner_label": torch.from_numpy(s.index.label[partner]),
            "lam": torch.from_numpy(views.lam.astype(np.float32)),
            "skipped": int(len(ok) - ok.sum() + len(keep) - keep.sum()),
        }
        if cached:
            sel = np.flatnonzero(ok)[keep]
            for name in ("topk_logits", "topk_index", "lse"):
                item[name] = torch.from_numpy(cached[name][sel])
        if s.teacher_image_size and s.teacher_image_size != s.image_size:
            item["teacher_pixels"] = render_views(views, rows, images, s.teacher_image_size)
        return item

    def _gather(self, rows: np.ndarray) -> tuple[Views, np.ndarray, dict | None]:
        """Views (and cache rows) of ``rows``, unit by unit; ``ok`` masks usable rows."""
        units = np.array([self.s.index.unit_index_of(int(i)) for i in rows])
        parts = [self._unit_rows(int(u)) for u in units]
        local = rows - np.array([self.s.index.units[u].start for u in units])
        views = _stack_views([p[0] for p in parts], local)
        ok = np.array([p[1][j] for p, j in zip(parts, local)], dtype=bool)
        if self.s.cache is None:
            return views, ok, None
        cached = {name: np.stack([p[2][name][j] for p, j in zip(parts, local)])
                  for name in ("topk_logits", "topk_index", "lse")}
        return views, ok, cached

    def _unit_rows(self, unit: int) -> tuple[Views, np.ndarray, dict]:
        if unit not in self._rows:
            self._rows[unit] = self._load_unit(unit)
            while len(self._rows) > 16:
                self._rows.popitem(last=False)
        return self._rows[unit]

    def _load_unit(self, unit: int) -> tuple[Views, np.ndarray, dict]:
        s = self.s
        u = s.index.units[unit]
        if s.cache is None:
            sizes = s.index.size[u.start:u.start + u.count]
            views = sample_unit_views(s.spec, s.plan_seed, s.epoch, u.start, sizes)
            return views, (sizes > 0).all(axis=1), {}
        rows = s.cache.read_unit(s.cache_epoch, unit)
        check_unit(s.cache, s.index, unit, s.cache_epoch, rows)
        views = Views(**{name: rows[name] for name in schema.VIEW_FIELDS})
        views.partner = views.partner.astype(np.int64)
        return views, rows["status"] == schema.OK, rows


def _stack_views(per_row: list[Views], local: np.ndarray) -> Views:
    fields = schema.VIEW_FIELDS
    return Views(**{f: np.stack([getattr(v, f)[j] for v, j in zip(per_row, local)])
                    for f in fields})


def check_unit(cache: Cache, index: DatasetIndex, unit: int, epoch: int, rows: dict) -> None:
    """Refuse a unit whose rows are not the views of these samples (other data, other plan)."""
    u = index.units[unit]
    keys = cache.read_samples(unit)["key_hash"]
    if not np.array_equal(keys, index.key_hash[u.start:u.start + u.count]):
        raise CacheMismatchError(
            f"cache {cache.path} unit {unit} ({u.name}) holds other samples than the data "
            "(key hashes differ); train with the data the cache was made from")
    done = rows["status"] != schema.PADDING
    expected = (view_keys(cache.plan_seed, epoch, u.start + np.arange(u.count))
                & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    if not np.array_equal(rows["seed"][done], expected[done]):
        raise CacheMismatchError(
            f"cache {cache.path} epoch {epoch} unit {unit} ({u.name}): stored view seeds differ "
            "from the view generator's; the cache was made by an incompatible kdcache or its "
            "rows were damaged; re-make it with `kdcache precompute`")
