"""Where shards live: local paths, or any fsspec URL (``s3://``, ``gs://``, ``file://``, ...).

One small interface, chosen by the URL's prefix; fsspec is imported only for URLs, so local
work needs nothing beyond the standard library. Remote protocols need their fsspec backend
installed (``s3fs`` for ``s3://``, ``gcsfs`` for ``gs://``); credentials and endpoints come from
the backend's usual environment variables (for S3: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import glob
import os
import re
from typing import IO, Any

import braceexpand

from kdcache.errors import KdcacheError


def is_url(path: str) -> bool:
    return "://" in str(path)


def _fs(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:
        raise KdcacheError(f"{url} is a URL: install fsspec (and its backend, e.g. s3fs)") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise KdcacheError(f"cannot open {url}: {e}") from None


def _url(fs: Any, path: str) -> str:
    return fs.unstrip_protocol(path)


def open_binary(path: str) -> IO[bytes]:
    """A readable binary file object for a local path or a URL."""
    if not is_url(path):
        return open(path, "rb")
    fs, p = _fs(path)
    return fs.open(p, "rb")


def stamp(path: str) -> tuple[int, str]:
    """(size in bytes, a change marker: mtime or ETag) without reading the file."""
    if not is_url(path):
        st = os.stat(path)
        return st.st_size, str(st.st_mtime_ns)
    fs, p = _fs(path)
    info = fs.info(p)
    marker = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
    return int(info.get("size") or 0), str(marker)


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, p = _fs(path)
    return fs.exists(p)


def isdir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    fs, p = _fs(path)
    return fs.isdir(p)


_SPLIT_SHARD = re.compile(r"^(.+)-\d+\.tar$")  # PREFIX-DIGITS.tar, as `kdcache shards` writes


def _one_split(directory: str, found: list[str]) -> None:
    """Refuse a directory holding shards of several splits (train-*.tar beside val-*.tar)."""
    prefixes = sorted({m.group(1) for f in found if (m := _SPLIT_SHARD.match(basename(f)))})
    if len(prefixes) > 1:
        base = directory.rstrip("/")
        globs = [f"'{base}/{p}-*.tar'" for p in prefixes]
        raise KdcacheError(
            f"{directory} holds shards of {len(prefixes)} splits ({', '.join(prefixes)}); "
            f"name one: {', '.join(globs[:-1])} or {globs[-1]}"
        )


def expand(part: str) -> list[str]:
    """One DATA part (directory, brace pattern, glob or file) -> shard paths or URLs, in order."""
    if isdir(part):
        if is_url(part):
            fs, p = _fs(part)
            found = sorted(_url(fs, f) for f in fs.glob(p.rstrip("/") + "/*.tar"))
        else:
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
        if not found:
            raise KdcacheError(f"{part} holds no .tar shards; make some with `kdcache shards`")
        _one_split(part, found)
        return found
    urls = []
    for path in braceexpand.braceexpand(part):
        if any(c in path for c in "*?["):
            if is_url(path):
                fs, p = _fs(path)
                found = sorted(_url(fs, f) for f in fs.glob(p))
            else:
                found = sorted(glob.glob(path))
            if not found:
                raise KdcacheError(f"no shard matches {path}")
            urls += found
        elif not exists(path):
            raise KdcacheError(f"no such shard or directory: {path}")
        else:
            urls.append(path)
    return urls


def absolute(path: str) -> str:
    return path if is_url(path) else os.path.abspath(path)


def basename(path: str) -> str:
    return os.path.basename(path.rstrip("/"))


def dirname(path: str) -> str:
    return path.rsplit("/", 1)[0] if is_url(path) else os.path.dirname(os.path.abspath(path))
