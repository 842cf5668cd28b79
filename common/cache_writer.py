"""Writing the teacher cache: :func:`create_cache` and :class:`CacheWriter`.

A writer is a :class:`~kdcache.store.Cache` opened for writing (``open_cache(path, "a")``, or
what :func:`create_cache` returns) that can also commit a unit (:meth:`CacheWriter.write_unit`:
its rows, then its manifest cell, then its done mark), rewrite a unit's per-sample rows and clear
a done mark (``kdcache verify --repair``), and allocate more epochs (:meth:`CacheWriter.extend`).
The order of each write is what makes a killed writer harmless: see ``docs/reliability.md``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr

from kdcache import faults, schema
from kdcache.errors import KdcacheError
from kdcache.store import Cache
from kdcache.zarr_compat import BloscCodec, Crc32cCodec
from kdcache.zarr_compat import sync as zarr_sync  # runs a coroutine on zarr's own I/O loop

log = logging.getLogger(__name__)

_CREATING = "kdcache_creating"


def _compressors(shuffle: str = "bitshuffle") -> list:
    # blosc-zstd with a shuffle filter packs rows 10-20 % tighter than plain zstd (measured on
    # ImageNet-shaped rows, docs/benchmarks.md); level 9 costs the background writer little.
    # crc32c on every chunk lets readers tell damage from data.
    return [BloscCodec(cname="zstd", clevel=9, shuffle=shuffle), Crc32cCodec()]


class CacheWriter(Cache):
    """An open cache that can also be written: commit units, repair them, add epochs."""

    _group_mode = "r+"

    def rewrite_samples(self, unit: int, values: Mapping[str, np.ndarray]) -> None:
        """Write a unit's per-sample rows again (``values``: every sample field, (count, ...))."""
        start = unit * self.slot
        for field in schema.SAMPLE_FIELDS:
            arr = self.array(field.name)
            full = np.full((self.slot, *arr.shape[1:]), field.fill, dtype=arr.dtype)
            full[: self.units[unit].count] = values[field.name]
            arr[start : start + self.slot] = full  # the unit's whole chunk

    def uncommit(self, epoch: int, unit: int) -> None:
        """Clear a unit's done mark, so the next precompute writes it again."""
        self.array(schema.DONE_ARRAY)[epoch, unit] = 0

    def write_unit(self, epoch: int, unit: int, rows: Mapping[str, np.ndarray]) -> None:
        """Write one (epoch, unit) and mark it done: :meth:`write_block` of that one epoch."""
        self.write_block(unit, {epoch: rows})

    def write_block(self, unit: int, epochs: Mapping[int, Mapping[str, np.ndarray]]) -> None:
        """Write a unit's block whole, then mark its epochs done.

        epochs: ``{epoch: rows}`` for epochs of one block (``rows``: every row field,
            (count, ...)). Its other allocated epochs must be done already: their committed rows
            are read back (and checked), so each array's file of the block is written once, in
            full, and a done epoch keeps its bytes. A damaged one raises CacheDamagedError.

        The row arrays are written concurrently, one file each (the block's chunk or shard), on
        zarr's I/O loop: on object storage a block costs about one request latency, not one per
        array. Then the manifest cells, then the done marks, each one file for the block.
        """
        if not epochs:
            return
        block = self.block_of(min(epochs))
        if not set(epochs) <= set(block):
            raise ValueError(f"epochs {sorted(epochs)} are not all in the block {block}")
        count = self.units[unit].count
        given = dict(epochs)
        for epoch in block:
            if epoch not in given:
                if not self.done_mask_of(unit, epoch):
                    raise ValueError(f"epoch {epoch} of unit {unit} is neither given nor done")
                given[epoch] = self.read_unit(epoch, unit)  # checked against its manifest cell
        selection = (
            slice(block.start, block.stop),
            slice(unit * self.slot, (unit + 1) * self.slot),
        )
        writes = []
        entries = np.array([[e, unit] for e in block], dtype=np.uint32)
        sums = []
        for field in self.row_fields:
            arr = self.array(field.name)
            full = np.full((len(block), self.slot, *arr.shape[2:]), field.fill, dtype=arr.dtype)
            for i, epoch in enumerate(block):
                data = np.asarray(given[epoch][field.name], dtype=arr.dtype)
                if data.shape[0] != count:
                    raise ValueError(f"{field.name}: {data.shape[0]} rows for a unit of {count}")
                full[i, :count] = data
            writes.append((arr.async_array, full))
            sums.append([schema.rows_checksum(full[i, :count]) for i in range(len(block))])
        entries = np.concatenate([entries, np.array(sums, dtype=np.uint32).T], axis=1)

        async def write(array: Any, values: np.ndarray) -> None:
            await array.setitem(selection, values)
            faults.point("write")

        async def write_all() -> None:
            await asyncio.gather(*(write(a, v) for a, v in writes))

        zarr_sync(write_all())
        if self.has_manifest:
            self.array(schema.MANIFEST_ARRAY)[block.start : block.stop, unit] = entries
        faults.point("commit")
        self.array(schema.DONE_ARRAY)[block.start : block.stop, unit] = 1
        faults.point("committed")

    def done_mask_of(self, unit: int, epoch: int) -> bool:
        """Whether (epoch, unit) is committed (one cell of the done array)."""
        return bool(self.array(schema.DONE_ARRAY)[epoch, unit])

    def extend(self, epochs: int) -> None:
        """Allocate ``epochs`` epochs in total (metadata only: no row is rewritten)."""
        if epochs <= self.epochs:
            return
        manifest = (schema.MANIFEST_ARRAY,) if self.has_manifest else ()
        for name in self.row_names + manifest:
            arr = self.array(name)
            arr.resize((epochs, *arr.shape[1:]))
            faults.point("extend")
        # The done array grows last: until it has, the cache reads as the old size, and the
        # next run's extend resizes again (a resize to the current shape is a no-op).
        done = self.array(schema.DONE_ARRAY)
        done.resize((epochs, done.shape[1]))
        log.info("extended %s to %d epochs", self.path, epochs)


def create_cache(
    path: str,
    meta: dict[str, Any],
    sample_rows: Mapping[str, np.ndarray],
    epochs: int,
    chunk_rows: int | None = None,
    epochs_per_block: int = 1,
) -> CacheWriter:
    """Create an empty cache group with every array allocated for ``epochs`` epochs.

    meta: the ``kdcache`` group attributes; ``meta["data"]["units"]`` (name, count, ...) fixes the
        layout, ``meta["topk"]`` and ``meta["num_classes"]`` the row widths.
    sample_rows: the per-sample fields (``key_hash``, ``label``) in global index order, (N,).
    epochs_per_block: B; each per-epoch array stores one shard per (block of B epochs, unit).
    """
    units = [schema.UnitRecord.from_attrs(u) for u in meta["data"]["units"]]
    max_count = max(u.count for u in units)
    chunk_rows = chunk_rows or schema.default_chunk_rows(max_count)
    slot = schema.slot_size(max_count, chunk_rows)
    b = int(epochs_per_block)
    if b < 1:
        raise ValueError(f"epochs_per_block must be at least 1, got {b}")
    # A cache of one epoch per block is laid out as version 2 always was, for any kdcache.
    version = schema.BLOCKS_VERSION if b > 1 else schema.BLOCKS_VERSION - 1
    if schema.has_avatars(meta.get("avatars")):
        version = schema.AVATARS_VERSION
    meta = {**meta, "slot": slot, "chunk_rows": chunk_rows, "schema_version": version}
    if b > 1:
        meta["epochs_per_block"] = b
    rows = slot * len(units)
    # The group is born with the creation marker (one write), so a creation killed at any point
    # is recognised as one and redone.
    creating = {_CREATING: True}
    try:
        group = zarr.open_group(path, mode="w-", zarr_format=3, attributes=creating)
    except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
        if not _half_created(path):
            raise KdcacheError(
                f"{path} already exists and is not a kdcache cache; choose another --out"
            ) from None
        # A creation that was killed: nothing in it can be done yet, start it over.
        log.warning("%s is a cache whose creation was interrupted; creating it again", path)
        group = zarr.open_group(path, mode="w", zarr_format=3, attributes=creating)
    except PermissionError as e:
        raise KdcacheError(f"cannot create the cache at {path}: {e.strerror}") from None
    faults.point("group")
    k, c = int(meta["topk"]), int(meta["num_classes"])
    row_fields = schema.row_fields(meta["views"], meta.get("avatars"))
    for field in row_fields:
        trail = schema.trailing_shape(field, k)
        group.create_array(
            field.name,
            shape=(epochs, rows, *trail),
            dtype=schema.field_dtype(field, c),
            chunks=(1, chunk_rows, *trail),
            # A unit's block that fits one chunk is one file without zarr's sharding codec,
            # which would only add an index and a second read; else a shard of chunks.
            shards=(b, slot, *trail) if slot > chunk_rows or b > 1 else None,
            compressors=_compressors(field.shuffle),
            fill_value=field.fill,
            dimension_names=("epoch", "row", *[f"d{i}" for i in range(len(trail))]),
        )
    sums = [[] for _ in units]
    for field in schema.SAMPLE_FIELDS:
        trail = schema.trailing_shape(field, k)
        arr = group.create_array(
            field.name,
            shape=(rows, *trail),
            dtype=field.dtype,
            chunks=(slot, *trail),
            compressors=_compressors(field.shuffle),
            fill_value=field.fill,
            dimension_names=("row", *[f"d{i}" for i in range(len(trail))]),
        )
        full = np.full((rows, *trail), field.fill, dtype=field.dtype)
        for u, unit in enumerate(units):
            rows_of = slice(u * slot, u * slot + unit.count)
            full[rows_of] = sample_rows[field.name][unit.start : unit.start + unit.count]
            sums[u].append(schema.rows_checksum(full[rows_of]))
        arr[:] = full
    meta["sample_checksums"] = sums  # per unit, per sample array (SAMPLE_FIELDS order)
    group.create_array(
        schema.MANIFEST_ARRAY,
        shape=(epochs, len(units), 2 + len(row_fields)),
        dtype="uint32",
        chunks=(1, 1, 2 + len(row_fields)),
        shards=(b, 1, 2 + len(row_fields)) if b > 1 else None,
        fill_value=schema.MANIFEST_FILL,
        compressors=_compressors(),
        dimension_names=("epoch", "unit", "entry"),
    )
    group.create_array(
        schema.DONE_ARRAY,
        shape=(epochs, len(units)),
        dtype="uint8",
        chunks=(1, 1),
        shards=(b, 1) if b > 1 else None,
        fill_value=0,
        compressors=[Crc32cCodec()],
        dimension_names=("epoch", "unit"),
    )
    faults.point("create")
    group.attrs.put({schema.FORMAT_NAME: meta})  # replaces the creation marker in one write
    log.info(
        "created cache %s: %d units x %d rows, %d epochs in blocks of %d",
        path,
        len(units),
        slot,
        epochs,
        b,
    )
    return CacheWriter(path)


def _half_created(path: str) -> bool:
    try:
        attrs = zarr.open_group(path, mode="r").attrs
    except Exception:  # not a group at all
        return False
    return bool(attrs.get(_CREATING)) and schema.FORMAT_NAME not in attrs
