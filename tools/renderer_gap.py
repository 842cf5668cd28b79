"""How far the two renderers are apart: Pillow's (pil-bilinear-v1) and FFCV's
(ffcv-turbojpeg-area-v1), on the same views of the same JPEG bytes.

    python tools/renderer_gap.py [--out DIR] [--json]      # ~5 min on 2 CPU cores

1. Pixels: 256 ImageNet-sized JPEGs (tools/loader_baselines.py), function-matching views at
   224 px: the 8-bit crops of both renderers, compared (mean and max |difference| in 8-bit
   levels, the share of equal bytes, PSNR).
2. A teacher: digits as JPEG (quality 90, 32 px) in shards, a kdcache:resnet_s teacher trained
   on hard labels through the Pillow renderer, a 2-epoch function-matching cache of each
   renderer, and ``kdcache verify --renderer`` of each through the other one (top-1 and top-k
   set agreement, the largest logit error), against verify through its own (1.0, and the
   float16 rounding).
The work directory resumes: the teacher and the caches are reused when there.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pixel_gap(work: str, n: int = 256, size: int = 224) -> dict:
    import loader_baselines as lb

    from kdcache.data.index import load_index
    from kdcache.render import _render_8bit, get_renderer
    from kdcache.units import UnitReader, needed_images
    from kdcache.views import Views, get_spec, sample_unit_views

    data = os.path.join(work, "imagenet-like")
    if not os.path.isdir(data):
        lb.write_jpeg_shards(data, n)
    index = load_index(data)
    spec = get_spec("function_matching")
    views = Views.concat(
        [
            sample_unit_views(spec, 0, 0, u.start, index.size[u.start : u.start + u.count])
            for u in index.units
        ]  # fmt: skip
    )
    rows = np.arange(index.num_samples)
    crops = {}
    for name in ("pillow", "ffcv"):
        r = get_renderer(name)
        images, failed = UnitReader(index, renderer=r).decode(needed_images(rows, views.partner))
        assert not failed, failed
        crops[name] = _render_8bit(views, rows, images, size, "bilinear", r)[0].astype(np.int64)
    d = np.abs(crops["pillow"] - crops["ffcv"])
    mse = float((d.astype(np.float64) ** 2).mean())
    return {
        "images": int(index.num_samples),
        "size": size,
        "mean_abs_levels": round(float(d.mean()), 3),
        "max_abs_levels": int(d.max()),
        "equal_bytes": round(float((d == 0).mean()), 4),
        "within_2_levels": round(float((d <= 2).mean()), 4),
        "psnr_db": round(10 * np.log10(255.0**2 / mse), 2) if mse else None,
    }


def digits_jpeg(root: str) -> None:
    """digits as JPEG files in CLASS folders (train/ and val/), as kdcache shards would take."""
    from PIL import Image

    from kdcache.cli.shards import digits_samples

    for split in ("train", "val"):
        for key, png, _, label in digits_samples(split):
            folder = os.path.join(root, split, str(label))
            os.makedirs(folder, exist_ok=True)
            with Image.open(io.BytesIO(png)) as im:
                im.convert("RGB").save(os.path.join(folder, f"{key}.jpg"), quality=90)


def teacher_gap(work: str, epochs: int = 30) -> dict:
    from kdcache.cache import precompute
    from kdcache.cache.verify import verify
    from kdcache.cli.shards import write_shards
    from kdcache.precompute_config import PrecomputeConfig
    from kdcache.train import TrainConfig, fit

    folder, shards = os.path.join(work, "digits-jpeg"), os.path.join(work, "shards")
    if not os.path.isdir(folder):
        digits_jpeg(folder)
    for split in ("train", "val"):
        if not os.path.exists(os.path.join(shards, f"{split}-000000.tar")):
            write_shards(f"imagefolder:{folder}", shards, split, 256)
    train, val = os.path.join(shards, "train-*.tar"), os.path.join(shards, "val-*.tar")
    teacher = os.path.join(work, "teacher")
    if not os.path.exists(os.path.join(teacher, "model.pt")):
        fit(TrainConfig(data=train, val=val, student="kdcache:resnet_s", out=teacher,
                        epochs=epochs, teacher_mode="none", image_size=32, batch_size=64,
                        workers=1, device="cpu", views="consistent"))  # fmt: skip
    weights = os.path.join(teacher, "model.pt")
    out: dict = {}
    with open(os.path.join(teacher, "metrics.jsonl")) as f:
        out["teacher_val_accuracy"] = json.loads(f.readlines()[-1])["val_accuracy"]
    for renderer in ("pillow", "ffcv"):
        cache = os.path.join(work, f"{renderer}.zarr")
        precompute(PrecomputeConfig(data=train, teacher="kdcache:resnet_s", out=cache, epochs=2,
                                    teacher_weights=weights, teacher_image_size=32,
                                    renderer=renderer, workers=1, device="cpu",
                                    epochs_per_block=2))  # fmt: skip
        for through in ("pillow", "ffcv"):
            r = verify(cache, train, "kdcache:resnet_s", weights, 2048, 0, "cpu", workers=1,
                       renderer=through)  # fmt: skip
            out[f"{renderer}_cache_through_{through}"] = {
                k: r[k]
                for k in (
                    "checked",
                    "top1_agreement",
                    "topk_set_agreement",
                    "max_abs_logit_error",
                )  # fmt: skip
            }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="work directory (resumes) [a temporary one]")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    work = args.out or tempfile.mkdtemp(prefix="kdcache-renderer-gap-")
    os.makedirs(work, exist_ok=True)
    result = {"pixels": pixel_gap(work), "teacher": teacher_gap(work)}
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
