"""Everything kdcache uses from zarr-python beyond its documented API, in one ranks.

kdcache was measured with zarr 3.1 (pyproject caps it there). Outside the documented
``zarr.open_group`` / ``zarr.Array`` API it relies on:

- ``zarr.core.sync.sync``: runs a coroutine on zarr's own I/O loop, so that a unit's arrays
  are read or written concurrently in one round trip (:mod:`kdcache.store`);
- ``Array.async_array`` and ``AsyncArray.getitem`` / ``setitem`` (the coroutines ``sync``
  runs) and ``AsyncArray.basename``;
- the codec classes of ``zarr.codecs`` (``BloscCodec``, ``BytesCodec`` and its ``endian``,
  ``Crc32cCodec``, and ``ShardingCodec`` with its ``chunk_shape``, ``codecs``,
  ``index_codecs`` and ``index_location``) and, on an array, ``shards`` and on its
  ``metadata``, ``zarr_format``, ``codecs`` and ``chunk_key_encoding.encode_chunk_key``: the
  direct chunk readers (:mod:`kdcache.chunks`) read a file only when these say it is exactly the
  layout they decode.

Importing this module checks that they exist: a zarr without one raises a
:class:`~kdcache.errors.KdcacheError` naming it; another series than 3.1 that has them all
gets a warning. ``tests/test_zarr_compat.py`` checks each one, so a zarr upgrade that changes
them fails there first.
"""

from __future__ import annotations

import re
import warnings

import zarr

from kdcache.errors import KdcacheError

MEASURED = (3, 1)  # the zarr series kdcache was measured with


def _series(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _missing(what: str, error: Exception | None = None) -> KdcacheError:
    why = f" ({type(error).__name__}: {error})" if error else ""
    return KdcacheError(
        f"zarr {zarr.__version__} lacks {what}{why}, which kdcache needs; kdcache was "
        f"measured with zarr {MEASURED[0]}.{MEASURED[1]}: pip install "
        f"'zarr>={MEASURED[0]}.{MEASURED[1]},<{MEASURED[0]}.{MEASURED[1] + 1}'"
    )


try:
    from zarr.core.sync import sync
except ImportError as e:
    raise _missing("zarr.core.sync.sync", e) from None
try:
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
except ImportError as e:
    raise _missing(
        "the codecs zarr.codecs.BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec", e
    ) from None


def check(version: str = zarr.__version__) -> None:
    """Raise a :class:`KdcacheError` when zarr lacks an attribute kdcache uses; warn when
    ``version`` is not of the series kdcache was measured with."""
    for owner, name in (
        (zarr.Array, "async_array"),
        (zarr.AsyncArray, "getitem"),
        (zarr.AsyncArray, "setitem"),
        (zarr.AsyncArray, "basename"),
    ):
        if not hasattr(owner, name):
            raise _missing(f"{owner.__name__}.{name}")
    if _series(version) != MEASURED:
        warnings.warn(
            f"kdcache was measured with zarr {MEASURED[0]}.{MEASURED[1]}; zarr {version} has "
            "the parts it uses but is untested",
            stacklevel=2,
        )


check()

__all__ = [
    "MEASURED",
    "BloscCodec",
    "BytesCodec",
    "Crc32cCodec",
    "ShardingCodec",
    "check",
    "sync",
]
