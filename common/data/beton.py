"""FFCV ``.beton`` files as a source: the same samples as tar shards, read by index.

``kdcache shards --to ffcv`` writes one ``SPLIT.beton`` per split with five fields per sample:

- ``image``: the sample's encoded image bytes exactly as in its tar shard (FFCV's
  ``BytesField``: "raw bytes" mode). FFCV's own ``RGBImageField`` would re-encode every image
  with OpenCV (and downsize it past ``max_resolution``), so its pixels would not be the tar's;
  kept as they are, a ``.beton`` renders through Pillow to the very pixels of the tar shards.
- ``key``: the sample key, UTF-8 (its hash is the index's ``key_hash``, as for tar shards).
- ``label``: the class, -1 when the sample has none.
- ``unit``: which unit the sample belongs to. Units are fixed blocks of consecutive indices
  (the tar shards the file was made from, ``--shard-size`` samples each): mixing partners are
  drawn inside a unit and precompute's work is split by unit, as with shards.

kdcache names a unit of ``PATH.beton`` by the URL ``PATH.beton#U``: the dataset index, the
unit reader and the caches treat it as they treat a tar shard. A unit's content hash is the
blake2b of its samples' keys, labels and image bytes, so the fingerprint of a ``.beton`` is not
its tar shards' (that hashes the tar bytes): a cache made from the shards refuses the
``.beton`` of the same data, naming the fingerprints, and one made from the ``.beton`` replays
only from it.

Reading needs the ``ffcv`` extra (its file format reader; the images are read by memory map,
decoded by Pillow). FFCV reads local files only.
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import lru_cache
from typing import Any

import numpy as np

from kdcache.data import fs
from kdcache.data.webdataset import Sample
from kdcache.errors import KdcacheError

log = logging.getLogger(__name__)

FIELDS = ("image", "key", "label", "unit")
SUFFIX = ".beton"
_UNIT_MARK = "#"


def is_beton(spec: str) -> bool:
    """Whether DATA names a ``.beton`` file (or one of its units)."""
    return str(spec).split(_UNIT_MARK, 1)[0].endswith(SUFFIX)


def import_ffcv(module: str, needed_by: str) -> Any:
    """``import ffcv.MODULE``, keeping torch's intra-op thread count: importing ffcv sets it to 1
    for the whole process (its pipeline compiler's default), which would leave a CPU run's
    student on one thread. A missing extra is a :class:`KdcacheError` naming ``needed_by``."""
    import importlib

    import torch

    threads = torch.get_num_threads()
    try:
        return importlib.import_module(f"ffcv.{module}")
    except ImportError as e:
        raise KdcacheError(
            f"{needed_by} needs the ffcv extra (pip install 'kdcache[ffcv]', with OpenCV, "
            f"libjpeg-turbo and pkg-config installed): {e}"
        ) from None
    finally:
        torch.set_num_threads(threads)


def _reader(path: str) -> Any:
    return import_ffcv("reader", f"{path} is an FFCV file: reading it").Reader(path)


@lru_cache(maxsize=8)
def _table(path: str, stamp: tuple[int, str]) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """(metadata of every sample, unit starts (U + 1,), field name -> metadata column) of one
    ``.beton`` as it is at ``stamp``."""
    reader = _reader(path)
    missing = [f for f in FIELDS if f not in reader.field_names]
    if missing:
        raise KdcacheError(
            f"{path} has the fields {reader.field_names}, not kdcache's {list(FIELDS)} (missing "
            f"{missing}); write it with `kdcache shards --to ffcv`"
        )
    meta = np.asarray(reader.metadata)
    unit = np.asarray(meta[f"f{reader.field_names.index('unit')}"], dtype=np.int64)
    if len(unit) and (unit[0] != 0 or np.any(np.diff(unit) < 0) or np.any(np.diff(unit) > 1)):
        raise KdcacheError(f"{path}: its unit field is not 0, 1, 2, ... in index order")
    starts = np.flatnonzero(np.diff(unit, prepend=-1)) if len(unit) else np.zeros(0, np.int64)
    names = {name: f"f{i}" for i, name in enumerate(reader.field_names)}
    return meta, np.append(starts, len(unit)), names


def units(path: str) -> list[str]:
    """The unit URLs of a ``.beton``: ``PATH#0``, ``PATH#1``, ..."""
    path = fs.absolute(path.split(_UNIT_MARK, 1)[0])
    _, starts, _ = _open(path)
    return [f"{path}{_UNIT_MARK}{u}" for u in range(len(starts) - 1)]


def _open(path: str) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    if fs.is_url(path):
        raise KdcacheError(f"{path}: FFCV files are read from local disk only; copy it there")
    if not os.path.exists(path):
        raise KdcacheError(f"no FFCV file at {path}")
    return _table(path, fs.stamp(path))


def split_url(url: str) -> tuple[str, int]:
    """``PATH.beton#U`` -> (PATH.beton, U)."""
    path, _, unit = url.rpartition(_UNIT_MARK)
    return path, int(unit)


def stamp(url: str) -> tuple[int, str]:
    """The file's size and change marker (all units of a file share them)."""
    return fs.stamp(split_url(url)[0])


def read_unit(url: str) -> list[Sample]:
    """All samples of unit ``PATH.beton#U``, in index order (images as their stored bytes)."""
    path, u = split_url(url)
    meta, starts, names = _open(path)
    if not 0 <= u < len(starts) - 1:
        raise KdcacheError(f"{path} has {len(starts) - 1} units, not unit {u}")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = []
    for row in meta[starts[u] : starts[u + 1]]:
        image, key = row[names["image"]], row[names["key"]]
        raw = bytes(data[int(image["ptr"]) : int(image["ptr"]) + int(image["size"])])
        name = bytes(data[int(key["ptr"]) : int(key["ptr"]) + int(key["size"])]).decode()
        out.append(Sample(name, raw or None, int(row[names["label"]])))
    return out


def content_hash(samples: list[Sample]) -> str:
    """A unit's content hash: blake2b-128 of its samples' keys, labels and image bytes."""
    h = hashlib.blake2b(digest_size=16)
    for s in samples:
        data = s.data or b""
        h.update(f"{s.key}\0{s.label}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def write(data: str, out: str, workers: int = 1) -> str:
    """Tar shards DATA -> the ``.beton`` ``out``: every sample in index order, its tar shard
    its unit, its image bytes as they are. Written to ``out.partial`` and renamed when whole.
    """
    fields_module = import_ffcv("fields", "--to ffcv")
    BytesField, IntField = fields_module.BytesField, fields_module.IntField  # noqa: N806
    DatasetWriter = import_ffcv("writer", "--to ffcv").DatasetWriter  # noqa: N806
    from kdcache.data.index import load_index

    index = load_index(data)
    fields = {
        "image": BytesField(),
        "key": BytesField(),
        "label": IntField(),
        "unit": IntField(),
    }
    partial = out + ".partial"
    writer = DatasetWriter(partial, fields, num_workers=workers)
    writer.from_indexed_dataset(_TarSamples(index), chunksize=64)  # FFCV shows its own bar
    os.replace(partial, out)
    log.info("wrote %d samples in %d units to %s", index.num_samples, len(index.units), out)
    return out


class _TarSamples:
    """The samples of indexed tar shards by global index, for FFCV's writer (which reads them
    in order, a chunk at a time: one shard is kept)."""

    def __init__(self, index: Any):
        self.index = index
        self._unit, self._samples = -1, []

    def __len__(self) -> int:
        return self.index.num_samples

    def __getitem__(self, i: int) -> tuple:
        from kdcache.data.webdataset import read_unit as read_tar

        u = self.index.unit_index_of(i)
        if u != self._unit:
            self._unit, self._samples = u, read_tar(self.index.units[u].url)
        s = self._samples[i - self.index.units[u].start]
        image = np.frombuffer(s.data or b"", dtype=np.uint8)
        return image, np.frombuffer(s.key.encode(), dtype=np.uint8), s.label, u
