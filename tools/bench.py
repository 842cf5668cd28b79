"""kdcache's speed and size benchmark: ratios measured side by side in one run.

    python tools/bench.py [--device cpu|cuda] [--json]          # ~20 min on 2 CPU cores

It writes synthetic ImageNet-like JPEG shards (about 400x350 px, 1000 classes), then runs each
stage in its own process (so its peak host memory is its own), the timed ones in interleaved
rounds keeping each figure's best round, and reports:

- train_cached_vs_hard_ratio: images/s of cached-teacher training / hard-label training, same
  student and loader (goal >= 0.95); with loader_cached_vs_hard_ratio (the loader alone) and
  step_cached_vs_hard_ratio (whole training steps), hard-label and cached batches alternating
  in one process, which the machine's drift cannot tilt;
- train_cached_vs_online_speedup and theoretical_speedup = (teacher forward + student step) /
  student step, timed on pre-rendered batches (goal: speedup >= 0.9 x theoretical);
- precompute_vs_teacher_only_ratio: precompute images/s / the teacher's forward-only images/s
  on pre-rendered batches (goal >= 0.9 on GPU), with the JPEG decode-only rate next to it;
- bytes_per_row: on disk, K=10, C=1000, every per-epoch field, logits shaped like a trained
  classifier's (goal <= 44 B, TinyViT's row);
- target_rows_per_s: cache rows read from disk and turned into sparse targets on one core
  (goal >= 1,000,000);
- view ops: render time per image of the default preset and with randaugment(2, 9), with
  erase(p=0.25) and with both (arms alternating batch by batch), and bytes per row of that
  full pipeline beside function matching's;
- epoch blocks: precompute images/s of 16 epochs of a 768-image set with 1, 4 and 16 epochs
  per block (precompute_cheap_bB_vs_b1_ratio with a cheap teacher, so the decoding a block
  saves shows; precompute_bB_vs_b1_ratio with the bench's teacher on 256 of the images); the
  files and bytes per row of the B = 1 and B = 16 caches;
- views per decode: cached training images/s at --views-per-decode 1, 2, 4 over hard-label
  training of the same student on that set (train_cached_vV_vs_hard_ratio, and
  train_cheap_... with kdcache:tiny_cnn as the student; goal above 1.0);
- methods: the student step of each logit loss (on a cached-style top-10 target) over KL's,
  and of each feature method (FitNets, AT, RKD, PKT, online avatar KD, an InDistill stage on a
  pruned layer: teacher forward included) over online KL's (methods_vs_kl_step_ratio);
- loaders (``--only loaders`` runs just this, in minutes): loader_images_per_s_per_core, a
  dict source -> images/s on one core at 224 px on ImageNet-sized JPEGs (about 500x375):
  kdcache's batches (consistent views, 8-bit out) from tar shards and from a .beton through
  the Pillow and the FFCV renderer, the old worker-side normalisation, timm's own loader
  (``create_loader``, default train transforms, with and without its colour jitter) and
  FFCV's own loader (random-resized-crop decoder); loader_best_kdcache_vs_timm (goal >= 1.5)
  and _vs_ffcv (goal >= 1.0); batch_bytes_* before (float32) and now (8-bit);
- peak_rss_mb of each stage.

Absolute seconds depend on the machine and on what else runs on it; compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

DEFAULTS = {
    # CPU: a quarter of ImageNet's pixels keeps the run to minutes on 2 cores.
    "cpu": {
        "teacher": "torchvision:resnet50",
        "student": "torchvision:resnet18",
        "image_size": 112,
        "samples": 512,
        "batch_size": 32,
        "workers": 1,
    },
    "cuda": {
        "teacher": "torchvision:resnet50",
        "student": "torchvision:resnet18",
        "image_size": 224,
        "samples": 8192,
        "batch_size": 256,
        "workers": 8,
    },
}
NUM_CLASSES = 1000


# -- data -------------------------------------------------------------------------------------


def synthetic_jpeg(rng: np.random.Generator) -> bytes:
    """A smooth random scene (gradients, blobs, texture), about 400x350, JPEG quality 90."""
    from loader_baselines import scene_jpeg

    return scene_jpeg(rng, (300, 400), (350, 450))


def make_shards(out: str, samples: int, per_shard: int = 256) -> str:
    from kdcache.cli.shards import ShardWriter

    rng = np.random.default_rng(0)
    writer = ShardWriter(out, "train", per_shard)
    for i in range(samples):
        writer.write(f"img{i:07d}", synthetic_jpeg(rng), "jpg", int(rng.integers(NUM_CLASSES)))
    writer.close()
    return os.path.join(out, "train-*.tar")


# -- stages (each runs in its own process) ---------------------------------------------------


def _rss_mb() -> float:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(self_kb, child_kb) / 1024, 1)


def _rendered_batches(c: dict, n_batches: int, device: Any) -> list:
    """Normalised (B, 3, S, S) float32 batches on ``device``, as the trainer feeds them."""
    from kdcache import pixels
    from kdcache.data.index import load_index
    from kdcache.render import IMAGENET
    from kdcache.train.batches import EpochData, TrainBatches
    from kdcache.views import get_spec

    index = load_index(c["data"])
    rows = np.arange(min(index.num_samples, n_batches * c["batch_size"]))
    batches = [rows[i : i + c["batch_size"]] for i in range(0, len(rows), c["batch_size"])]
    ds = TrainBatches(
        EpochData(index, batches, 0, c["image_size"], get_spec("function_matching"), 0)
    )
    return [pixels.take(ds[b], "pixels", IMAGENET, device) for b in range(len(ds))]


class _Run:
    """What a teacher mode's ``target`` reads of the trainer's run: the class count (and no
    live teacher: the bench's modes take their targets from labels or cache rows)."""

    num_classes = NUM_CLASSES
    teacher = None


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def stage_models(c: dict) -> dict:
    """Teacher forward-only and student train-step time per image, on pre-rendered batches."""
    import torch

    from kdcache.losses import create_loss
    from kdcache.models import create_model
    from kdcache.runtime import prepare_model, resolve_device, teacher_logits
    from kdcache.train.modes import get_mode
    from kdcache.train.step import train_step

    device = resolve_device(c["device"])
    batches = _rendered_batches(c, 4, device)
    teacher = prepare_model(create_model(c["teacher"], NUM_CLASSES), device, eval_mode=True)
    student = prepare_model(create_model(c["student"], NUM_CLASSES), device, eval_mode=False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    # The student step of hard-label training (the "none" mode's target and default loss).
    hard = get_mode("none")
    loss = create_loss(hard.default_loss(1.0))

    def labels_target(n: int) -> Any:
        labels = torch.zeros(n, dtype=torch.long)
        item = {"label": labels, "partner_label": labels, "lam": torch.ones(n)}
        return hard.target(item, _Run(), device)

    steps = [(x, labels_target(len(x))) for x in batches]

    def teacher_pass() -> None:
        for x in batches:
            teacher_logits(teacher, x, device)

    def student_pass() -> None:
        for x, target in steps:
            train_step(student, opt, x, target, loss, 0, device)

    images = sum(len(x) for x in batches)
    out = {}
    for name, fn in (("teacher_forward", teacher_pass), ("student_step", student_pass)):
        fn()  # warm-up (cudnn autotune, allocator)
        _sync(device)
        t = time.perf_counter()
        for _ in range(c["repeats"]):
            fn()
        _sync(device)
        out[f"{name}_ms_per_image"] = (time.perf_counter() - t) * 1000 / (images * c["repeats"])
    out["teacher_only_images_per_s"] = 1000 / out["teacher_forward_ms_per_image"]
    out["student_only_images_per_s"] = 1000 / out["student_step_ms_per_image"]
    return out


def stage_decode(c: dict) -> dict:
    """JPEG decode-only rate on one core (PIL, the path precompute and training use)."""
    from kdcache.data.index import load_index
    from kdcache.render import decode_image
    from kdcache.units import UnitReader

    index = load_index(c["data"])
    reader = UnitReader(index, capacity=len(index.units))
    samples = [s for u in range(len(index.units)) for s in reader.samples(u)]
    t = time.perf_counter()
    for s in samples:
        decode_image(s.data)
    return {"decode_images_per_s_per_core": len(samples) / (time.perf_counter() - t)}


def stage_precompute(c: dict) -> dict:
    from kdcache.cache import PrecomputeConfig, precompute

    result = precompute(
        PrecomputeConfig(
            data=c["data"],
            teacher=c["teacher"],
            out=c["cache"],
            epochs=1,
            teacher_image_size=c["image_size"],
            batch_size=c["batch_size"],
            workers=c["workers"],
            device=c["device"],
            num_classes=NUM_CLASSES,
            command="tools/bench.py",
        )
    )
    return {"precompute_images_per_s": result["images_per_s"]}


def stage_blocks(c: dict) -> dict:
    """Precompute of 16 epochs with 1, 4 and 16 epochs per block, side by side (rotating which
    goes first, best of the rounds): with a cheap teacher (kdcache:tiny_cnn, so decoding and
    rendering are what is timed) on the whole block set, whose decoded images (~320 MB) exceed
    a worker's image budget (256 MB), as an ImageNet shard's do, so one epoch per block decodes
    every image every epoch; and with the bench's teacher on its first shard. Then the files
    and bytes per row of the B = 1 and B = 16 caches."""
    from kdcache.cache import PrecomputeConfig, precompute
    from kdcache.cache.inspect import summary
    from kdcache.store import open_cache

    out: dict[str, Any] = {}
    blocks = (1, 4, 16)
    arms = (("cheap_", "kdcache:tiny_cnn", None, c["rounds"]), ("", c["teacher"], 256, 1))
    for name, teacher, limit, rounds in arms:
        for r in range(rounds):
            for b in blocks[r % 3 :] + blocks[: r % 3]:
                path = os.path.join(c["blocks_dir"], f"{name}b{b}-r{r}.zarr")
                result = precompute(
                    PrecomputeConfig(
                        data=c["blocks_data"],
                        teacher=teacher,
                        out=path,
                        epochs=16,
                        epochs_per_block=b,
                        limit=limit,
                        teacher_image_size=c["image_size"],
                        batch_size=c["batch_size"],
                        workers=c["workers"],
                        device=c["device"],
                        num_classes=NUM_CLASSES,
                        command="tools/bench.py",
                    )
                )
                key = f"precompute_{name}b{b}_images_per_s"
                out[key] = max(out.get(key, 0.0), result["images_per_s"])
    for name in ("", "cheap_"):
        for b in blocks:
            out[f"precompute_{name}b{b}_vs_b1_ratio"] = (
                out[f"precompute_{name}b{b}_images_per_s"]
                / out[f"precompute_{name}b1_images_per_s"]
            )
    for b in (1, 16):
        path = os.path.join(c["blocks_dir"], f"cheap_b{b}-r0.zarr")
        report = summary(open_cache(path))
        out[f"cache_b{b}_files"] = sum(len(fs) for _, _, fs in os.walk(path))
        out[f"cache_b{b}_row_files"] = report["unit_files"]
        out[f"cache_b{b}_bytes_per_row"] = report["bytes_per_row"]
        out[f"cache_b{b}_bytes_per_row_on_disk"] = report["bytes_per_row_on_disk"]
        out[f"cache_b{b}_metadata_bytes_per_row"] = report["metadata_bytes_per_row"]
    out["cache_b16"] = os.path.join(c["blocks_dir"], "cheap_b16-r0.zarr")
    return out


def stage_views_per_decode(c: dict) -> dict:
    """Training images/s (all epochs of a 4-epoch run) of hard labels and of the cache (B = 16)
    with --views-per-decode 1, 2 and 4, the arms rotating: for the bench's student and for a
    cheap one (kdcache:tiny_cnn), whose step leaves the data path in view. The block set's
    decoded images exceed a worker's image budget, so one view per decode decodes every image
    every epoch."""
    from kdcache.train import TrainConfig, fit

    arms = (("none", 1), ("cached", 1), ("cached", 2), ("cached", 4))
    out: dict[str, Any] = {}
    for name, student in (("", c["student"]), ("cheap_", "kdcache:tiny_cnn")):
        for r, (mode, v) in enumerate(arms):
            run = os.path.join(c["blocks_dir"], f"train-{name}{mode}-v{v}-r{r}")
            fit(
                TrainConfig(
                    data=c["blocks_data"],
                    val=c["val"],
                    student=student,
                    out=run,
                    epochs=4,
                    teacher_mode=mode,
                    cache=c["cache_b16"] if mode == "cached" else None,
                    views=None if mode == "cached" else "function_matching",
                    views_per_decode=v,
                    image_size=c["image_size"],
                    batch_size=c["batch_size"],
                    workers=c["workers"],
                    device=c["device"],
                    num_classes=NUM_CLASSES,
                )
            )
            with open(os.path.join(run, "metrics.jsonl")) as f:
                passes = [json.loads(line) for line in f]
            images = sum(m["images_per_s"] * m["seconds"] for m in passes)
            key = f"train_{name}{'hard' if mode == 'none' else 'cached'}_v{v}_images_per_s"
            out[key] = images / sum(m["seconds"] for m in passes)
        for v in (1, 2, 4):
            out[f"train_{name}cached_v{v}_vs_hard_ratio"] = (
                out[f"train_{name}cached_v{v}_images_per_s"]
                / out[f"train_{name}hard_v1_images_per_s"]
            )
    return out


def stage_train(c: dict) -> dict:
    """Three epochs of one mode; the best warm epoch's (2nd or 3rd) training images/s."""
    from kdcache.train import TrainConfig, fit

    mode = c["mode"]
    cfg = TrainConfig(
        data=c["data"],
        val=c["val"],
        student=c["student"],
        out=c["run"],
        epochs=3,
        teacher_mode=mode,
        cache=c["cache"] if mode == "cached" else None,
        teacher=c["teacher"] if mode == "online" else None,
        views=None if mode == "cached" else "function_matching",
        image_size=c["image_size"],
        batch_size=c["batch_size"],
        workers=c["workers"],
        device=c["device"],
        num_classes=NUM_CLASSES,
    )
    fit(cfg)
    with open(os.path.join(c["run"], "metrics.jsonl")) as f:
        warm = [json.loads(line)["images_per_s"] for line in f][1:]
    return {f"train_{mode}_images_per_s": max(warm)}


def stage_loader(c: dict) -> dict:
    """Hard-label and cached batches alternating in one process, median ms per batch of each:
    the loader alone (decode, render, cache rows), then whole training steps (loader, target,
    student forward, loss, backward, optimizer step)."""
    import torch

    from kdcache import pixels
    from kdcache.data.index import load_index
    from kdcache.losses import create_loss
    from kdcache.models import create_model
    from kdcache.render import IMAGENET
    from kdcache.runtime import prepare_model, resolve_device
    from kdcache.store import open_cache
    from kdcache.train.batches import EpochData, TrainBatches
    from kdcache.train.modes import get_mode
    from kdcache.train.order import epoch_order, rank_batches
    from kdcache.train.step import train_step

    index, cache = load_index(c["data"]), open_cache(c["cache"])
    batches = rank_batches(epoch_order(index.counts, seed=0, epoch=0), c["batch_size"])

    def loader(cached: bool) -> TrainBatches:
        return TrainBatches(
            EpochData(
                index=index,
                batches=batches,
                epoch=0,
                image_size=c["image_size"],
                spec=cache.spec,
                plan_seed=cache.plan_seed,
                cache=cache if cached else None,
            )
        )

    modes = {"hard": loader(False), "cached": loader(True)}
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    for b in list(range(len(batches))) * 3:
        for mode in ("hard", "cached") if b % 2 else ("cached", "hard"):
            t = time.perf_counter()
            modes[mode][b]
            seconds[mode].append(time.perf_counter() - t)
    out = {f"loader_{m}_ms_per_batch": 1000 * float(np.median(s)) for m, s in seconds.items()}

    device = resolve_device(c["device"])
    student = prepare_model(create_model(c["student"], NUM_CLASSES), device, eval_mode=False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    # The trainer's own parts: each mode's target and default loss, and its step.
    teacher_mode = {"hard": get_mode("none"), "cached": get_mode("cached")}
    losses = {m: create_loss(teacher_mode[m].default_loss(1.0)) for m in modes}

    def step(mode: str, b: int) -> None:
        item = modes[mode][b]
        target = teacher_mode[mode].target(item, _Run(), device)
        x = pixels.take(item, "pixels", IMAGENET, device)
        train_step(student, opt, x, target, losses[mode], 0, device)
        _sync(device)

    step("hard", 0)  # warm-up
    seconds = {m: [] for m in modes}
    for b in range(len(batches)):
        for mode in ("hard", "cached") if b % 2 else ("cached", "hard"):
            t = time.perf_counter()
            step(mode, b)
            seconds[mode].append(time.perf_counter() - t)
    out.update({f"step_{m}_ms_per_batch": 1000 * float(np.median(s)) for m, s in seconds.items()})
    return out


def peaked_logits(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 1000) logits shaped like a trained classifier's: a clear winner (+8..+14 over a unit
    normal background) and three confusers (+2..+6); top-1 probability mostly 0.6-0.99."""
    z = rng.normal(0.0, 1.0, (n, NUM_CLASSES)).astype(np.float32)
    rows = np.arange(n)
    z[rows, rng.integers(0, NUM_CLASSES, n)] += rng.uniform(8, 14, n)
    for _ in range(3):
        z[rows, rng.integers(0, NUM_CLASSES, n)] += rng.uniform(2, 6, n)
    return z


def stage_rows(c: dict) -> dict:
    """bytes_per_row on disk and target_rows_per_s, on a synthetic ImageNet-sized cache."""
    import torch
    from numcodecs import blosc

    from kdcache import schema
    from kdcache.cache.inspect import summary
    from kdcache.render import RENDERER
    from kdcache.runtime import topk_rows
    from kdcache.store import create_cache, open_cache
    from kdcache.targets import from_topk
    from kdcache.views import get_spec, sample_unit_views

    torch.set_num_threads(1)
    blosc.use_threads = False  # one core: blosc would otherwise decompress on several threads
    rng = np.random.default_rng(1)
    units, per_unit, k = c["row_units"], c["rows_per_unit"], 10
    n = units * per_unit
    sizes = np.stack([rng.integers(300, 400, n), rng.integers(350, 450, n)], 1)
    meta = {
        "data": {
            "fingerprint": "bench",
            "num_samples": n,
            "units": [
                {
                    "name": f"u{u}",
                    "count": per_unit,
                    "start": u * per_unit,
                    "content_hash": "",
                    "bytes": 0,
                }
                for u in range(units)
            ],
        },
        "topk": k,
        "num_classes": NUM_CLASSES,
        "teacher": "bench",
        "teacher_weights_hash": "",
        "views": get_spec("function_matching").to_dict(),
        "plan_seed": 0,
        "teacher_image_size": 224,
        "renderer": RENDERER,
        "data_fingerprint": "bench",
    }
    samples = {
        "key_hash": rng.integers(0, 2**63, n).astype(np.uint64),
        "label": rng.integers(0, NUM_CLASSES, n).astype(np.int32),
        "size": sizes,
    }

    def write(path: str, spec_text: str) -> dict:
        """A one-epoch cache of these rows under ``spec_text``'s views -> its inspect report."""
        spec = get_spec(spec_text)
        cache = create_cache(path, {**meta, "views": spec.to_dict()}, samples, epochs=1)
        top_rng = np.random.default_rng(2)  # the same logits whatever the views
        for u in range(units):
            lo = u * per_unit
            views = sample_unit_views(spec, 0, 0, lo, sizes[lo : lo + per_unit])
            top = {
                k_: v.numpy()
                for k_, v in topk_rows(
                    torch.from_numpy(peaked_logits(top_rng, per_unit)), k
                ).items()
            }
            rows = {f: getattr(views, f) for f in schema.VIEW_FIELDS}
            rows.update(views.ops, **top, status=np.full(per_unit, schema.OK, np.uint8))
            cache.write_unit(0, u, rows)
        return summary(open_cache(path))

    full = write(c["rows_cache"].replace(".zarr", "-ops.zarr"), VIEW_OPS_PIPELINE)
    write(c["rows_cache"], "function_matching")
    bytes_per_row = summary(open_cache(c["rows_cache"]))["bytes_per_row"]
    reader = open_cache(c["rows_cache"])
    t = time.perf_counter()
    for u in range(units):
        r = reader.read_unit(0, u, ("topk_logits", "topk_index", "lse", "status"))
        target = from_topk(
            torch.from_numpy(r["topk_logits"]),
            torch.from_numpy(r["topk_index"]),
            torch.from_numpy(r["lse"]),
            NUM_CLASSES,
        )
        assert target.logp.shape == (per_unit, k)
    return {
        "bytes_per_row": bytes_per_row,
        "bytes_per_row_view_ops_pipeline": full["bytes_per_row"],
        "bytes_per_row_by_op_view_ops_pipeline": full["bytes_per_row_by_op"],
        "target_rows_per_s": n / (time.perf_counter() - t),
        "rows_measured": n,
    }


# The pipeline issue 13 names: what the view ops add per image (render time, bytes per row).
VIEW_OPS_PIPELINE = "inception_crop(min_area=0.08)|flip|randaugment(2, 9)|mixup|erase(p=0.25)"
VIEW_OPS_ARMS = {
    "preset": "function_matching",
    "randaugment": "inception_crop|flip|randaugment(2, 9)|mixup",
    "erase": "inception_crop|flip|mixup|erase(p=0.25)",
    "pipeline": VIEW_OPS_PIPELINE,
}


def stage_view_ops(c: dict) -> dict:
    """Render time per image of the default preset and of it plus each op (one core, decoded
    images, the student's size), the arms alternating batch by batch so drift cannot tilt
    them; an op's cost is its arm's time minus the preset's."""
    import torch

    from kdcache.data.index import load_index
    from kdcache.render import render_raw
    from kdcache.units import UnitReader
    from kdcache.views import get_spec, sample_unit_views

    torch.set_num_threads(1)
    index = load_index(c["data"])
    unit = index.units[0]
    rows = np.arange(unit.start, unit.start + unit.count)
    images, failed = UnitReader(index, capacity=2).decode(rows.tolist())
    assert not failed
    sizes = index.size[unit.start : unit.start + unit.count]
    views = {
        arm: sample_unit_views(get_spec(text), 0, 0, unit.start, sizes)
        for arm, text in VIEW_OPS_ARMS.items()
    }
    times: dict[str, list[float]] = {arm: [] for arm in VIEW_OPS_ARMS}
    batch = c["batch_size"]
    arms = list(views)
    for r in range(c["repeats"]):
        for b, lo in enumerate(range(0, len(rows) - batch + 1, batch)):
            turn = (r + b) % len(arms)  # each arm goes first as often as the others
            for arm in arms[turn:] + arms[:turn]:
                v = views[arm]
                t = time.perf_counter()
                render_raw(
                    v.take(slice(lo, lo + batch)), rows[lo : lo + batch], images, c["image_size"]
                )
                times[arm].append((time.perf_counter() - t) / batch * 1e3)
    median = {arm: float(np.median(t)) for arm, t in times.items()}
    out = {f"render_{arm}_ms_per_image": m for arm, m in median.items()}
    out["randaugment_cost_ms_per_image"] = median["randaugment"] - median["preset"]
    out["erase_cost_ms_per_image"] = median["erase"] - median["preset"]
    return out


# The methods of docs/methods.md, timed per step against plain KL. Logit losses on a target
# the teacher made beforehand (what a cached run pays); feature methods with the live teacher's
# forward in the step (what they need: online mode), against online KL.
METHOD_LOSSES = ("kl", "soft_ce", "reverse_kl", "dkd", "kl+ce(w=0.5)", "kl+avatar_kl")
METHOD_FEATURES = {  # loss spec -> (--features pairs, --prune-teacher, --curriculum)
    "kl": (None, False, None),
    "kl+fitnet": ("layer3=layer3", False, None),
    "kl+at(w=1000)": ("layer3=layer3", False, None),
    "kl+rkd": ("embed=embed", False, None),
    "kl+pkt": ("embed=embed", False, None),
    "kl+akd(p=0.1, base='cwd')": ("layer3=layer3", False, None),
    "kl (InDistill stage: pruned layer3, MSE)": (
        "layer3.1.bn2=layer3.1.bn2",
        True,
        "layer3.1.bn2:rest",
    ),
}


def stage_methods(c: dict) -> dict:
    """Student step time per image of each loss (cached-style target) and of each feature
    method (teacher forward + student step), interleaved, best of the repeats; ratios to KL."""
    import torch

    from kdcache import targets as T
    from kdcache.losses import create_loss
    from kdcache.models import create_model
    from kdcache.runtime import prepare_model, resolve_device, teacher_logits
    from kdcache.train import feature_distill
    from kdcache.train.step import train_step

    device = resolve_device(c["device"])
    batches = _rendered_batches(c, 2, device)
    teacher = prepare_model(create_model(c["teacher"], NUM_CLASSES), device, eval_mode=True)
    student = prepare_model(create_model(c["student"], NUM_CLASSES), device, eval_mode=False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    targets = []
    for x in batches:  # the teacher's rows as a top-10 cache holds them, plus avatars
        t = T.from_logits(teacher_logits(teacher, x, device), 10)
        t.labels = T.Labels(*(torch.randint(0, NUM_CLASSES, (len(x),), generator=gen)
                              for _ in range(2)), torch.ones(len(x)))  # fmt: skip
        t.avatar = T.from_logits(teacher_logits(teacher, x, device) * 0.9, 10)
        t.avatar_u = torch.rand(len(x), generator=gen)
        targets.append(t.to(device))
    runs = {}
    for spec in METHOD_LOSSES:
        loss = create_loss(spec)

        def cached(loss=loss) -> None:
            for x, t in zip(batches, targets, strict=True):
                train_step(student, opt, x, t, loss, 0, device)

        runs[f"loss {spec}"] = cached
    for spec, (pairs, prune, curriculum) in METHOD_FEATURES.items():
        real = spec.split(" (")[0]
        fd = feature_distill.build(
            real, pairs, teacher, c["image_size"], student, c["image_size"], device, False,
            prune=prune, curriculum=curriculum,
        )  # fmt: skip
        kl = create_loss("kl")
        params = fd.parameters() if fd is not None else []
        f_opt = torch.optim.AdamW([*student.parameters(), *params], lr=1e-5)

        def online(fd=fd, kl=kl, f_opt=f_opt) -> None:
            for x in batches:
                t = T.from_logits(teacher_logits(teacher, x, device))

                def loss(z, t, fd=fd):
                    if fd is None:
                        return kl(z, t)
                    extra = fd(0)
                    return extra + z.sum() * 0 if fd.stage(0) is not None else kl(z, t) + extra

                train_step(student, f_opt, x, t, loss, 0, device)

        runs[f"online {spec}"] = online
    best: dict[str, float] = {}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(c["repeats"]):
        for name, fn in runs.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    images = sum(len(x) for x in batches)
    ms = {name: 1000 * v / images for name, v in best.items()}
    return {
        "methods_ms_per_image": {k: round(v, 3) for k, v in ms.items()},
        "methods_vs_kl_step_ratio": {
            k: round(v / (ms["loss kl"] if k.startswith("loss") else ms["online kl"]), 3)
            for k, v in ms.items()
        },
    }


def stage_loaders(c: dict) -> dict:
    """Per-core loader rates at 224 px on ImageNet-sized JPEGs, every source in turn in one
    process on one thread, each figure the best of ``rounds``: kdcache's TrainBatches (what a
    DataLoader worker runs: decode, crop, flip, 8-bit out) on tar shards and on a .beton with
    the Pillow and the FFCV renderer, kdcache's batch normalised in the worker as before
    (``_worker_normalised``), timm's own loader (its default train transforms) and FFCV's own
    loader (its random-resized-crop decoder). Plus the bytes each batch moves from a worker."""
    import loader_baselines as lb
    import torch

    from kdcache import pixels
    from kdcache.data.index import load_index
    from kdcache.render import IMAGENET, get_renderer
    from kdcache.train.batches import EpochData, TrainBatches
    from kdcache.train.order import epoch_order, rank_batches
    from kdcache.views import get_spec

    torch.set_num_threads(1)
    size, batch = c["loader_size"], c["loader_batch"]
    samples = lb.read_jpegs(c["loader_data"])
    sources = {"tar": load_index(c["loader_data"])}
    have_ffcv = c.get("loader_beton") is not None
    if have_ffcv:
        sources["beton"] = load_index(c["loader_beton"])

    def epoch(index, renderer: str, e: int = 0) -> TrainBatches:
        batches = rank_batches(epoch_order(index.counts, seed=0, epoch=e), batch)
        spec = get_spec("consistent")
        return TrainBatches(
            EpochData(index, batches, e, size, spec, 0, renderer=get_renderer(renderer))
        )

    def kdcache(index, renderer: str, normalise: bool) -> float:
        epoch(index, renderer)[0]  # warm-up (imports, a unit), then a fresh reader for the timing
        data, n = epoch(index, renderer), 0
        start = time.perf_counter()
        for b in range(len(data)):
            item = data[b]
            if normalise:  # the old path: floats out of the worker
                pixels.take(item, "pixels", IMAGENET, "cpu")
            n += len(item["rows"])
        return n / (time.perf_counter() - start)

    ffcv_epochs = None

    def kdcache_ffcv_loader() -> float:
        """kdcache's views through FFCV's loader, one thread (its first epoch compiles)."""
        nonlocal ffcv_epochs
        from kdcache.train.ffcv_loader import FfcvEpochs

        index = sources["beton"]
        if ffcv_epochs is None:
            ffcv_epochs = FfcvEpochs(c["loader_beton"], index.size, size, 1)
            for _ in ffcv_epochs.items(epoch(index, "ffcv", 1)):
                pass
        n, start = 0, time.perf_counter()
        for item in ffcv_epochs.items(epoch(index, "ffcv")):
            n += len(item["rows"])
        return n / (time.perf_counter() - start)

    arms = {}
    for name, index in sources.items():
        arms[f"kdcache_{name}_pillow"] = lambda i=index: kdcache(i, "pillow", False)
        if have_ffcv:
            arms[f"kdcache_{name}_ffcv"] = lambda i=index: kdcache(i, "ffcv", False)
    if have_ffcv:
        arms["kdcache_beton_ffcv_loader"] = kdcache_ffcv_loader
    arms["kdcache_tar_pillow_worker_normalised"] = lambda: kdcache(sources["tar"], "pillow", True)
    arms["timm"] = lambda: lb.timm_images_per_s(samples, size, 64)
    arms["timm_no_color_jitter"] = lambda: lb.timm_images_per_s(
        samples, size, 64, color_jitter=None
    )
    if have_ffcv:
        work = tempfile.mkdtemp(prefix="ffcv-own-", dir=c["work"])
        arms["ffcv"] = lambda: lb.ffcv_images_per_s(samples, work, size, 64)
    rates: dict[str, float] = {}
    for _ in range(c["rounds"]):
        for name, arm in arms.items():
            rates[name] = max(rates.get(name, 0.0), arm())
    out: dict = {"loader_images_per_s_per_core": {k: round(v, 1) for k, v in rates.items()}}
    out["loader_data"] = lb.image_stats(samples)
    # Bytes per batch from a worker, before (normalised float32) and after (8-bit).
    index = sources["tar"]
    rows = np.arange(min(batch, index.num_samples))
    for views in ("consistent", "function_matching"):
        item = TrainBatches(EpochData(index, [rows], 0, size, get_spec(views), 0))[0]
        before = len(rows) * 3 * size * size * 4
        out[f"batch_bytes_{views}"] = {
            "float32_before": before,
            "uint8_now": pixels.shipped_bytes(item),
            "ratio": round(before / pixels.shipped_bytes(item), 3),
        }
    kd = max(v for k, v in rates.items() if k.startswith("kdcache_"))
    best = max((k for k in rates if k.startswith("kdcache_")), key=rates.get)
    out["loader_best_kdcache"] = best
    out["loader_best_kdcache_vs_timm"] = round(kd / rates["timm"], 3)
    if have_ffcv:
        out["loader_best_kdcache_vs_ffcv"] = round(kd / rates["ffcv"], 3)
    return out


def stage_loader_training(c: dict) -> dict:
    """On a GPU: hard-label training images/s of the bench's student at 224 px through each
    source (tar + Pillow, .beton + FFCV renderer, that with --loader ffcv), --workers each, the
    best of epochs 2 and 3 (the first compiles and warms up). Not run on a CPU, where the
    figure would measure the model, not the loader."""
    from kdcache.train import TrainConfig, fit

    arms = {"tar_pillow_torch": (c["loader_data"], "pillow", "torch")}
    if c.get("loader_beton"):
        arms["beton_ffcv_torch"] = (c["loader_beton"], "ffcv", "torch")
        arms["beton_ffcv_ffcv"] = (c["loader_beton"], "ffcv", "ffcv")
    out = {}
    for name, (data, renderer, loader) in arms.items():
        run = os.path.join(c["work"], f"loader-train-{name}")
        cfg = TrainConfig(
            data=data, val=c["val"], student=c["student"], out=run, epochs=3,
            teacher_mode="none", views="consistent", image_size=c["loader_size"],
            batch_size=c["batch_size"], workers=c["workers"], device=c["device"],
            renderer=renderer, loader=loader, num_classes=NUM_CLASSES, command="bench",
        )  # fmt: skip
        fit(cfg)
        with open(os.path.join(run, "metrics.jsonl")) as f:
            rates = [json.loads(line)["images_per_s"] for line in f][1:]
        out[name] = round(max(rates), 1)
    return {"train_images_per_s_by_source": out}


STAGES = {
    "loaders": stage_loaders,
    "loader_training": stage_loader_training,
    "methods": stage_methods,
    "view_ops": stage_view_ops,
    "models": stage_models,
    "decode": stage_decode,
    "precompute": stage_precompute,
    "train": stage_train,
    "rows": stage_rows,
    "loader": stage_loader,
    "blocks": stage_blocks,
    "views_per_decode": stage_views_per_decode,
}


def _loader_data(out: str, samples: int) -> dict:
    """The loaders stage's ImageNet-sized JPEG shards, and their .beton when ffcv is here."""
    import importlib.util

    import loader_baselines as lb

    data = lb.write_jpeg_shards(os.path.join(out, "tar"), samples)
    beton = None
    if importlib.util.find_spec("ffcv") is not None:
        from kdcache.data import beton as B

        beton = B.write(data, os.path.join(out, "train.beton"))
    return {"loader_data": data, "loader_beton": beton}


def run_stage(name: str, c: dict) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--stage",
        name,
        "--stage-config",
        json.dumps(c),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench stage {name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default=None, help="cpu or cuda [cuda when available]")
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    p.add_argument("--samples", type=int, help="synthetic training images [cpu 512, cuda 8192]")
    p.add_argument("--teacher", help="teacher spec [torchvision:resnet50]")
    p.add_argument("--student", help="student spec [torchvision:resnet18]")
    p.add_argument("--image-size", type=int, help="[cpu 112, cuda 224]")
    p.add_argument("--batch-size", type=int, help="[cpu 32, cuda 256]")
    p.add_argument("--workers", type=int, help="DataLoader workers [cpu 1, cuda 8]")
    p.add_argument("--rows", type=int, default=100_000, help="rows of the size/read test [100000]")
    p.add_argument(
        "--rows-per-unit",
        type=int,
        default=2500,
        help="shard size of the size/read test (ImageNet's WebDataset shards hold 1,000-10,000) "
        "[2500]",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds of the timed stages, interleaved; each figure keeps its best round [2]",
    )
    p.add_argument("--dir", help="work directory [a temporary one]")
    p.add_argument(
        "--only",
        choices=["loaders"],
        help="run only this stage: loaders, the per-core loader rates (a few minutes; on "
        "CUDA also training images/s through each source)",
    )
    p.add_argument(
        "--loader-samples",
        type=int,
        help="ImageNet-sized JPEGs (about 500x375) of the loaders stage [cpu 512, cuda 8192]",
    )
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--stage-config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage:
        out = STAGES[args.stage](json.loads(args.stage_config))
        print(json.dumps({**out, f"{args.stage}_peak_rss_mb": _rss_mb()}))
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    c = dict(DEFAULTS["cuda" if device.startswith("cuda") else "cpu"])
    for key in ("samples", "teacher", "student", "image_size", "batch_size", "workers"):
        if getattr(args, key) is not None:
            c[key] = getattr(args, key)
    work = args.dir or tempfile.mkdtemp(prefix="kdcache-bench-")
    c.update(
        device=device,
        repeats=3,
        row_units=max(1, args.rows // args.rows_per_unit),
        rows_per_unit=args.rows_per_unit,
        rows_cache=os.path.join(work, "rows.zarr"),
    )
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))
    log(
        f"bench: {device}, teacher {c['teacher']}, student {c['student']}, "
        f"{c['image_size']} px, {c['samples']} images, work dir {work}"
    )
    started = time.perf_counter()
    c.update(loader_size=224, loader_batch=64, work=work, rounds=args.rounds)
    loader_samples = args.loader_samples or (8192 if device.startswith("cuda") else 512)
    log(f"bench: loaders data ({loader_samples} ImageNet-sized JPEGs)")
    c.update(_loader_data(os.path.join(work, "loaders"), loader_samples))
    if args.only == "loaders":
        log("bench: loaders (per-core loader rates, every source in turn)")
        result = run_stage("loaders", c)
        if device.startswith("cuda"):  # training images/s through each source
            c["val"] = make_shards(os.path.join(work, "val"), 64, per_shard=64)
            result.update(run_stage("loader_training", c))
        result["setup"] = {"cpu_count": os.cpu_count(), "torch": torch.__version__,
                           "rounds": args.rounds, "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
        print(json.dumps(result, indent=None if args.json else 2))
        return
    c["data"] = make_shards(os.path.join(work, "data"), c["samples"])
    c["val"] = make_shards(os.path.join(work, "val"), 64, per_shard=64)
    result: dict[str, Any] = {}
    for name in ("decode", "rows", "view_ops", "loaders"):
        log(f"bench: {name}")
        result.update(run_stage(name, c))
    if device.startswith("cuda"):
        log("bench: training images/s through each source (GPU)")
        result.update(run_stage("loader_training", c))
    # The timed stages run in rounds, interleaved, and each figure keeps its best round: noise
    # on a shared machine only ever slows a stage, and interleaving exposes every stage to it.
    for r in range(args.rounds):
        for name, mode in (
            ("models", None),
            ("precompute", None),
            ("train", "none"),
            ("train", "cached"),
            ("train", "online"),
            ("loader", None),
        ):
            log(f"bench: round {r + 1}/{args.rounds}: {name} {mode or ''}")
            cache = os.path.join(work, f"teacher-{r}.zarr")
            run = os.path.join(work, f"run-{r}-{mode}")
            stage = run_stage(name, {**c, "mode": mode, "cache": cache, "run": run})
            if name == "train":
                stage[f"train_{mode}_peak_rss_mb"] = stage.pop("train_peak_rss_mb")
            for key, value in stage.items():
                best = min if "_ms_per_" in key else max  # times: the min; rates, RSS: the max
                result[key] = best(result[key], value) if key in result else value
    # Epoch blocks: precompute at B = 1, 4, 16 and training at V = 1, 2, 4, on a small set.
    c.update(
        blocks_dir=os.path.join(work, "blocks"),
        blocks_data=make_shards(os.path.join(work, "blocks-data"), 768),
        rounds=args.rounds,
    )
    log("bench: epoch blocks (precompute B = 1, 4, 16)")
    blocks = run_stage("blocks", c)
    c["cache_b16"] = blocks.pop("cache_b16")
    result.update(blocks)
    log("bench: views per decode (training V = 1, 2, 4 and hard labels)")
    result.update(run_stage("views_per_decode", c))
    log("bench: methods (each loss and feature method's step against KL's)")
    result.update(run_stage("methods", c))
    r = result
    result.update(
        train_cached_vs_hard_ratio=r["train_cached_images_per_s"] / r["train_none_images_per_s"],
        train_cached_vs_online_speedup=r["train_cached_images_per_s"]
        / r["train_online_images_per_s"],
        theoretical_speedup=(r["teacher_forward_ms_per_image"] + r["student_step_ms_per_image"])
        / r["student_step_ms_per_image"],
        precompute_vs_teacher_only_ratio=r["precompute_images_per_s"]
        / r["teacher_only_images_per_s"],
    )
    result["loader_cached_vs_hard_ratio"] = (
        r["loader_hard_ms_per_batch"] / r["loader_cached_ms_per_batch"]
    )
    result["step_cached_vs_hard_ratio"] = (
        r["step_hard_ms_per_batch"] / r["step_cached_ms_per_batch"]
    )
    result["speedup_vs_theoretical"] = (
        result["train_cached_vs_online_speedup"] / result["theoretical_speedup"]
    )
    result["setup"] = {
        k: c[k]
        for k in ("teacher", "student", "image_size", "samples", "batch_size", "workers", "device")
    }
    result["setup"].update(
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        gpu=torch.cuda.get_device_name() if device.startswith("cuda") else None,
        rounds=args.rounds,
        seconds=round(time.perf_counter() - started, 1),
    )
    rounded = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}
    print(json.dumps(rounded, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
