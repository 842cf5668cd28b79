"""``kdcache shards``: labelled and unlabelled image folders, refusing to write into a split that
already has shards (``--overwrite`` replaces it whole), and DATA directories of one split only."""

from __future__ import annotations

import glob
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import png, run_cli

from kdcache.cli.shards import write_shards
from kdcache.data import fs
from kdcache.errors import KdcacheError


def photos(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` small PNGs of varied sizes directly in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = 12 + i % 5, 14 + i % 3
        (folder / f"img{i:03d}.png").write_bytes(
            png(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        )


def members(out: Path, split: str = "train") -> list[str]:
    names = []
    for path in sorted(glob.glob(str(out / f"{split}-*.tar"))):
        with tarfile.open(path) as tar:
            names += tar.getnames()
    return names


def tars(out: Path) -> list[str]:
    return sorted(n for n in os.listdir(out) if ".tar" in n)


def ok(*argv) -> tuple[str, str]:
    code, out, err = run_cli(*argv)
    assert code == 0, (argv, code, err[-2000:])
    return out, err


def refused(*argv) -> str:
    """Exit 2 and one ``kdcache CMD: error:`` line on stderr, no traceback; returns the line."""
    code, _, err = run_cli(*argv)
    assert code == 2, (argv, code, err)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


def digits(out: Path, *extra, split: str = "train", limit: int = 30, size: int = 10):
    return run_cli(
        "shards", "--from", "digits", "--out", out, "--split", split,
        "--limit", limit, "--shard-size", size, *extra,
    )  # fmt: skip


# -- image folders --------------------------------------------------------------------------


def test_flat_folder_writes_unlabelled_shards(tmp_path):
    photos(tmp_path / "photos", 5)
    out = tmp_path / "data"
    stdout, err = ok(
        "shards", "--from", f"imagefolder:{tmp_path / 'photos'}", "--out", out,
        "--shard-size", 2, "--json",
    )  # fmt: skip
    assert len(json.loads(stdout.splitlines()[-1])["shards"]) == 3
    assert tars(out) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    names = members(out)
    assert len(names) == 5 and all(n.endswith(".png") for n in names), names
    assert "unlabelled" in err  # the log says what was written
    index = json.loads(ok("index", out, "--json")[0].splitlines()[-1])
    assert index["samples"] == 5 and index["unlabelled"] == 5 and index["unreadable"] == 0
    # Byte-reproducible, unlabelled too.
    again = tmp_path / "again"
    write_shards(f"imagefolder:{tmp_path / 'photos'}", str(again), shard_size=2)
    for name in tars(out):
        if name.endswith(".tar"):
            assert (out / name).read_bytes() == (again / name).read_bytes(), name


def test_flat_split_folder_and_class_folders(tmp_path):
    photos(tmp_path / "flat" / "val", 3)  # PATH/SPLIT/IMAGE: unlabelled
    paths = write_shards(f"imagefolder:{tmp_path / 'flat'}", str(tmp_path / "a"), "val")
    assert [os.path.basename(p) for p in paths] == ["val-000000.tar"]
    assert not [n for n in members(tmp_path / "a", "val") if n.endswith(".cls")]
    photos(tmp_path / "classes" / "cat", 2, seed=1)  # PATH/CLASS/IMAGE: labelled, sorted
    photos(tmp_path / "classes" / "dog", 3, seed=2)
    write_shards(f"imagefolder:{tmp_path / 'classes'}", str(tmp_path / "b"))
    labels = []
    with tarfile.open(tmp_path / "b" / "train-000000.tar") as tar:
        for m in tar.getmembers():
            if m.name.endswith(".cls"):
                labels.append(int(tar.extractfile(m).read()))
    assert sorted(labels) == [0, 0, 1, 1, 1]


def test_folder_with_images_and_class_folders_is_refused(tmp_path):
    photos(tmp_path / "mixed", 2)
    photos(tmp_path / "mixed" / "cat", 2)
    line = refused("shards", "--from", f"imagefolder:{tmp_path / 'mixed'}", "--out", tmp_path / "d")
    assert line.startswith("kdcache shards: error: "), line
    assert "class folder" in line and "unlabelled" in line and "labelled" in line, line
    assert not glob.glob(str(tmp_path / "d" / "*.tar*"))


# -- existing shards, --overwrite ----------------------------------------------------------


def test_second_write_into_a_split_is_refused(tmp_path):
    out = tmp_path / "data"
    assert digits(out)[0] == 0
    before = {n: (out / n).read_bytes() for n in tars(out)}
    assert len(before) == 3
    line = refused("shards", "--from", "digits", "--out", out, "--limit", 5)
    assert str(out) in line and "3 train shards" in line and "--overwrite" in line, line
    assert {n: (out / n).read_bytes() for n in tars(out)} == before


def test_overwrite_replaces_the_whole_split(tmp_path):
    out = tmp_path / "data"
    assert digits(out)[0] == 0
    assert tars(out) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    ok("index", out)  # a saved index of the old shards
    (out / "train-000007.tar.partial").write_bytes(b"left by a killed run")
    code, _, err = digits(out, "--overwrite", limit=20, size=100)
    assert code == 0, err
    assert tars(out) == ["train-000000.tar"]  # no stale old shard, no .partial
    index = json.loads(ok("index", out, "--json")[0].splitlines()[-1])
    assert index["samples"] == 20 and index["shards"] == 1


def test_failed_overwrite_keeps_the_old_split(tmp_path):
    out = tmp_path / "data"
    assert digits(out)[0] == 0
    before = {n: (out / n).read_bytes() for n in tars(out)}
    seen = []

    def stop(n: int) -> None:
        seen.append(n)
        if len(seen) == 15:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shards("digits", str(out), limit=30, shard_size=5, progress=stop, overwrite=True)
    assert {n: (out / n).read_bytes() for n in tars(out)} == before  # no .partial either


def test_another_split_beside_is_allowed(tmp_path):
    out = tmp_path / "data"
    assert digits(out)[0] == 0
    code, _, err = digits(out, split="val", limit=10)
    assert code == 0, err
    assert tars(out) == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"
    ]  # fmt: skip


# -- DATA: one split per directory ---------------------------------------------------------


def test_directory_of_two_splits_is_refused(tmp_path):
    out = tmp_path / "data"
    assert digits(out)[0] == 0
    assert digits(out, split="val", limit=10)[0] == 0
    line = refused("index", out)
    train, val = f"'{out}/train-*.tar'", f"'{out}/val-*.tar'"
    assert "2 splits (train, val)" in line and train in line and val in line, line
    index = json.loads(ok("index", f"{out}/train-*.tar", "--json")[0].splitlines()[-1])
    assert index["samples"] == 30 and index["shards"] == 3
    with pytest.raises(KdcacheError, match="name one"):
        fs.expand(str(out) + "/")


def test_tars_not_named_like_a_split_are_ignored(tmp_path):
    out = tmp_path / "data"
    assert digits(out)[0] == 0
    (out / "notes.tar").write_bytes(b"")
    (out / "train-extra.tar").write_bytes(b"")
    assert len(fs.expand(str(out))) == 5


def test_help_names_overwrite(capsys):
    from kdcache.cli import main

    with pytest.raises(SystemExit) as e:
        main(["shards", "--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and "--overwrite" in text and "unlabelled" in text
