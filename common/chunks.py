"""Whole-chunk reads straight from a local cache: the training loader's hot path.

zarr-python 3 routes every read through its event loop and thread pool, which costs about a
millisecond per call however small the chunk (docs/benchmarks.md); reading and decompressing a
unit's chunk takes a tenth of that. A cached unit's epoch is one chunk per array
(:mod:`kdcache.schema`), and kdcache writes every chunk with one codec chain, ``bytes`` (little
endian) → ``blosc`` → ``crc32c``. For an array that is exactly that, :class:`ChunkFile` reads the
chunk's file, checks its checksum and decompresses it with numcodecs, following the Zarr v3 spec
for those three codecs. In a cache of epoch blocks the chunks sit in Zarr shards (one file per
block of a unit, its index of (offset, length) pairs at the end, ``bytes`` → ``crc32c``):
:class:`ShardFile` reads the index, then the one chunk, the same way. Anything else (a URL,
other codecs, another key encoding or index layout) gets neither, and the caller reads through
zarr, which is always correct.
"""

from __future__ import annotations

import os

import google_crc32c
import numpy as np
import zarr
from numcodecs import blosc

from kdcache.zarr_compat import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec

_EMPTY = 2**64 - 1  # a shard index entry of a chunk never written (all fill values)


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
        plain = _plain(codecs)
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
        return _decode(data, path, self.shape, self.dtype)


def _little_bytes(codec: object) -> bool:
    return isinstance(codec, BytesCodec) and (
        codec.endian is None or codec.endian.value == "little"
    )


def _plain(codecs: tuple) -> bool:
    """Whether a codec chain is exactly ``bytes`` (little endian) → ``blosc`` → ``crc32c``."""
    return (
        len(codecs) == 3
        and _little_bytes(codecs[0])
        and isinstance(codecs[1], BloscCodec)
        and isinstance(codecs[2], Crc32cCodec)
    )


def _checked(data: bytes | memoryview, path: str) -> np.ndarray:
    """The body of ``data`` (its last 4 bytes are its crc32c), checked: a uint8 view."""
    body, stored = np.frombuffer(data, np.uint8)[:-4], bytes(data[-4:])  # a view, no copy
    if len(data) < 4 or google_crc32c.value(body).to_bytes(4, "little") != stored:
        raise ValueError(f"chunk {path}: stored and computed crc32c do not match")
    return body


def _decode(data: bytes | memoryview, path: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """One ``bytes → blosc → crc32c`` chunk's array."""
    body = _checked(data, path)
    out = np.empty(shape, dtype=dtype)
    nbytes = int.from_bytes(bytes(data[4:8]), "little")  # blosc's header: the decompressed size
    if nbytes != out.nbytes:
        raise ValueError(f"chunk {path}: holds {nbytes} bytes, expected {out.nbytes}")
    blosc.decompress(body, out)
    return out


class ShardFile:
    """Reads whole chunks of one local array whose files are Zarr shards of ``bytes → blosc →
    crc32c`` chunks, with the shard index (``bytes → crc32c``) at the end."""

    def __init__(self, root: str, array: zarr.Array, codec: ShardingCodec):
        meta = array.metadata
        self._dir = os.path.join(root, *array.path.split("/"))
        self._key = meta.chunk_key_encoding.encode_chunk_key
        self.shape = tuple(codec.chunk_shape)  # one chunk, what read() returns
        shard = tuple(array.shards)
        self._per_shard = tuple(s // c for s, c in zip(shard, self.shape, strict=True))
        self._index_bytes = 16 * int(np.prod(self._per_shard)) + 4
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.fill = array.fill_value

    @classmethod
    def of(cls, root: str, array: zarr.Array) -> ShardFile | None:
        """A reader for ``array`` (in the local group at ``root``), or None if it is not one
        this module can read exactly: then use zarr."""
        if "://" in root or getattr(array.metadata, "zarr_format", None) != 3:
            return None
        codecs = array.metadata.codecs
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return None
        codec = codecs[0]
        index = codec.index_codecs
        exact = (
            _plain(tuple(codec.codecs))
            and codec.index_location.value == "end"
            and len(index) == 2
            and _little_bytes(index[0])
            and isinstance(index[1], Crc32cCodec)
        )
        return cls(root, array, codec) if exact else None

    def read(self, coords: tuple[int, ...]) -> np.ndarray:
        """The chunk at grid position ``coords`` (chunks, not shards), shape ``self.shape``; fill
        values when it was never written. Raises ValueError on a checksum mismatch or an index
        that points outside its file, RuntimeError when blosc cannot decompress it."""
        shard = tuple(c // n for c, n in zip(coords, self._per_shard, strict=True))
        local = tuple(c % n for c, n in zip(coords, self._per_shard, strict=True))
        path = os.path.join(self._dir, *self._key(shard).split("/"))
        try:
            with open(path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                if size < self._index_bytes:
                    raise ValueError(f"shard {path}: {size} bytes, shorter than its index")
                f.seek(size - self._index_bytes)
                index = _checked(f.read(self._index_bytes), path).view("<u8")
                offset, length = index.reshape(*self._per_shard, 2)[local]
                if offset == _EMPTY and length == _EMPTY:
                    return np.full(self.shape, self.fill, dtype=self.dtype)
                if offset + length > size - self._index_bytes:
                    raise ValueError(f"shard {path}: its index points past its chunks")
                f.seek(int(offset))
                data = f.read(int(length))
        except FileNotFoundError:
            return np.full(self.shape, self.fill, dtype=self.dtype)
        return _decode(data, path, self.shape, self.dtype)


def chunk_reader(root: str, array: zarr.Array) -> ChunkFile | ShardFile | None:
    """The direct reader of ``array``'s chunks (a plain or a sharded array), or None: use zarr."""
    return ChunkFile.of(root, array) or ShardFile.of(root, array)
