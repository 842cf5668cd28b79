"""Evaluation on a held-out split: accuracy on center views, and agreement with a teacher."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from kdcache.data.index import DatasetIndex
from kdcache.runtime import autocast, loader_kwargs
from kdcache.views import get_spec

from kdcache.train.stream import StreamSpec, TrainBatches


def eval_batches(index: DatasetIndex, size: int, teacher_size: int | None = None
                 ) -> TrainBatches:
    """Every sample once, in index order, as deterministic ``center`` views."""
    n = index.num_samples
    batches = [np.arange(lo, min(lo + 256, n)) for lo in range(0, n, 256)]
    return TrainBatches(StreamSpec(index, batches, epoch=0, image_size=size,
                                   spec=get_spec("center"), plan_seed=0,
                                   teacher_image_size=teacher_size))


@torch.no_grad()
def evaluate(model: torch.nn.Module, index: DatasetIndex, image_size: int,
             device: torch.device, workers: int = 0, teacher: torch.nn.Module | None = None,
             teacher_image_size: int | None = None) -> dict[str, float]:
    """-> {"accuracy": top-1 on labelled samples, "teacher_agreement": top-1 agreement}."""
    was_training = model.training
    model.eval()
    loader = DataLoader(eval_batches(index, image_size, teacher_image_size if teacher else None),
                        batch_size=None, **loader_kwargs(workers))
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
    out = {"accuracy": correct / max(labelled, 1)}
    if teacher is not None:
        out["teacher_agreement"] = agree / max(seen, 1)
    return out
