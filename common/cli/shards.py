"""Writing WebDataset shards (``kdcache shards``) from an image folder or the digits data.

Shards are byte-reproducible: the same source and seed give the same tar bytes (fixed member
order, mtime, owner and mode), so their content hashes, and the fingerprint of every cache made
from them, survive a re-run. Samples are shuffled once, with a seed, before sharding, so a shard
is a random slice of the data (mixing partners are drawn inside a shard).
"""

from __future__ import annotations

import glob
import io
import logging
import os
import tarfile
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image

from kdcache.errors import KdcacheError

log = logging.getLogger(__name__)

DIGITS_SIZE = 32  # px; the 8x8 digits are upscaled so crops and resizes have pixels to work on
DIGITS_VAL_FRACTION = 0.2
PARTIAL = ".partial"  # suffix of shards being written (renamed to .tar once all are written)


class ShardWriter:
    """Writes ``{prefix}-{n:06d}.tar`` files (``suffix`` appended, e.g. ``.partial``) of at
    most ``shard_size`` samples each."""

    def __init__(self, out: str, prefix: str, shard_size: int, suffix: str = ""):
        if shard_size < 1:
            raise KdcacheError(f"--shard-size must be positive, got {shard_size}")
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise KdcacheError(f"cannot create {out}: {e.strerror}") from None
        self.out, self.prefix, self.shard_size, self.suffix = out, prefix, shard_size, suffix
        self.paths: list[str] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, image: bytes, ext: str, label: int | None) -> None:
        """One sample: ``KEY.EXT`` and, unless ``label`` is None (unlabelled), ``KEY.cls``."""
        if self._tar is None or self._count == self.shard_size:
            self.close()
            name = f"{self.prefix}-{len(self.paths):06d}.tar{self.suffix}"
            path = os.path.join(self.out, name)
            self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed in close())
            self.paths.append(path)
            self._count = 0
        self._add(f"{key}.{ext}", image)
        if label is not None:
            self._add(f"{key}.cls", str(int(label)).encode())
        self._count += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def digits_samples(split: str, seed: int = 0) -> Iterator[tuple[str, bytes, str, int]]:
    """scikit-learn's 1,797 handwritten digits (bundled, no download), 8x8 -> 32x32 grey PNG.

    The train/val split is a fixed seeded permutation (80 / 20); ``seed`` only shuffles the
    order inside the split.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise KdcacheError(
            "the digits source needs scikit-learn: pip install 'kdcache[demo]'"
        ) from None
    digits = load_digits()
    n = len(digits.target)
    perm = np.random.default_rng(20220611).permutation(n)  # the split never moves
    n_val = int(round(n * DIGITS_VAL_FRACTION))
    chosen = perm[:n_val] if split == "val" else perm[n_val:]
    chosen = np.random.default_rng(seed).permutation(chosen)
    for i in chosen:
        small = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
        big = np.asarray(
            Image.fromarray(small).resize((DIGITS_SIZE, DIGITS_SIZE), Image.Resampling.BILINEAR)
        )
        yield f"digits-{i:05d}", _png(big), "png", int(digits.target[i])


def _image_ext(name: str) -> str | None:
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if ext in ("jpg", "jpeg", "png", "webp", "ppm", "bmp"):
        return "jpg" if ext == "jpeg" else ext
    return None


def imagefolder_samples(
    root: str, split: str, seed: int = 0
) -> Iterator[tuple[str, bytes, str, int | None]]:
    """torchvision's ImageFolder layout ``root/CLASS/IMAGE`` (or ``root/SPLIT/CLASS/IMAGE``):
    classes are numbered in sorted order. A folder of images with no class folders
    (``root/IMAGE`` or ``root/SPLIT/IMAGE``) gives unlabelled samples (label None). Image bytes
    are stored as they are."""
    base = os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else root
    if not os.path.isdir(base):
        raise KdcacheError(f"no image folder at {root}")
    entries = sorted(os.listdir(base))
    classes = [d for d in entries if os.path.isdir(os.path.join(base, d))]
    top = [
        (os.path.join(base, f), ext)
        for f in entries
        if (ext := _image_ext(f)) and os.path.isfile(os.path.join(base, f))
    ]
    if classes and top:
        raise KdcacheError(
            f"{base} holds {len(top)} images beside {len(classes)} class folders; put every "
            f"image in a class folder ({base}/CLASS/IMAGE) for labelled shards, or only images "
            f"and no folders in {base} for unlabelled shards"
        )
    files: list[tuple[str, str, int | None]] = [(path, ext, None) for path, ext in top]
    for label, name in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(os.path.join(base, name))):
            for f in sorted(names):
                if ext := _image_ext(f):
                    files.append((os.path.join(dirpath, f), ext, label))
    if not files:
        raise KdcacheError(
            f"{base} holds no images (expected {base}/CLASS/IMAGE for labelled shards or "
            f"{base}/IMAGE for unlabelled ones)"
        )
    if classes:
        log.info("%s: %d images in %d class folders (labelled)", base, len(files), len(classes))
    else:
        log.info("%s: %d images and no class folders (unlabelled, no .cls)", base, len(files))
    for n, i in enumerate(np.random.default_rng(seed).permutation(len(files))):
        path, ext, label = files[i]
        with open(path, "rb") as f:
            yield f"{split}-{n:08d}", f.read(), ext, label


def write_shards(
    source: str,
    out: str,
    split: str = "train",
    shard_size: int = 1000,
    seed: int = 0,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Write SOURCE (``digits`` or ``imagefolder:PATH``) as shards ``OUT/SPLIT-NNNNNN.tar``.

    OUT may hold other splits, but shards of SPLIT already there are refused unless
    ``overwrite``, which replaces them as a whole: the new shards are written as ``*.partial``
    files first, and only when all are written are the old ones deleted and the new ones
    renamed into ranks, so no run (even a killed one) leaves old and new shards side by side.
    ``.partial`` files left by a killed run are removed by the next one.
    """
    if split not in ("train", "val"):
        raise KdcacheError(f"--split must be train or val, got {split!r}")
    if limit is not None and limit < 1:
        raise KdcacheError(f"--limit must be positive, got {limit}")
    if source == "digits":
        samples = digits_samples(split, seed)
    elif source.startswith("imagefolder:"):
        samples = imagefolder_samples(source.split(":", 1)[1], split, seed)
    else:
        raise KdcacheError(f"unknown source {source!r}; use digits or imagefolder:PATH")
    pattern = os.path.join(glob.escape(out), f"{split}-*.tar")
    old = sorted(glob.glob(pattern))
    if old and not overwrite:
        raise KdcacheError(
            f"{out} already holds {len(old)} {split} shards ({split}-*.tar); pass --overwrite "
            "to replace them, or write to another --out"
        )
    leftovers = glob.glob(pattern + PARTIAL)
    if leftovers:
        log.warning("removing %d %s left by an interrupted run", len(leftovers), pattern + PARTIAL)
        for path in leftovers:
            os.remove(path)
    writer = ShardWriter(out, split, shard_size, suffix=PARTIAL)
    count, labelled = 0, False
    try:
        for n, (key, data, ext, label) in enumerate(samples):
            if limit is not None and n >= limit:
                break
            writer.write(key, data, ext, label)
            count, labelled = count + 1, labelled or label is not None
            if progress:
                progress(1)
        writer.close()
    except BaseException:
        writer.close()
        for path in writer.paths:
            if os.path.exists(path):
                os.remove(path)
        raise
    # Every new shard is complete: drop the old split, then move the new one into ranks.
    for path in old:
        os.remove(path)
    paths = []
    for partial in writer.paths:
        path = partial[: -len(PARTIAL)]
        os.replace(partial, path)
        paths.append(path)
    log.info(
        "wrote %d %s images (%s) in %d shards to %s%s",
        count,
        split,
        "labelled" if labelled else "unlabelled, no .cls",
        len(paths),
        out,
        f", replacing {len(old)} old shards" if old else "",
    )
    return paths


def write_beton(
    source: str,
    out: str,
    split: str = "train",
    shard_size: int = 1000,
    seed: int = 0,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> str:
    """Write SOURCE as the FFCV file ``OUT/SPLIT.beton`` (:mod:`kdcache.data.beton`): the same
    samples, order, units and image bytes as the tar shards :func:`write_shards` writes from it.
    SOURCE may also be ``shards:DATA``, existing tar shards, taken as they are (their order and
    shards; ``--seed``, ``--limit`` and ``--shard-size`` do not apply)."""
    import shutil
    import tempfile

    from kdcache.data import beton

    path = os.path.join(out, f"{split}{beton.SUFFIX}")
    if os.path.exists(path) and not overwrite:
        raise KdcacheError(f"{path} exists; pass --overwrite to replace it, or another --out")
    os.makedirs(out, exist_ok=True)
    if source.startswith("shards:"):
        return beton.write(source.split(":", 1)[1], path)
    tmp = tempfile.mkdtemp(prefix=f".{split}-tar-", dir=out)
    try:
        write_shards(source, tmp, split, shard_size, seed, limit, progress)
        return beton.write(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
