"""The dataset index: stable global sample indices ``0..N-1`` grouped into units (tar shards).

``kdcache index DATA`` reads every shard once and records, per unit, its sample count and a
content hash of its bytes, and per sample the key's hash, the label and the image's size (the
views need the size before anything is decoded). The fingerprint covers unit base names, counts
and content hashes, not paths, so a copy of the shards elsewhere has the same fingerprint.

The index is saved next to the shards (``_kdcache_index-<hash>.npz``) when that directory is
writable, else in the user cache directory. Every cache holds the index of the data it was made
from too (its unit table, with each shard's URL and stamp, and the per-sample arrays), so a
machine that has the cache but no saved index of read-only shards (an ``s3://`` bucket, say) takes
the cache's instead of reading every shard. Any index is used only while each shard's URL, size
and stamp (modification time or ETag) are what they were when it was built.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import IO

import numpy as np
from PIL import Image

from kdcache.data import beton, fs
from kdcache.data.webdataset import expand_data, read_samples
from kdcache.errors import KdcacheError

log = logging.getLogger(__name__)

INDEX_VERSION = 2


def key_hash(key: str) -> int:
    """blake2b-64 of a sample key, as an unsigned int (stable across runs and machines)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


_PIXEL_LIMIT = threading.Lock()  # image_size lifts Pillow's limit only for one header


def image_size(data: bytes | None) -> tuple[int, int]:
    """(height, width) from the image header; (0, 0) when there is no readable image.

    An image over Pillow's pixel limit (``Image.MAX_IMAGE_PIXELS``) has its true size too: its
    header is read again with the limit lifted (and restored at once); decoding it is what
    marks it bad (status ``too large``).
    """
    if not data:
        return 0, 0
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as im:
                    width, height = im.size
        except Image.DecompressionBombError:
            with _PIXEL_LIMIT:
                limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        width, height = im.size
                finally:
                    Image.MAX_IMAGE_PIXELS = limit
        return height, width
    except (OSError, ValueError, SyntaxError):
        return 0, 0


@dataclass
class Unit:
    """One shard: where it is, its first global index, sample count and content hash."""

    name: str
    url: str
    start: int
    count: int
    content_hash: str
    bytes: int
    stamp: str  # mtime or ETag when indexed: a changed stamp means re-index


class DatasetIndex:
    """Per-sample arrays in global order plus the unit table.

    key_hash: (N,) uint64; label: (N,) int64, -1 when missing; size: (N, 2) int64 (height,
    width), (0, 0) when the image is unreadable.
    """

    def __init__(
        self, units: list[Unit], key_hash: np.ndarray, label: np.ndarray, size: np.ndarray
    ):
        self.units = units
        self.key_hash = np.asarray(key_hash, dtype=np.uint64)
        self.label = np.asarray(label, dtype=np.int64)
        self.size = np.asarray(size, dtype=np.int64).reshape(-1, 2)
        self._starts = np.array([u.start for u in units], dtype=np.int64)

    @property
    def num_samples(self) -> int:
        return len(self.key_hash)

    @property
    def counts(self) -> list[int]:
        return [u.count for u in self.units]

    @property
    def num_classes(self) -> int:
        """Largest label + 1 (0 when no sample has a label)."""
        return int(self.label.max()) + 1 if self.num_samples and self.label.max() >= 0 else 0

    @property
    def short_sides(self) -> np.ndarray:
        """(M,) int64 short side of each readable image (for image-size defaults and checks)."""
        readable = (self.size > 0).all(axis=1)
        return self.size[readable].min(axis=1)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for u in self.units:
            h.update(f"{fs.basename(u.url)}\0{u.count}\0{u.content_hash}\n".encode())
        return h.hexdigest()[:32]

    def unit_index_of(self, i: int) -> int:
        """The unit holding global sample ``i``."""
        return int(self.units_of(np.array([i]))[0])

    def units_of(self, rows: np.ndarray) -> np.ndarray:
        """The units holding global samples ``rows``: (N,) int -> (N,) int64."""
        return np.searchsorted(self._starts, rows, side="right") - 1

    def describe(self) -> dict:
        """Unit table for cache attributes and ``--json`` output. ``url`` and ``stamp`` say where
        each shard was and in what state; the fingerprint does not depend on them."""
        return {
            "fingerprint": self.fingerprint,
            "num_samples": self.num_samples,
            "units": [
                {
                    "name": u.name,
                    "count": u.count,
                    "content_hash": u.content_hash,
                    "start": u.start,
                    "bytes": u.bytes,
                    "url": u.url,
                    "stamp": u.stamp,
                }
                for u in self.units
            ],
        }

    # -- persistence ------------------------------------------------------------------------

    def save(self, path: str) -> None:
        meta = {"version": INDEX_VERSION, "units": [asdict(u) for u in self.units]}
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(
                f,
                meta=np.array(json.dumps(meta)),
                key_hash=self.key_hash,
                label=self.label,
                size=self.size,
            )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> DatasetIndex:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("version") != INDEX_VERSION:
                raise ValueError(f"index version {meta.get('version')}")
            return cls([Unit(**u) for u in meta["units"]], z["key_hash"], z["label"], z["size"])


class _HashingReader:
    """A file object that hashes what is read through it (one pass for samples and hash)."""

    def __init__(self, f: IO[bytes]):
        self.f = f
        self.hash = hashlib.blake2b(digest_size=16)

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.hash.update(data)
        return data

    def hexdigest(self) -> str:
        while self.read(1 << 20):  # the tar's end padding counts too
            pass
        return self.hash.hexdigest()


def _index_path_candidates(urls: list[str]) -> list[str]:
    """Next to local shards, then the user cache directory (for URLs and read-only dirs)."""
    where = hashlib.sha256("\n".join(fs.absolute(u) for u in urls).encode()).hexdigest()
    cache_home = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    user = os.path.join(cache_home, "kdcache", "index", f"{where[:24]}.npz")
    if fs.is_url(urls[0]):
        return [user]
    names = hashlib.sha256("\n".join(fs.basename(u) for u in urls).encode()).hexdigest()
    here = os.path.join(fs.dirname(urls[0]), f"_kdcache_index-{names[:12]}.npz")
    return [here, user]


def build_index(
    urls: list[str], progress: Callable[[int], None] | None = None, strict: bool = False
) -> DatasetIndex:
    """Read every shard once. progress: called with each finished shard's sample count.

    A shard without its tar end blocks is indexed with the samples it holds and said in a
    warning naming it, or refused when ``strict``; a key repeated inside a shard is an error.
    """
    units, keys, labels, sizes = [], [], [], []
    seen: dict[int, str] = {}
    start = 0
    for url in urls:
        size, marker = _stamp(url)
        if beton.is_beton(url):
            samples = beton.read_unit(url)
            content_hash = beton.content_hash(samples)
        else:
            with fs.open_binary(url) as f:
                reader = _HashingReader(f)
                samples = read_samples(reader, url, strict=strict)
                content_hash = reader.hexdigest()
        name = fs.basename(url)
        units.append(Unit(name, fs.absolute(url), start, len(samples), content_hash, size, marker))
        for s in samples:
            h = key_hash(s.key)
            if h in seen:
                log.warning(
                    "sample key %r appears in %s and %s; keys should be unique",
                    s.key,
                    seen[h],
                    name,
                )
            seen[h] = name
            keys.append(h)
            labels.append(s.label)
            sizes.append(image_size(s.data))
        start += len(samples)
        if progress:
            progress(len(samples))
    return DatasetIndex(
        units,
        np.array(keys, dtype=np.uint64),
        np.array(labels, dtype=np.int64),
        np.array(sizes, dtype=np.int64).reshape(-1, 2),
    )


def _stamp(url: str) -> tuple[int, str]:
    """A unit's (size, change marker): its tar's, or its FFCV file's."""
    return beton.stamp(url) if beton.is_beton(url) else fs.stamp(url)


def _fresh(index: DatasetIndex, urls: list[str]) -> bool:
    if [u.url for u in index.units] != [fs.absolute(u) for u in urls]:
        return False
    for u in index.units:
        try:
            size, marker = _stamp(u.url)
        except (OSError, KdcacheError):
            return False
        if size != u.bytes or marker != u.stamp:
            return False
    return True


def load_index(
    data: str,
    rebuild: bool = False,
    progress: Callable[[int], None] | None = None,
    known: Callable[[], DatasetIndex | None] | None = None,
    strict: bool = False,
) -> DatasetIndex:
    """The index of DATA: a saved one when still fresh, else ``known()`` (a cache's copy) when
    fresh, else built now by reading every shard; the last two are then saved. ``strict``: a
    shard without its end-of-archive blocks is an error, not a warning."""
    urls = expand_data(data)
    candidates = _index_path_candidates(urls)
    index = None
    if not rebuild:
        for path in candidates:
            if os.path.exists(path):
                try:
                    saved = DatasetIndex.load(path)
                except (OSError, ValueError, KeyError) as e:
                    log.warning("ignoring unreadable index %s: %s", path, e)
                    continue
                if _fresh(saved, urls):
                    return saved
                log.info("index %s is stale (shards changed); re-indexing", path)
        offered = known() if known else None
        if offered is not None and _fresh(offered, urls):
            log.info("using the index stored in the cache for %s", data)
            index = offered
    if index is None:
        log.info("indexing %d shards of %s", len(urls), data)
        index = build_index(urls, progress, strict=strict)
    for path in candidates:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            index.save(path)
            log.info("saved index to %s", path)
            break
        except OSError as e:
            log.debug("cannot save index to %s: %s", path, e)
    else:
        log.warning("could not save the index of %s anywhere; it will be rebuilt next time", data)
    if index.num_samples == 0:
        raise KdcacheError(f"{data} holds no samples")
    return index
