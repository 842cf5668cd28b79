"""Whole-chunk reads straight from a local cache: the training loader's hot path.

zarr-python 3 routes every read through its event loop and thread pool, which costs about a
millisecond per call however small the chunk (docs/benchmarks.md); reading and decompressing a
unit's chunk takes a tenth of that. A cached unit is one chunk per array (:mod:`kdcache.schema`),
and kdcache writes every chunk with one codec chain, ``bytes`` (little endian) → ``blosc`` →
``crc32c``. For an array that is exactly that, :class:`ChunkFile` reads the chunk's file, checks
its checksum and decompresses it with numcodecs, following the Zarr v3 spec for those three
codecs. Anything else (a URL, a sharded array, other codecs, another key encoding) gets no
ChunkFile, and the caller reads through zarr, which is always correct.
"""

from __future__ import annotations

import os

import google_crc32c
import numpy as np
import zarr
from numcodecs import blosc

from kdcache.zarr_compat import BloscCodec, BytesCodec, Crc32cCodec


class ChunkFile:
    """Reads whole chunks of one local, unsharded ``bytes → blosc → crc32c`` array."""

    def __init__(self, root: str, array: zarr.Array):
        meta = array.metadata
        self._dir = os.path.join(root, *array.path.split("/"))
        self._key = meta.chunk_key_encoding.encode_chunk_key
        self.shape = tuple(array.chunks)
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.fill = array.fill_value

    @classmethod
    def of(cls, root: str, array: zarr.Array) -> ChunkFile | None:
        """A reader for ``array`` (in the local group at ``root``), or None if it is not one
        this module can read exactly: then use zarr."""
        if "://" in root or getattr(array.metadata, "zarr_format", None) != 3:
            return None
        codecs = array.metadata.codecs
        plain = (
            len(codecs) == 3
            and isinstance(codecs[0], BytesCodec)
            and (codecs[0].endian is None or codecs[0].endian.value == "little")
            and isinstance(codecs[1], BloscCodec)
            and isinstance(codecs[2], Crc32cCodec)
        )
        return cls(root, array) if plain else None

    def read(self, coords: tuple[int, ...]) -> np.ndarray:
        """The chunk at grid position ``coords``, shape ``self.shape``; fill values when it was
        never written (as zarr reads it). Raises ValueError on a checksum mismatch and
        RuntimeError when blosc cannot decompress it."""
        path = os.path.join(self._dir, *self._key(coords).split("/"))
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return np.full(self.shape, self.fill, dtype=self.dtype)
        body, stored = np.frombuffer(data, np.uint8)[:-4], data[-4:]  # views, no copies
        if len(data) < 4 or google_crc32c.value(body).to_bytes(4, "little") != stored:
            raise ValueError(f"chunk {path}: stored and computed crc32c do not match")
        out = np.empty(self.shape, dtype=self.dtype)
        nbytes = int.from_bytes(data[4:8], "little")  # blosc's header: the decompressed size
        if nbytes != out.nbytes:
            raise ValueError(f"chunk {path}: holds {nbytes} bytes, expected {out.nbytes}")
        blosc.decompress(body, out)
        return out
