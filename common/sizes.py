"""What a cache's rows cost on disk, split into payload and per-file overhead.

Every (epoch, unit) of every row array is one chunk, alone in its file or with the other epochs
of its block in a Zarr shard (:mod:`kdcache.schema`), and a chunk costs more than its rows: blosc's 16-byte header, crc32c's 4 bytes, zstd's frame (~25 B), the
padding rows of the unit's slot (a multiple of 64 rows; 1-byte arrays under 128 bytes are
stored raw), and above all the poor compression of few rows. Measured with units of 8-256
rows, of the test teacher (K = C = 10, ~29 B/row of payload) and ImageNet-shaped (K = 10,
C = 1000, ~41 B/row): 0.78-0.9 KB per unit, the 11 arrays together. On disk every file also
fills whole blocks (4 KiB here); each array's ``zarr.json`` (~0.8 KB) is once per cache.

Method, cheap on any cache: files are only stat'ed (apparent size ``st_size``, allocated
``st_blocks * 512``), and up to :data:`SAMPLE_ROWS` rows of at most :data:`SAMPLE_UNITS`
committed units are read per array. Those rows, compressed together as one chunk with the
array's own codecs, less blosc's header and the checksum, give the *payload* rate ``p`` per
row: what a row costs in the largest one-chunk unit. *Overhead* is the rest of the unit files'
bytes, a fixed cost ``F`` per (epoch, unit) chunk (a shard's index of 16 B per chunk included):
a unit of ``n`` rows costs ``F + p n`` per array and epoch, and the overhead share is ``F / (F +
p n)``. Epoch blocks do not change that share in file sizes; on disk, where every file fills
whole blocks, a file of B epochs rounds up once for B chunks. ``F`` is measured at the cache's own shard size and grows
slowly with it (0.8 KB at 256 rows, 1.3 KB at 1000 on ImageNet-shaped rows; on the test's rows
a cache made at the recommended size came out at 9-12 %): round the recommendations up.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.storage import MemoryStore

from kdcache.errors import KdcacheError

if TYPE_CHECKING:
    from kdcache.store import Cache

SAMPLE_ROWS = 8192  # rows read per array for the payload rate: the largest one-chunk unit
SAMPLE_UNITS = 256  # from at most this many committed units
TARGET = 0.10  # the overhead share the recommendations aim under
_FIXED_CODEC_BYTES = 20  # blosc's header (16) and crc32c (4): the only exact per-file bytes


def _files(root: str) -> np.ndarray:
    """(unit files, their apparent and allocated bytes, zarr.json's apparent and allocated)."""
    out = np.zeros(5, dtype=np.int64)
    for d, _, names in os.walk(root):
        for name in names:
            st = os.stat(os.path.join(d, name))
            meta = name == "zarr.json"
            out[[0, 1 + 2 * meta, 2 + 2 * meta]] += (not meta, st.st_size, st.st_blocks * 512)
    return out


def _encoded_bytes(array: zarr.Array, values: np.ndarray) -> int:
    """Bytes of ``values`` stored as one chunk with ``array``'s codecs."""
    store: dict[str, Any] = {}
    codecs = {k: getattr(array, k) for k in ("serializer", "filters", "compressors", "fill_value")}
    codecs["config"] = {"write_empty_chunks": True}  # a sample of fill values only too
    out = zarr.create_array(
        MemoryStore(store), shape=values.shape, chunks=values.shape, dtype=values.dtype, **codecs
    )
    out[...] = values
    return sum(len(v) for k, v in store.items() if not k.endswith("zarr.json"))


def _payload_rate(cache: Cache, name: str, sample: np.ndarray) -> float | None:
    """Bytes per row of the sampled units' rows of ``name`` compressed together."""
    parts = []
    for epoch, unit in sample:
        try:
            parts.append(cache.read_unit(int(epoch), int(unit), (name,))[name])
        except KdcacheError:  # a damaged unit: verify's business, not inspect's
            continue
    if not parts:
        return None
    rows = np.concatenate(parts)
    return max(0, _encoded_bytes(cache.array(name), rows) - _FIXED_CODEC_BYTES) / len(rows)


def _shard_size(
    fixed: np.ndarray, rate: np.ndarray, block: int | None, epochs_per_file: int = 1
) -> int | None:
    """Smallest shard size from which on the per-unit overhead stays under :data:`TARGET`:
    of apparent bytes (``block`` None), or of allocated bytes in ``block``-byte blocks, each
    file holding ``epochs_per_file`` chunks."""
    p, f = float(rate.sum()), float(fixed.sum())
    if p <= 0:
        return None
    if block is None:
        return math.floor(f * (1 - TARGET) / TARGET / p) + 1
    b = epochs_per_file
    bound = math.ceil((f + len(fixed) * block / b) * (1 - TARGET) / TARGET / p) + 1
    if bound > 10**6:  # enough for sure (a file wastes under a block); too long to search
        return bound
    n = np.arange(1, bound + 1)[:, None]
    alloc = (np.ceil(b * (fixed + rate * n) / block) * block / b).sum(axis=1)
    over = np.flatnonzero(1 - p * n[:, 0] / alloc >= TARGET)
    return int(over[-1]) + 2 if len(over) else 1


def size_report(cache: Cache, done: np.ndarray | None = None) -> dict[str, Any] | None:
    """Sizes of the row arrays (None for a remote store, or before any row is written).

    Per written row, apparent (file sizes) and ``_on_disk`` (allocated blocks): ``bytes_per_row``
    counts every file of the row arrays, ``= payload_bytes_per_row`` (see above)
    ``+ overhead_bytes_per_row`` (the unit files' bytes beyond it) ``+ metadata_bytes_per_row``
    (the arrays' ``zarr.json``). ``overhead_fraction``: overhead / the unit files' bytes.
    ``unit_files``: files of the row arrays; ``overhead_bytes_per_unit``: ``F`` summed over the
    arrays (per unit and epoch). ``shard_size_for_10pct_overhead``: samples per shard that bring that share under 10 %.
    """
    if "://" in cache.path:
        return None
    done = cache.done_mask() if done is None else done
    counts = np.array([u.count for u in cache.units], dtype=np.int64)
    rows = int((done * counts[None, :]).sum())
    if not rows:
        return None
    committed = np.argwhere(done)
    take = min(SAMPLE_UNITS, max(1, SAMPLE_ROWS // int(counts.max())))
    sample = np.unique(committed[np.linspace(0, len(committed) - 1, take).astype(int)], axis=0)
    by_array, fixed, rate, total, payload = {}, [], [], np.zeros(5, dtype=np.int64), 0.0
    for field in cache.row_fields:
        sizes = _files(os.path.join(cache.path, field.name))
        total += sizes
        n, a, _, ma, _ = (int(x) for x in sizes)
        by_array[field.name] = round((a + ma) / rows, 2)
        p = _payload_rate(cache, field.name, sample) if n else None
        p = min(p, a / rows) if p is not None else a / rows  # overhead is never negative
        payload += p * rows
        if n:
            fixed.append((a - p * rows) / len(committed))  # per (epoch, unit) chunk
            rate.append(p)
    files, app, alloc, meta_app, meta_alloc = (int(x) for x in total)
    f, r = np.array(fixed), np.array(rate)
    block = os.statvfs(cache.path).f_bsize
    return {
        "bytes_per_row": round((app + meta_app) / rows, 2),
        "bytes_per_row_on_disk": round((alloc + meta_alloc) / rows, 2),
        "payload_bytes_per_row": round(payload / rows, 2),
        "overhead_bytes_per_row": round((app - payload) / rows, 2),
        "overhead_bytes_per_row_on_disk": round((alloc - payload) / rows, 2),
        "metadata_bytes_per_row": round(meta_app / rows, 2),
        "metadata_bytes_per_row_on_disk": round(meta_alloc / rows, 2),
        "overhead_fraction": round((app - payload) / max(app, 1), 4),
        "overhead_fraction_on_disk": round((alloc - payload) / max(alloc, 1), 4),
        "unit_files": files,
        "overhead_bytes_per_unit": round(float(f.sum()), 1),
        "shard_size_for_10pct_overhead": _shard_size(f, r, None),
        "shard_size_for_10pct_overhead_on_disk": _shard_size(
            f, r, block, min(cache.epochs_per_block, cache.epochs)
        ),
        "bytes_per_row_by_array": by_array,
    }
