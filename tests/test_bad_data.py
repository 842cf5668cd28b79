"""Bad data read as if it were good: cut tars, repeated keys, 16-bit images, huge images."""

from __future__ import annotations

import gzip
import io
import logging
import os
import struct
import tarfile
import warnings
import zlib

import numpy as np
import pytest
from conftest import NUM_CLASSES, cache_config, png, synthetic_image
from PIL import Image

from kdcache import schema
from kdcache.cache import precompute
from kdcache.data import webdataset
from kdcache.data.index import build_index, image_size, load_index
from kdcache.data.webdataset import read_unit
from kdcache.errors import KdcacheError
from kdcache.render import decode_image
from kdcache.store import open_cache
from kdcache.units import UnitReader

pytestmark = pytest.mark.faults


def write_tar(path: str, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(n: int, seed: int = 0, prefix: str = "s") -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    members = []
    for i in range(n):
        members.append((f"{prefix}-{i:03d}.png", synthetic_image(rng, i % NUM_CLASSES, (20, 24))))
        members.append((f"{prefix}-{i:03d}.cls", str(i % NUM_CLASSES).encode()))
    return members


def member_end(path: str, member: int) -> int:
    """Byte offset just past member number ``member`` (its data padded to 512 bytes)."""
    with tarfile.open(path) as tar:
        info = tar.getmembers()[member]
    return info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def cut(path: str, at: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(at)


def shard_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# -- tars without their end-of-archive blocks -------------------------------------------------


@pytest.mark.parametrize("where", ["local", "file-url", "gzip"])
def test_a_tar_cut_at_a_member_boundary_is_indexed_with_a_warning(tmp_path, caplog, where):
    path = write_tar(str(tmp_path / "train-000000.tar"), sample_members(6))
    cut(path, member_end(path, 7))  # after sample 3's .cls: 4 of 6 samples, no end blocks
    if where == "gzip":
        with open(path, "rb") as f:
            raw = f.read()
        path = str(tmp_path / "train-000000.tar.gz")
        with open(path, "wb") as f:
            f.write(gzip.compress(raw))
    url = f"file://{path}" if where == "file-url" else path
    with caplog.at_level(logging.WARNING, logger="kdcache"):
        index = build_index([url])
    assert index.counts == [4]
    said = shard_warnings(caplog)
    assert len(said) == 1 and url in said[0] and "end-of-archive" in said[0]
    assert "4 samples" in said[0]
    with pytest.raises(KdcacheError, match="end-of-archive") as e:
        build_index([url], strict=True)
    assert url in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(KdcacheError, match="end-of-archive"):
        read_unit(url, strict=True)
    assert len(read_unit(url)) == 4


def test_reading_a_cut_tar_says_it_once_and_strict_readers_refuse_it(tmp_path, caplog, monkeypatch):
    path = write_tar(str(tmp_path / "train-000000.tar"), sample_members(3))
    cut(path, member_end(path, 5))  # all 3 samples, no end blocks
    with caplog.at_level(logging.WARNING, logger="kdcache"):
        index = build_index([path])
        assert index.counts == [3]
        UnitReader(index).samples(0)  # the index said it in this process: not again
        assert len(shard_warnings(caplog)) == 1
        monkeypatch.setattr(webdataset, "_WARNED", set())  # another process, a saved index
        UnitReader(index).samples(0)
        UnitReader(index).samples(0)
    said = shard_warnings(caplog)
    assert len(said) == 2 and all(path in s for s in said)
    with pytest.raises(KdcacheError, match=path):
        UnitReader(index, strict=True).samples(0)


def test_one_end_block_only_is_said(tmp_path, caplog):
    path = write_tar(str(tmp_path / "train-000000.tar"), sample_members(2))
    cut(path, member_end(path, 3) + tarfile.BLOCKSIZE)
    with caplog.at_level(logging.WARNING, logger="kdcache"):
        assert build_index([path]).counts == [2]
    said = shard_warnings(caplog)
    assert len(said) == 1 and "only one of tar's two end-of-archive blocks" in said[0]
    with pytest.raises(KdcacheError, match="end-of-archive"):
        build_index([path], strict=True)


def test_a_complete_tar_is_quiet_even_strict(tmp_path, caplog):
    path = write_tar(str(tmp_path / "train-000000.tar"), sample_members(3))
    cut(path, member_end(path, 5) + 2 * tarfile.BLOCKSIZE)  # both end blocks, no record padding
    full = write_tar(str(tmp_path / "other-000000.tar"), sample_members(3, prefix="o"))
    with caplog.at_level(logging.WARNING, logger="kdcache"):
        assert build_index([path, full], strict=True).counts == [3, 3]
        assert len(read_unit(full, strict=True)) == 3
    assert shard_warnings(caplog) == []


@pytest.mark.parametrize("garbage", [False, True], ids=["cut-header", "damaged-header"])
def test_a_cut_or_damaged_header_is_an_error(tmp_path, garbage):
    path = write_tar(str(tmp_path / "train-000000.tar"), sample_members(3))
    end = member_end(path, 3)
    if garbage:
        with open(path, "r+b") as f:
            f.seek(end + 20)
            f.write(b"\xff" * 40)  # sample 2's header: bad checksum
    else:
        cut(path, end + 300)  # inside sample 2's header
    with pytest.raises(KdcacheError, match=f"cannot read shard {path}") as e:
        build_index([path])
    assert "header" in str(e.value)
    with pytest.raises(KdcacheError, match="header"):
        read_unit(path)


def test_a_shard_with_another_count_than_indexed_is_refused(tmp_path):
    """A shard rewritten after indexing: another sample count is refused when the unit is read
    (the same count with other content changes its size or stamp, so the index is rebuilt and a
    cache's fingerprint no longer matches: see test_mismatch.py)."""
    path = write_tar(str(tmp_path / "train-000000.tar"), sample_members(6))
    index = build_index([path])
    write_tar(path, sample_members(5))
    with pytest.raises(KdcacheError) as e:
        UnitReader(index).samples(0)
    message = str(e.value)
    assert f"shard {path} now holds 5 samples but its index says 6" in message
    assert "kdcache index" in message and "\n" not in message and message.count(". ") == 0


# -- repeated keys inside one shard -----------------------------------------------------------


@pytest.mark.parametrize(
    "names",
    [
        ["a.png", "a.cls", "b.png", "b.cls", "a.png"],  # a member of an earlier sample again
        ["a.png", "a.cls", "b.png", "b.cls", "a.png", "a.cls"],  # a whole sample again
        ["b.png", "a.png", "a.cls", "a.png"],  # the same member twice in a row
        ["x/a.png", "x/a.cls", "x/a.PNG"],  # extensions compare without case
    ],
    ids=["member-later", "group-later", "member-twice", "case"],
)
def test_a_key_repeated_inside_a_shard_is_an_error(tmp_path, names):
    rng = np.random.default_rng(1)
    image = synthetic_image(rng, 1, (20, 20))
    members = [(n, b"1" if n.endswith(".cls") else image) for n in names]
    path = write_tar(str(tmp_path / "train-000000.tar"), members)
    key = "x/a" if names[0].startswith("x/") else "a"
    for read in (lambda: build_index([path]), lambda: read_unit(path)):
        with pytest.raises(KdcacheError, match="twice") as e:
            read()
        assert path in str(e.value) and repr(key) in str(e.value)


def test_distinct_keys_sharing_a_prefix_are_not_repeats(tmp_path):
    members = sample_members(2)
    members += [("s-000/x.png", members[0][1]), ("s-000/x.seg.png", members[0][1])]
    path = write_tar(str(tmp_path / "train-000000.tar"), members)
    assert [s.key for s in read_unit(path)] == ["s-000", "s-001", "s-000/x"]


# -- 16-bit images ----------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG (grey (H, W) or RGB (H, W, 3)) written by hand: Pillow cannot write RGB."""
    height, width = array.shape[:2]
    colour = 0 if array.ndim == 2 else 2
    rows = array.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def dark(shape: tuple[int, ...]) -> np.ndarray:
    """A dark 8-bit image (mean ~74), where clipping 16-bit values at 255 shows most."""
    rng = np.random.default_rng(3)
    return rng.integers(20, 130, size=shape).astype(np.uint8)


@pytest.mark.parametrize("kind", ["png-grey", "png-rgb", "pgm"])
def test_16_bit_images_are_scaled_not_clipped(kind):
    eight = dark((18, 22) if kind != "png-rgb" else (18, 22, 3))
    wide = eight.astype(np.uint16) * 257  # the same picture at 16 bits
    pgm = b"P5 22 18 65535\n" + wide.astype(">u2").tobytes()
    data = pgm if kind == "pgm" else png16(wide)
    got = np.asarray(decode_image(data)).astype(np.int64)
    want = np.asarray(decode_image(png(eight))).astype(np.int64)
    assert got.shape == want.shape == (18, 22, 3)
    assert abs(got.mean() - want.mean()) < 1
    assert (got == want).all()


def test_8_bit_images_decode_as_before():
    rgb = dark((10, 12, 3))
    assert (np.asarray(decode_image(png(rgb))) == rgb).all()
    grey = dark((10, 12))
    assert (np.asarray(decode_image(png(grey))) == grey[..., None]).all()


# -- images over Pillow's pixel limit ---------------------------------------------------------

LIMIT = 1000  # pixels; Pillow warns above it and refuses above twice it
LARGE = {2: (40, 40), 5: (50, 50)}  # 1600 pixels (Pillow warns), 2500 (Pillow refuses)


@pytest.fixture()
def small_pixel_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", LIMIT)


@pytest.fixture()
def large_data(tmp_path) -> str:
    rng = np.random.default_rng(7)
    members = []
    for n in range(8):
        size = LARGE.get(n, (20, 24))  # 480 pixels: under the limit
        members.append((f"t-{n}.png", synthetic_image(rng, n % NUM_CLASSES, size)))
        members.append((f"t-{n}.cls", str(n % NUM_CLASSES).encode()))
    os.makedirs(tmp_path / "data")
    write_tar(str(tmp_path / "data" / "train-000000.tar"), members)
    return str(tmp_path / "data")


def test_the_index_reads_the_true_size_of_a_too_large_image(small_pixel_limit):
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        for size in LARGE.values():
            assert image_size(synthetic_image(rng, 1, size)) == size
            assert Image.MAX_IMAGE_PIXELS == LIMIT  # restored
    assert image_size(b"not an image") == (0, 0)


def test_decoding_a_too_large_image_marks_it(small_pixel_limit, large_data):
    index = load_index(large_data)
    assert [tuple(index.size[n]) for n in LARGE] == list(LARGE.values())
    images, failed = UnitReader(index).decode(range(8))
    assert failed == {n: schema.TOO_LARGE for n in LARGE}
    assert sorted(images) == [n for n in range(8) if n not in LARGE]
    assert Image.MAX_IMAGE_PIXELS == LIMIT
    with pytest.warns(Image.DecompressionBombWarning):  # the filter was local to decode
        Image.open(io.BytesIO(synthetic_image(np.random.default_rng(0), 1, LARGE[2])))


def test_a_too_large_image_is_a_bad_row_of_its_own(small_pixel_limit, large_data, tmp_path):
    out = str(tmp_path / "c.zarr")
    summary = precompute(
        cache_config(large_data, out, epochs=1, num_classes=NUM_CLASSES, views="center")
    )
    assert summary["bad_rows"] == len(LARGE)
    assert summary["bad_rows_by_reason"] == {"too large": len(LARGE)}
    status = open_cache(out).read_unit(0, 0)["status"][:8]
    assert [int(s) for s in status] == [
        schema.TOO_LARGE if n in LARGE else schema.OK for n in range(8)
    ]
    assert schema.STATUS_NAMES[schema.TOO_LARGE] == "too large"
    assert schema.TOO_LARGE in schema.BAD_STATUSES


def test_strict_jobs_refuse_a_cut_shard_in_one_line(tmp_path):
    """--strict reaches the shard reader, in the index and in DataLoader workers alike."""
    from conftest import run_cli

    path = write_tar(str(tmp_path / "train-000000.tar"), sample_members(4))
    cut(path, member_end(path, 5))  # 3 of 4 samples, no end blocks
    argv = ("precompute", "--data", path, "--teacher", "kdcache:tiny_cnn", "--epochs", "1",
            "--num-classes", "4", "--teacher-image-size", "16", "--device", "cpu", "--strict")  # fmt: skip
    code, _, err = run_cli(*argv, "--out", tmp_path / "a.zarr", "--workers", "0")
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and path in lines[0], err  # while indexing
    assert run_cli("index", path)[0] == 0  # indexed with a warning: now the readers meet it
    for workers in ("0", "1"):
        code, _, err = run_cli(*argv, "--out", tmp_path / f"c{workers}.zarr", "--workers", workers)
        lines = [line for line in err.splitlines() if "error:" in line]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert path in lines[0] and "end-of-archive" in lines[0]


def test_max_image_pixels_marks_larger_images_too_large(large_data, tmp_path):
    """--max-image-pixels: our own limit, from the index's header sizes, either way of
    Pillow's (here far below it)."""
    from conftest import run_cli

    out = str(tmp_path / "c.zarr")
    code, stdout, err = run_cli("precompute", "--data", large_data, "--teacher",
                                "kdcache:tiny_cnn", "--out", out, "--epochs", "1",
                                "--num-classes", "4", "--teacher-image-size", "16", "--workers",
                                "1", "--device", "cpu", "--max-image-pixels", str(LIMIT),
                                "--json")  # fmt: skip
    assert code == 0, err
    status = open_cache(out).read_unit(0, 0)["status"]
    index = load_index(large_data)
    large = index.size[:, 0] * index.size[:, 1] > LIMIT
    assert large.any() and (status[large] == schema.TOO_LARGE).all()
    assert (status[~large] != schema.TOO_LARGE).all()
