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

from kdcache import pixels, schema
from kdcache.data.index import DatasetIndex
from kdcache.render import IMAGENET, PILLOW, InputConvention, Renderer, mix_8bit
from kdcache.replay import cached_unit_views, fresh_unit_views, sampled_unit_views
from kdcache.store import Cache
from kdcache.units import UnitReader, needed_images, row_status
from kdcache.views import Views, ViewSpec

log = logging.getLogger(__name__)

_UNITS_KEPT = 16  # view tables kept per worker; a shuffle window spans a few units


@dataclass
class EpochData:
    """What the batches of one epoch are made of."""

    index: DatasetIndex
    batches: list[np.ndarray]  # global sample indices per batch
    epoch: int  # the student's epoch (views of online/none modes)
    image_size: int
    spec: ViewSpec
    plan_seed: int
    cache: Cache | None = None  # cached mode: views and targets from here
    cache_epoch: int = 0
    reuse_epochs: tuple[int, ...] = ()  # --reuse sample: each sample replays one of these
    # --views-per-decode: each row's student epoch, per batch (None: every row is at ``epoch``),
    # and the cache epochs that student epoch e replays: cache_cycle[e % len] (--reuse cycle)
    row_epochs: list[np.ndarray] | None = None
    cache_cycle: tuple[int, ...] = ()
    teacher_image_size: int | None = None  # online: also render the teacher's input
    target_cache: Cache | None = None  # fixed mode: targets of each sample from its epoch 0
    teacher_stream: int | None = None  # independent mode: the teacher's own views
    student_input: InputConvention = IMAGENET  # each model's own normalisation
    teacher_input: InputConvention = IMAGENET
    strict: bool = False  # a shard cut short is an error, not a warning
    max_image_pixels: int | None = None  # larger images are unusable rows (None: Pillow's)
    renderer: Renderer = PILLOW  # decode and crop-resize (Pillow's, or FFCV's)


class TrainBatches(Dataset):
    """Batch ``b`` -> dict:

    pixels: the student's views as :func:`kdcache.pixels.ship` puts them ((B, S, S, 3) uint8
    and its mixing partners; :func:`kdcache.pixels.take` makes the normalised input on the
    device); label, partner_label: (B,) int64; lam: (B,) float32; skipped: int rows dropped;
    rows: (B,) int64 global indices; cached mode: topk_logits (B, K) float16, topk_index (B, K)
    int, lse (B,) float32; teacher_pixels: the teacher's own render, when its views, size or
    filter differ from the student's (else the teacher reads ``pixels``:
    :func:`kdcache.pixels.teacher_name`).
    """

    def __init__(self, epoch: EpochData):
        self.s = epoch
        self._reader: UnitReader | None = None
        self._units: OrderedDict[tuple[int, int], tuple] = OrderedDict()
        spread = 1
        if epoch.row_epochs:  # the epochs of a pass: a unit's view tables of each are kept
            every = np.concatenate(epoch.row_epochs)
            spread = int(every.max() - every.min()) + 1 if len(every) else 1
        self._kept = _UNITS_KEPT * spread

    def __len__(self) -> int:
        return len(self.s.batches)

    def __getitem__(self, b: int) -> dict:
        s = self.s
        if self._reader is None:  # created in the worker: it holds open files and images
            self._reader = UnitReader(
                s.index, 8, strict=s.strict, max_pixels=s.max_image_pixels, renderer=s.renderer
            )
        rows = np.asarray(s.batches[b], dtype=np.int64)
        views, ok, targets, teacher_views = self.gather(b)
        images, failed = self._reader.decode(needed_images(rows[ok], views.partner[ok]))
        student_filter = s.spec.resample("student", s.student_input.interpolation)
        teacher_filter = s.spec.resample("teacher", s.teacher_input.interpolation)
        ok = self.usable(rows, views, ok, failed)
        item = self.assemble(rows, views, ok, targets)
        rows, views = rows[ok], views.take(ok)
        pixels.ship(item, "pixels", views, rows, images, s.image_size, student_filter, s.renderer)
        teacher_size = s.teacher_image_size or s.image_size
        if teacher_views is not None:  # independent: the same samples, the teacher's own views
            pixels.ship(
                item, "teacher_pixels", teacher_views.take(ok), rows, images, teacher_size,
                teacher_filter, s.renderer,
            )  # fmt: skip
        elif s.teacher_image_size and (
            s.teacher_image_size != s.image_size or teacher_filter != student_filter
        ):
            pixels.ship(
                item, "teacher_pixels", views, rows, images, teacher_size, teacher_filter,
                s.renderer,
            )  # fmt: skip
        # else the teacher's input is the student's very render, normalised the teacher's way
        # (pixels.teacher_name)
        return item

    def gather(self, b: int) -> tuple[Views, np.ndarray, dict[str, np.ndarray], Views | None]:
        """Batch ``b``'s views, usable mask (before decoding), cached targets and teacher
        views, every row of the batch (:meth:`assemble` drops the unusable ones)."""
        s = self.s
        rows = np.asarray(s.batches[b], dtype=np.int64)
        epochs = (
            np.full(len(rows), s.epoch, dtype=np.int64)
            if s.row_epochs is None
            else np.asarray(s.row_epochs[b], dtype=np.int64)
        )
        return self._gather(rows, epochs)

    @staticmethod
    def usable(
        rows: np.ndarray, views: Views, ok: np.ndarray, failed: dict[int, int]
    ) -> np.ndarray:
        """``ok`` (:meth:`gather`'s) narrowed by the images that did not decode ({global index:
        status}), by precompute's rule (:func:`kdcache.units.row_status`)."""
        if failed:  # precompute's rule (row_status); without failures it changes nothing here
            return ok & (row_status(rows, views.partner, views.box, failed) == schema.OK)
        return ok

    def assemble(
        self,
        rows: np.ndarray,
        views: Views,
        ok: np.ndarray,
        targets: dict[str, np.ndarray],
        crops: torch.Tensor | None = None,
    ) -> dict:
        """A batch from its :meth:`gather` parts and its :meth:`usable` mask ``ok``: its usable
        rows, their labels, lam, cached targets and ``skipped``; with ``crops`` ((B, 2, S, S, 3)
        uint8, every row's own and partner crop, made by FFCV's loader:
        :mod:`kdcache.train.ffcv_loader`) also its pixels, mixed as :func:`pixels.ship` does."""
        s = self.s
        skipped = int((~ok).sum())
        rows, views = rows[ok], views.take(ok)
        partner = np.where(views.partner >= 0, views.partner, rows)
        item = {
            "rows": torch.from_numpy(rows),
            "label": torch.from_numpy(s.index.label[rows]),
            "partner_label": torch.from_numpy(s.index.label[partner]),
            "lam": torch.from_numpy(views.lam.astype(np.float32)),
            "skipped": skipped,
        }
        for name, values in targets.items():
            item[name] = torch.from_numpy(values[ok])
        if crops is not None:
            keep = torch.from_numpy(ok)
            own, other = crops[keep, 0].numpy(), crops[keep, 1].numpy()
            pixels.put(item, "pixels", mix_8bit(views, own, other))
        return item

    def _gather(
        self, rows: np.ndarray, epochs: np.ndarray
    ) -> tuple[Views, np.ndarray, dict[str, np.ndarray], Views | None]:
        """Views, usable mask, cached targets and teacher views of ``rows`` at their student
        ``epochs``, from their units' tables."""
        index = self.s.index
        units = index.units_of(rows)
        starts = np.array([u.start for u in index.units], dtype=np.int64)
        local = rows - starts[units]
        # One table per (unit, epoch) of the batch, each read once; rows picked by fancy index.
        groups, which = np.unique(np.stack([units, epochs], axis=1), axis=0, return_inverse=True)
        which = which.reshape(-1)
        parts = [self._unit(int(u), int(e)) for u, e in groups]
        at = [np.flatnonzero(which == g) for g in range(len(groups))]

        def pick(arrays: list[np.ndarray]) -> np.ndarray:
            out = np.empty((len(rows), *arrays[0].shape[1:]), dtype=arrays[0].dtype)
            for a, where in zip(arrays, at, strict=True):
                out[where] = a[local[where]]
            return out

        def gather(k: int) -> Views:
            first = parts[0][k]
            return Views(
                **{f: pick([getattr(p[k], f) for p in parts]) for f in schema.VIEW_FIELDS},
                ops={name: pick([p[k].ops[name] for p in parts]) for name in first.ops},
                spec=first.spec,
            )

        views = gather(0)
        ok = pick([np.asarray(p[1], dtype=bool) for p in parts])
        targets = {}
        if parts[0][2]:
            targets = {name: pick([p[2][name] for p in parts]) for name in parts[0][2]}
        teacher_views = None
        if self.s.teacher_stream is not None:
            teacher_views = gather(3)
        return views, ok, targets, teacher_views

    def _unit(self, unit: int, epoch: int) -> tuple[Views, np.ndarray, dict, Views | None]:
        """(student views, usable mask, cached targets, teacher's own views) of one unit at
        student epoch ``epoch``."""
        key = (unit, epoch)
        if key not in self._units:
            s = self.s
            if s.cache is not None and s.reuse_epochs:
                views, ok, targets = sampled_unit_views(
                    s.cache, s.index, unit, epoch, s.reuse_epochs
                )
            elif s.cache is not None:
                cache_epoch = s.cache_cycle[epoch % len(s.cache_cycle)] if s.cache_cycle else None
                cache_epoch = s.cache_epoch if cache_epoch is None else cache_epoch
                views, ok, targets = cached_unit_views(s.cache, s.index, unit, cache_epoch)
            else:
                views, ok = fresh_unit_views(s.index, unit, s.spec, s.plan_seed, epoch)
                targets = {}
            if s.target_cache is not None:
                _, cached_ok, targets = cached_unit_views(s.target_cache, s.index, unit, 0)
                ok = ok & cached_ok
            teacher_views = None
            if s.teacher_stream is not None:
                teacher_views, _ = fresh_unit_views(
                    s.index, unit, s.spec, s.plan_seed, epoch, s.teacher_stream
                )
            self._units[key] = (views, ok, targets, teacher_views)
            while len(self._units) > self._kept:
                self._units.popitem(last=False)
        else:
            self._units.move_to_end(key)
        return self._units[key]


class PackedBatches(Dataset):
    """:class:`TrainBatches` whose small tensors travel from the worker as one.

    Every tensor a DataLoader worker hands to the main process costs a shared-memory handoff
    (about 0.2-0.3 ms each on a 2-core machine, more than a batch's rows are worth), so the
    per-row fields (rows, labels, lam, cached targets) go packed in one byte tensor and the
    pixels as they are. :func:`unpack` restores the batch in the main process, as views.
    """

    def __init__(self, batches: TrainBatches):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> dict:
        return pack(self.batches[b])


_ALIGN = 8  # every field starts at a multiple of 8 bytes, so its view has an aligned dtype


def pack(item: dict) -> dict:
    """Every tensor of ``item`` whose name has no ``pixels`` -> one uint8 tensor ``packed`` and
    its ``layout`` [(name, dtype name, shape, start byte, bytes)]; one copy of each field."""
    raw = {k: _bytes(v) for k, v in item.items() if torch.is_tensor(v) and "pixels" not in k}
    layout, offset = [], 0
    for name, data in raw.items():
        dtype = str(item[name].dtype).removeprefix("torch.")
        layout.append((name, dtype, tuple(item[name].shape), offset, len(data)))
        offset += len(data) + (-len(data) % _ALIGN)
    packed = torch.zeros(offset, dtype=torch.uint8)
    for (_, _, _, start, size), data in zip(layout, raw.values(), strict=True):
        packed[start : start + size] = data
    out = {k: v for k, v in item.items() if k not in raw}
    out["packed"], out["layout"] = packed, layout
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 view (a copy only when it is not contiguous)."""
    if t.numel() == 0:  # an empty tensor from numpy has stride 0, which view() refuses
        return torch.empty(0, dtype=torch.uint8)
    return t.contiguous().reshape(-1).view(torch.uint8)


def unpack(item: dict) -> dict:
    """The batch :func:`pack` packed (``item`` is consumed): each field a view of ``packed``."""
    packed, layout = item.pop("packed"), item.pop("layout")
    for name, dtype, shape, start, size in layout:
        item[name] = packed[start : start + size].view(getattr(torch, dtype)).reshape(shape)
    return item
