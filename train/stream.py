"""The training data path, shared by every teacher mode: item ``b`` is batch ``b`` of an epoch.

A batch holds the student's rendered views and whatever its targets need: labels (``none``),
the teacher's input (``online``), or the cache rows of the views it replays (``cached``). In
``cached`` mode the views come *from* the cache (boxes, flips, partners, lam), so the student
sees exactly what the teacher saw. Rows that cannot be used (bad input in the cache, an image
that does not decode) are dropped from the batch and counted in ``skipped``.
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
from kdcache.render import render_views
from kdcache.replay import TARGET_FIELDS, cached_unit_views, fresh_unit_views
from kdcache.store import Cache
from kdcache.units import UnitReader, needed_images
from kdcache.views import Views, ViewSpec

log = logging.getLogger(__name__)

_UNITS_KEPT = 16  # view tables kept per worker; a shuffle window spans a few units


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
    teacher_image_size: int | None = None  # online: also render the teacher's input
    need_labels: bool = False  # hard-label training: rows without a label are unusable


class TrainBatches(Dataset):
    """Batch ``b`` -> dict:

    pixels: (B, 3, S, S) float32, normalised; label, partner_label: (B,) int64; lam: (B,)
    float32; skipped: int rows dropped; rows: (B,) int64 global indices;
    cached mode: topk_logits (B, K) float16, topk_index (B, K) int, lse (B,) float32;
    when a teacher size is set: teacher_pixels (B, 3, T, T) float32.
    """

    def __init__(self, stream: StreamSpec):
        self.s = stream
        self._reader: UnitReader | None = None
        self._units: OrderedDict[int, tuple[Views, np.ndarray, dict]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.s.batches)

    def __getitem__(self, b: int) -> dict:
        s = self.s
        if self._reader is None:  # created in the worker: it holds open files and images
            self._reader = UnitReader(s.index, capacity=8)
        rows = np.asarray(s.batches[b], dtype=np.int64)
        views, ok, targets = self._gather(rows)
        images, failed = self._reader.decode(needed_images(rows[ok], views.partner[ok]))
        if failed:
            ok &= ~np.isin(rows, list(failed)) & ~np.isin(views.partner, list(failed))
        rows, views = rows[ok], views.take(ok)
        partner = np.where(views.partner >= 0, views.partner, rows)
        item = {
            "rows": torch.from_numpy(rows),
            "pixels": render_views(views, rows, images, s.image_size),
            "label": torch.from_numpy(s.index.label[rows]),
            "partner_label": torch.from_numpy(s.index.label[partner]),
            "lam": torch.from_numpy(views.lam.astype(np.float32)),
            "skipped": int((~ok).sum()),
        }
        for name, values in targets.items():
            item[name] = torch.from_numpy(values[ok])
        if s.teacher_image_size:
            item["teacher_pixels"] = (item["pixels"] if s.teacher_image_size == s.image_size
                                      else render_views(views, rows, images, s.teacher_image_size))
        return item

    def _gather(self, rows: np.ndarray) -> tuple[Views, np.ndarray, dict[str, np.ndarray]]:
        """Views, usable mask and cached targets of ``rows``, gathered from their units."""
        units = np.array([self.s.index.unit_index_of(int(i)) for i in rows])
        local = rows - np.array([self.s.index.units[u].start for u in units], dtype=np.int64)
        parts = [self._unit(int(u)) for u in units]
        views = Views(**{f: np.stack([getattr(p[0], f)[j] for p, j in zip(parts, local)])
                         for f in schema.VIEW_FIELDS})
        ok = np.array([p[1][j] for p, j in zip(parts, local)], dtype=bool)
        if self.s.need_labels:
            ok &= self.s.index.label[rows] >= 0
            partner = views.partner
            ok &= (partner < 0) | (self.s.index.label[np.maximum(partner, 0)] >= 0)
        targets = {}
        if self.s.cache is not None:
            targets = {name: np.stack([p[2][name][j] for p, j in zip(parts, local)])
                       for name in TARGET_FIELDS}
        return views, ok, targets

    def _unit(self, unit: int) -> tuple[Views, np.ndarray, dict]:
        if unit not in self._units:
            s = self.s
            if s.cache is None:
                views, ok = fresh_unit_views(s.index, unit, s.spec, s.plan_seed, s.epoch)
                self._units[unit] = (views, ok, {})
            else:
                self._units[unit] = cached_unit_views(s.cache, s.index, unit, s.cache_epoch)
            while len(self._units) > _UNITS_KEPT:
                self._units.popitem(last=False)
        return self._units[unit]

