"""WebDataset tar shards: naming the shards of a data set, reading one shard's samples.

A shard is a tar file whose members are grouped into samples by key, as webdataset does:
``dir/KEY.EXT`` members with the same ``dir/KEY`` form one sample. kdcache needs an image
(``jpg``, ``jpeg``, ``png``, ``webp``, ``ppm`` or ``bmp``) and a class label (``cls``, decimal
text). A shard is always read whole and in file order, so a sample's position inside its shard
is stable, and that is what the dataset index numbers.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from typing import IO

from kdcache.data import fs
from kdcache.errors import KdcacheError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext


@dataclass
class Sample:
    """One sample of a shard. ``data`` is the encoded image (None when the sample has none);
    ``label`` is -1 when the sample has no readable ``cls``."""

    key: str
    data: bytes | None
    label: int


def expand_data(spec: str) -> list[str]:
    """DATA -> shard paths or URLs, in order.

    DATA is a directory (its ``*.tar`` files, sorted), a brace pattern
    (``dir/train-{000000..000009}.tar``), a glob, a single tar, or a comma-separated list of
    these; each may be a local path or an fsspec URL (``s3://bucket/train-{0..9}.tar``).
    """
    urls: list[str] = []
    for part in (p.strip() for p in str(spec).split(",")):
        if part:
            urls += fs.expand(part)
    if not urls:
        raise KdcacheError(f"no shards in {spec!r}; give a directory, a brace pattern or a list")
    return urls


def _parse_label(raw: bytes | None) -> int:
    if raw is None:
        return -1
    try:
        return int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return -1


def read_unit(url: str) -> list[Sample]:
    """All samples of one shard (a path or URL), in file order."""
    try:
        with fs.open_binary(url) as f:
            return read_samples(f, url)
    except FileNotFoundError:
        raise KdcacheError(f"shard {url} is gone; re-index the data or restore it") from None


def read_samples(f: IO[bytes], url: str) -> list[Sample]:
    """Samples of the tar stream ``f`` in file order; a damaged tar raises naming ``url``."""
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                match = _KEY_EXT.match(member.name)
                if match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                handle = tar.extractfile(member)
                groups.setdefault(key, {})[ext] = handle.read() if handle else b""
    except (tarfile.TarError, EOFError, OSError) as e:
        raise KdcacheError(
            f"cannot read shard {url}: {e} (truncated or not a tar file?); "
            "re-create it or drop it from DATA"
        ) from None
    samples = []
    for key, parts in groups.items():
        image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
        samples.append(Sample(key, image, _parse_label(parts.get("cls"))))
    return samples
