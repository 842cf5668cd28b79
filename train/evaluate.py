"""Evaluation on a held-out split: accuracy on center views, and agreement with a teacher."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch.utils.data import DataLoader

from kdcache.data.index import DatasetIndex, load_index
from kdcache.dist import Dist
from kdcache.errors import KdcacheError
from kdcache.models import create_model
from kdcache.runtime import autocast, loader_kwargs, prepare_model, resolve_device
from kdcache.train.stream import StreamSpec, TrainBatches
from kdcache.views import get_spec


def eval_batches(index: DatasetIndex, size: int, teacher_size: int | None = None) -> TrainBatches:
    """Every sample once, in index order, as deterministic ``center`` views."""
    n = index.num_samples
    batches = [np.arange(lo, min(lo + 256, n)) for lo in range(0, n, 256)]
    return TrainBatches(
        StreamSpec(
            index,
            batches,
            epoch=0,
            image_size=size,
            spec=get_spec("center"),
            plan_seed=0,
            teacher_image_size=teacher_size,
        )
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    index: DatasetIndex,
    image_size: int,
    device: torch.device,
    workers: int = 0,
    teacher: torch.nn.Module | None = None,
    teacher_image_size: int | None = None,
    place: Dist | None = None,
) -> dict[str, float]:
    """-> {"accuracy": top-1 on labelled samples, "teacher_agreement": top-1 agreement}."""
    was_training = model.training
    model.eval()
    place = place or Dist()
    batches = eval_batches(index, image_size, teacher_image_size if teacher else None)
    mine = list(range(place.rank, len(batches), place.world))  # ranks split the val set
    loader = DataLoader(
        torch.utils.data.Subset(batches, mine),
        batch_size=None,
        generator=torch.Generator().manual_seed(0),  # leaves the global RNG alone
        **loader_kwargs(workers),
    )
    correct = labelled = agree = seen = 0
    for item in loader:
        with autocast(device):
            pred = model(item["pixels"].to(device, non_blocking=True)).argmax(1).cpu()
        label = item["label"]
        correct += int((pred == label)[label >= 0].sum())
        labelled += int((label >= 0).sum())
        seen += len(pred)
        if teacher is not None:
            with autocast(device):
                t = teacher(item["teacher_pixels"].to(device, non_blocking=True)).argmax(1).cpu()
            agree += int((pred == t).sum())
    model.train(was_training)
    correct, labelled, agree, seen = place.sum([correct, labelled, agree, seen], device)
    out = {"accuracy": correct / max(labelled, 1)}
    if teacher is not None:
        out["teacher_agreement"] = agree / max(seen, 1)
    return out


def evaluate_saved(
    path: str,
    data: str,
    model_spec: str | None = None,
    image_size: int | None = None,
    num_classes: int | None = None,
    teacher: str | None = None,
    teacher_weights: str | None = None,
    teacher_image_size: int | None = None,
    device: str = "auto",
    workers: int = 0,
) -> dict:
    """``kdcache eval``: score a run directory (model.pt + config.json) or a weights file."""
    run_config: dict = {}
    weights = path
    if os.path.isdir(path):
        weights = os.path.join(path, "model.pt")
        config_path = os.path.join(path, "config.json")
        if os.path.exists(config_path):
            with open(config_path) as f:
                run_config = json.load(f)
    model_spec = model_spec or run_config.get("student")
    if not model_spec:
        raise KdcacheError(
            f"{path} is not a run directory with a config.json; name the model with --model SPEC"
        )
    index = load_index(data)
    num_classes = num_classes or run_config.get("num_classes") or index.num_classes
    image_size = image_size or run_config.get("image_size") or 224
    dev = resolve_device(device)
    model = prepare_model(create_model(model_spec, num_classes, weights), dev, eval_mode=True)
    t = None
    if teacher:
        t = prepare_model(create_model(teacher, num_classes, teacher_weights), dev, eval_mode=True)
    scores = evaluate(model, index, image_size, dev, workers, t, teacher_image_size or image_size)
    return {"model": model_spec, "weights": weights, "samples": index.num_samples, **scores}
