"""What kdcache uses from zarr beyond its documented API (:mod:`kdcache.zarr_compat`): each
part is checked here, so a zarr release that moves or changes one fails loudly here, not as a
slow path or a wrong read somewhere else."""

from __future__ import annotations

import asyncio
import importlib
import threading
import warnings

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore

from kdcache import zarr_compat
from kdcache.cache_writer import _compressors
from kdcache.chunks import ChunkFile
from kdcache.errors import KdcacheError


def test_the_installed_zarr_is_the_measured_series():
    assert zarr_compat._series(zarr.__version__) == zarr_compat.MEASURED == (3, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(zarr_compat)  # the import-time check neither raises nor warns


def test_sync_runs_a_coroutine_on_zarrs_own_loop_and_returns_its_value():
    async def where() -> tuple[str, int]:
        await asyncio.sleep(0)
        return threading.current_thread().name, 7

    thread, value = zarr_compat.sync(where())
    assert value == 7
    assert thread != threading.current_thread().name  # zarr's I/O thread, not ours

    async def fails() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        zarr_compat.sync(fails())


def test_async_arrays_read_and_write_a_selection_concurrently(tmp_path):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    arrays = [
        group.create_array(name, shape=(2, 8), chunks=(1, 4), dtype="u2", fill_value=0)
        for name in ("a", "b")
    ]
    handles = [a.async_array for a in arrays]
    assert [h.basename for h in handles] == ["a", "b"]
    selection = (1, slice(0, 4))

    async def write_all() -> None:
        await asyncio.gather(
            *(h.setitem(selection, np.arange(4) + i) for i, h in enumerate(handles))
        )

    async def read_all() -> list:
        return await asyncio.gather(*(h.getitem(selection) for h in handles))

    zarr_compat.sync(write_all())
    got = zarr_compat.sync(read_all())
    np.testing.assert_array_equal(got[0], [0, 1, 2, 3])
    np.testing.assert_array_equal(got[1], [1, 2, 3, 4])
    np.testing.assert_array_equal(arrays[1][1, :4], [1, 2, 3, 4])  # the sync API sees it


def test_the_metadata_the_chunk_reader_reads_is_there(tmp_path):
    root = str(tmp_path / "c.zarr")
    group = zarr.open_group(root, mode="w", zarr_format=3)
    array = group.create_array(
        "rows", shape=(3, 6), chunks=(1, 6), dtype="<f4", compressors=_compressors(), fill_value=0
    )
    meta = array.metadata
    assert meta.zarr_format == 3
    codecs = meta.codecs
    assert [type(c) for c in codecs] == [
        zarr_compat.BytesCodec,
        zarr_compat.BloscCodec,
        zarr_compat.Crc32cCodec,
    ]
    assert codecs[0].endian is None or codecs[0].endian.value == "little"
    assert meta.chunk_key_encoding.encode_chunk_key((2, 0)) == "c/2/0"
    # ...and ChunkFile, built on exactly these, still reads what zarr wrote.
    array[2] = np.arange(6, dtype="<f4")
    chunk = ChunkFile.of(root, array)
    assert chunk is not None
    np.testing.assert_array_equal(chunk.read((2, 0)), np.arange(6, dtype="<f4")[None])
    assert LocalStore(root).root.joinpath("rows", "c", "2", "0").is_file()


def test_a_zarr_without_a_needed_part_is_a_kdcache_error(monkeypatch):
    monkeypatch.delattr(zarr.AsyncArray, "getitem")
    with pytest.raises(KdcacheError, match=r"lacks AsyncArray\.getitem.*zarr>=3\.1,<3\.2"):
        zarr_compat.check()


def test_another_series_is_warned_about():
    with pytest.warns(UserWarning, match="measured with zarr 3.1; zarr 3.2.0"):
        zarr_compat.check("3.2.0")
