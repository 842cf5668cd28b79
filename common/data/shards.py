"""Writing WebDataset shards (``kdcache shards``) from an image folder or the digits data.

Shards are byte-reproducible: the same source and seed give the same tar bytes (fixed member
order, mtime, owner and mode), so their content hashes, and the fingerprint of every cache made
from them, survive a re-run. Samples are shuffled once, with a seed, before sharding, so a shard
is a random slice of the data (mixing partners are drawn inside a shard).
"""

from __future__ import annotations

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


class ShardWriter:
    """Writes ``{prefix}-{n:06d}.tar`` files of at most ``shard_size`` samples each."""

    def __init__(self, out: str, prefix: str, shard_size: int):
        if shard_size < 1:
            raise KdcacheError(f"--shard-size must be positive, got {shard_size}")
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise KdcacheError(f"cannot create {out}: {e.strerror}") from None
        self.out, self.prefix, self.shard_size = out, prefix, shard_size
        self.paths: list[str] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, image: bytes, ext: str, label: int) -> None:
        if self._tar is None or self._count == self.shard_size:
            self.close()
            path = os.path.join(self.out, f"{self.prefix}-{len(self.paths):06d}.tar")
            self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed in close())
            self.paths.append(path)
            self._count = 0
        self._add(f"{key}.{ext}", image)
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


def imagefolder_samples(
    root: str, split: str, seed: int = 0
) -> Iterator[tuple[str, bytes, str, int]]:
    """torchvision's ImageFolder layout ``root/CLASS/IMAGE`` (or ``root/SPLIT/CLASS/IMAGE``);
    classes are numbered in sorted order; image bytes are stored as they are."""
    base = os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else root
    if not os.path.isdir(base):
        raise KdcacheError(f"no image folder at {root}")
    classes = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
    if not classes:
        raise KdcacheError(f"{base} has no class folders (expected {base}/CLASS/IMAGE)")
    files = []
    for label, name in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(os.path.join(base, name))):
            for f in sorted(names):
                ext = f.rsplit(".", 1)[-1].lower()
                if ext in ("jpg", "jpeg", "png", "webp", "ppm", "bmp"):
                    files.append((os.path.join(dirpath, f), "jpg" if ext == "jpeg" else ext, label))
    if not files:
        raise KdcacheError(f"{base} holds no images")
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
) -> list[str]:
    """Write SOURCE (``digits`` or ``imagefolder:PATH``) as shards ``OUT/SPLIT-NNNNNN.tar``."""
    if split not in ("train", "val"):
        raise KdcacheError(f"--split must be train or val, got {split!r}")
    if source == "digits":
        samples = digits_samples(split, seed)
    elif source.startswith("imagefolder:"):
        samples = imagefolder_samples(source.split(":", 1)[1], split, seed)
    else:
        raise KdcacheError(f"unknown source {source!r}; use digits or imagefolder:PATH")
    writer = ShardWriter(out, split, shard_size)
    try:
        for n, (key, data, ext, label) in enumerate(samples):
            if limit is not None and n >= limit:
                break
            writer.write(key, data, ext, label)
            if progress:
                progress(1)
    finally:
        writer.close()
    log.info("wrote %d shards to %s", len(writer.paths), out)
    return writer.paths
