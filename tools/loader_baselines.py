"""Per-core image loader rates of two third-party baselines, timm and FFCV, side by side.

    python tools/loader_baselines.py [--n 512] [--size 224] [--json]

Both read the same ImageNet-sized synthetic JPEGs (about 500x375, quality 90) and produce
``size`` x ``size`` random-resized-crop training batches on one core:

- timm: ``timm.data.create_loader(is_training=True, use_prefetcher=False, num_workers=0)`` over a
  map-style dataset decoding with PIL, ``torch.set_num_threads(1)``; its default train transform
  (RandomResizedCrop, flip, ColorJitter(0.4, 0.4, 0.4), ToTensor, Normalize: float32 out);
- FFCV: ``ffcv.loader.Loader(num_workers=1)`` over a .beton with the images stored as JPEG, the
  standard ImageNet train pipeline up to uint8 torch images on the CPU (no colour jitter, no
  normalisation unless asked: see ``ffcv_images_per_s``).

The work is therefore not identical: timm also jitters colours and normalises to float32.
``timm_images_per_s(color_jitter=None)`` and ``ffcv_images_per_s(normalize=True)`` narrow the gap.
ffcv is imported lazily: importing it sets torch's and numba's thread counts to 1 process-wide
(``ffcv_images_per_s`` restores them; ``write_beton`` and ``ffcv_loader`` do not).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import io
import json
import os
import tarfile
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

Sample = tuple[bytes, int]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# -- data -------------------------------------------------------------------------------------


def imagenet_like_jpeg(rng: np.random.Generator) -> bytes:
    """A smooth random scene the size of an average ImageNet image: height in [330, 420),
    width in [450, 550) (about 500x375), JPEG quality 90."""
    return scene_jpeg(rng, (330, 420), (450, 550))


def scene_jpeg(
    rng: np.random.Generator, heights: tuple[int, int], widths: tuple[int, int]
) -> bytes:
    """A smooth random scene (sinusoid gradients, gaussian blobs, noise) of a height and width
    drawn from ``heights`` and ``widths`` (half-open ranges), JPEG quality 90."""
    from PIL import Image

    h, w = int(rng.integers(*heights)), int(rng.integers(*widths))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy = rng.uniform(0.005, 0.03, 2)
        img[..., c] = 128 + 60 * np.sin(fx * x + rng.uniform(0, 6)) * np.cos(fy * y)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(20, 120)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-90, 90, 3)
    img += rng.normal(0, 8, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_jpeg_shards(
    out_dir: str, n: int, seed: int = 0, per_shard: int = 256, num_classes: int = 1000
) -> str:
    """Write ``n`` ImageNet-like JPEGs with random labels as WebDataset tar shards (kdcache's own
    writer: ``KEY.jpg`` + ``KEY.cls``); return the glob ``out_dir/train-*.tar``."""
    from kdcache.cli.shards import ShardWriter

    rng = np.random.default_rng(seed)
    writer = ShardWriter(out_dir, "train", per_shard)
    for i in range(n):
        writer.write(f"img{i:07d}", imagenet_like_jpeg(rng), "jpg", int(rng.integers(num_classes)))
    writer.close()
    return os.path.join(out_dir, "train-*.tar")


def read_jpegs(pattern: str) -> list[Sample]:
    """``(jpeg bytes, label)`` of every ``KEY.jpg`` / ``KEY.cls`` pair in the shards matching
    ``pattern``, in shard and member order."""
    samples: list[Sample] = []
    for path in sorted(glob.glob(pattern)):
        images: dict[str, bytes] = {}
        labels: dict[str, int] = {}
        order: list[str] = []
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition(".")
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                if ext == "jpg":
                    images[key] = data
                    order.append(key)
                elif ext == "cls":
                    labels[key] = int(data.decode())
        samples.extend((images[k], labels[k]) for k in order)
    return samples


def image_stats(samples: Sequence[Sample]) -> dict[str, float]:
    """Count, mean width / height / pixels and mean JPEG bytes of ``samples``."""
    from PIL import Image

    sizes = np.array([Image.open(io.BytesIO(b)).size for b, _ in samples], np.float64)
    return {
        "images": len(samples),
        "mean_width": round(float(sizes[:, 0].mean()), 1),
        "mean_height": round(float(sizes[:, 1].mean()), 1),
        "mean_pixels": round(float((sizes[:, 0] * sizes[:, 1]).mean()), 1),
        "mean_jpeg_bytes": round(float(np.mean([len(b) for b, _ in samples])), 1),
    }


# -- timm -------------------------------------------------------------------------------------


class _PilBytesDataset:
    """Map-style dataset of ``(jpeg bytes, label)`` that decodes with PIL the way timm's
    ``ImageDataset`` does; ``create_loader`` sets ``transform``."""

    def __init__(self, samples: Sequence[Sample]):
        self.samples = samples
        self.transform: Any = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image

        data, label = self.samples[i]
        img = Image.open(io.BytesIO(data)).convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, label


def timm_images_per_s(
    samples: list[Sample],
    size: int = 224,
    batch_size: int = 64,
    batches: int | None = None,
    *,
    color_jitter: float | None = 0.4,
) -> float:
    """Images/s of timm's own training loader on one core.

    ``create_loader(is_training=True, use_prefetcher=False, num_workers=0)`` with its default
    train transform: RandomResizedCropAndInterpolation(scale (0.08, 1), bilinear), horizontal
    flip 0.5, ColorJitter(``color_jitter`` x 3, no hue; None leaves it out), ToTensor, ImageNet
    Normalize; float32 NCHW batches, shuffled, drop_last. PIL decodes; torch runs one thread.
    One batch warms up (then a GC pass); the next ``batches`` (default: all the rest) are timed.
    """
    import torch
    from timm.data import create_loader

    if len(samples) < 2 * batch_size:
        raise ValueError(f"need at least {2 * batch_size} samples, got {len(samples)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loader = create_loader(
            _PilBytesDataset(samples),
            input_size=(3, size, size),
            batch_size=batch_size,
            is_training=True,
            use_prefetcher=False,
            num_workers=0,
            color_jitter=color_jitter,
            device=torch.device("cpu"),
        )
        it = iter(loader)
        next(it)  # warm-up
        gc.collect()  # as in ffcv_images_per_s: no collection of import garbage in the timing
        images = 0
        start = time.perf_counter()
        for done, (x, _) in enumerate(it, 1):
            images += x.shape[0]
            if batches is not None and done >= batches:
                break
        return images / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


# -- FFCV -------------------------------------------------------------------------------------


class _PilImageDataset:
    """Indexable ``(PIL RGB image, label)`` for FFCV's ``DatasetWriter.from_indexed_dataset``."""

    def __init__(self, samples: Sequence[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image

        data, label = self.samples[i]
        return Image.open(io.BytesIO(data)).convert("RGB"), label


def write_beton(samples: Sequence[Sample], path: str, jpeg_quality: int = 90) -> float:
    """Write ``samples`` to an FFCV .beton at ``path`` with one writer process; return seconds.

    ``RGBImageField(write_mode='jpg', max_resolution=None)``: the image keeps its size (None is
    the default: a number would shrink the longer side to it), but FFCV does not store the
    original bytes: it decodes them (PIL, here) and re-encodes with OpenCV at ``jpeg_quality``.
    The default write_mode, 'raw', would store uncompressed pixels instead.
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {
        "image": RGBImageField(write_mode="jpg", max_resolution=None, jpeg_quality=jpeg_quality),
        "label": IntField(),
    }
    writer = DatasetWriter(path, fields, num_workers=1)
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar
        writer.from_indexed_dataset(_PilImageDataset(samples))
    return time.perf_counter() - start


def ffcv_loader(path: str, size: int = 224, batch_size: int = 64, normalize: bool = False) -> Any:
    """FFCV's standard ImageNet train Loader on one worker, CPU only (see ffcv_images_per_s)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToTensor, ToTorchImage

    image: list[Any] = [RandomResizedCropRGBImageDecoder((size, size)), RandomHorizontalFlip()]
    if normalize:
        # ImageNet example's NormalizeImage (float16 out), here on the CPU: placed before
        # ToTensor, on the HWC numpy batch, where its numba path runs.
        mean, std = np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255
        image.append(NormalizeImage(mean, std, np.float16))
    image += [ToTensor(), ToTorchImage()]
    return Loader(
        path,
        batch_size=batch_size,
        num_workers=1,
        order=OrderOption.RANDOM,
        os_cache=True,
        drop_last=False,
        pipelines={"image": image, "label": [IntDecoder(), ToTensor()]},
    )


def ffcv_images_per_s(
    samples: list[Sample],
    work_dir: str,
    size: int = 224,
    batch_size: int = 64,
    *,
    normalize: bool = False,
    epochs: int = 1,
    timings: dict[str, float] | None = None,
) -> float:
    """Images/s of FFCV's own Loader on one core (``num_workers=1``, random order, os_cache).

    Writes ``work_dir/train.beton`` (``write_beton``: JPEG quality 90, original size), then
    loads with FFCV's standard ImageNet train pipeline up to uint8 torch images on the CPU:
    RandomResizedCropRGBImageDecoder((size, size)) (scale (0.08, 1), its own libjpeg-turbo
    decode and OpenCV resize), RandomHorizontalFlip, ToTensor, ToTorchImage (NCHW view of
    channels-last memory); labels IntDecoder + ToTensor. Left out: ToDevice (no GPU) and, unless
    ``normalize``, NormalizeImage (its CPU path works only on numpy batches, so it goes before
    ToTensor); FFCV's ImageNet example has no colour jitter (ffcv.transforms has
    RandomBrightness/Contrast/Saturation). One whole epoch warms up (numba compiles; then a GC
    pass), the next ``epochs`` are timed. ``timings``, when given, receives ``ffcv_write_s``, ``ffcv_epoch_s``
    (mean timed epoch), ``ffcv_stored_bytes_per_image`` (the re-encoded JPEGs) and
    ``ffcv_file_bytes_per_image`` (the whole file: FFCV pads the header to an 8 MiB page and
    allocates 8 MiB pages, so it dwarfs small sets).
    """
    import numba
    import torch

    # Importing ffcv sets torch's and numba's thread counts to 1, and each Loader to its
    # num_workers, process-wide: restored on the way out.
    threads = torch.get_num_threads(), numba.get_num_threads()
    from ffcv.reader import Reader

    path = os.path.join(work_dir, "train.beton")
    write_s = write_beton(samples, path)
    loader = ffcv_loader(path, size, batch_size, normalize)
    try:
        for _ in loader:  # warm-up epoch
            pass
        # numba's compile leaves ~40k objects: without this, the first timed epoch pays for a
        # full GC pass (~0.4 s, half of a 256-image epoch).
        gc.collect()
        images = 0
        start = time.perf_counter()
        for _ in range(epochs):
            for x, _ in loader:
                images += x.shape[0]
        epoch_s = (time.perf_counter() - start) / epochs
    finally:
        # Each Loader compiles fresh numba dispatchers; collected later, by a GC pass inside the
        # next Loader's compiling thread, their finalizer prints "Exception ignored ...
        # KeyError" (numba 0.68). Collecting them here, between loaders, avoids that.
        del loader
        gc.collect()
        torch.set_num_threads(threads[0])
        numba.set_num_threads(threads[1])
    if timings is not None:
        timings.update(
            ffcv_write_s=write_s,
            ffcv_epoch_s=epoch_s,
            ffcv_stored_bytes_per_image=float(Reader(path).alloc_table["size"].mean()),
            ffcv_file_bytes_per_image=os.path.getsize(path) / len(samples),
        )
    return images / (epoch_s * epochs)


# -- main -------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=512, help="images (default 512)")
    p.add_argument("--size", type=int, default=224, help="output side in px (default 224)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="loader_baselines_") as tmp:
        samples = read_jpegs(write_jpeg_shards(os.path.join(tmp, "shards"), args.n))
        timings: dict[str, float] = {}
        result: dict[str, Any] = {
            "timm": round(timm_images_per_s(samples, args.size, args.batch_size), 1),
            "ffcv": round(
                ffcv_images_per_s(samples, tmp, args.size, args.batch_size, timings=timings), 1
            ),
            "size": args.size,
            "batch_size": args.batch_size,
            **image_stats(samples),
            **{k: round(v, 3) for k, v in timings.items()},
        }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"images/s per core at {args.size} px: timm {result['timm']}, ffcv {result['ffcv']}")
        for k, v in result.items():
            if k not in ("timm", "ffcv"):
                print(f"  {k}: {v}")


if __name__ == "__main__":
    main()
