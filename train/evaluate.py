"""Evaluation on a held-out split (center views): what the student learnt, and from whom.

With a teacher: top-1 agreement, top-5 agreement (the teacher's class among the student's five
best) and KL(teacher || student) at T = 1, always. Accuracy only where the data's labels live in
the class space the student predicts (:func:`accuracy_basis`): the same width (taken to mean the
same classes), hard-label training, or a user's label map; otherwise ``accuracy`` is None.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from kdcache import pixels
from kdcache.data.index import DatasetIndex, load_index
from kdcache.dist import Dist
from kdcache.errors import KdcacheError
from kdcache.models import load_model
from kdcache.render import (
    IMAGENET,
    PILLOW,
    InputConvention,
    Renderer,
    get_renderer,
    resolve_image_size,
)
from kdcache.runtime import autocast, loader_kwargs, prepare_model, resolve_device
from kdcache.train.batches import EpochData, TrainBatches
from kdcache.views import get_spec

log = logging.getLogger(__name__)


def eval_batches(
    index: DatasetIndex,
    size: int,
    teacher_size: int | None = None,
    student_input: InputConvention = IMAGENET,
    teacher_input: InputConvention = IMAGENET,
    renderer: Renderer = PILLOW,
) -> TrainBatches:
    """Every sample once, in index order, as deterministic ``center`` views."""
    n = index.num_samples
    batches = [np.arange(lo, min(lo + 256, n)) for lo in range(0, n, 256)]
    return TrainBatches(
        EpochData(
            index,
            batches,
            epoch=0,
            image_size=size,
            spec=get_spec("center"),
            plan_seed=0,
            teacher_image_size=teacher_size,
            student_input=student_input,
            teacher_input=teacher_input,
            renderer=renderer,
        )
    )


def load_label_map(path: str, num_classes: int) -> np.ndarray:
    """A JSON label map -> (L,) int64: data label -> class of the model, -1 where unmapped.

    The file holds a list (entry ``i`` is the class of data label ``i``; null for none) or an
    object ``{"data label": class, ...}``.
    """
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise KdcacheError(f"cannot read the label map {path}: {e}") from None
    try:
        pairs = (
            {int(k): v for k, v in raw.items()} if isinstance(raw, dict) else dict(enumerate(raw))
        )
        pairs = {k: int(v) for k, v in pairs.items() if v is not None}
    except (TypeError, ValueError, AttributeError):
        raise KdcacheError(
            f'label map {path} must be a JSON list of classes or an object {{"data label": class}}'
        ) from None
    wrong = {k: v for k, v in pairs.items() if k < 0 or not 0 <= v < num_classes}
    if wrong:
        k, v = next(iter(wrong.items()))
        raise KdcacheError(
            f"label map {path}: {len(wrong)} entries out of range (first: {k} -> {v}); data "
            f"labels are >= 0 and classes are 0..{num_classes - 1}"
        )
    out = np.full(max(pairs, default=-1) + 1, -1, dtype=np.int64)
    for k, v in pairs.items():
        out[k] = v
    return out


def accuracy_basis(
    hard_labels: bool,
    num_classes: int,
    label_classes: int,
    val: DatasetIndex,
    label_map: str | None = None,
) -> tuple[str, np.ndarray | None]:
    """How val accuracy is scored -> (``labels`` | ``label_map`` | ``none``, the map or None).

    label_classes: largest data label + 1 (0 when the data has no labels).
    """
    if label_map:
        return "label_map", load_label_map(label_map, num_classes)
    if not val.num_classes:
        log.info("the val data has no labels: val accuracy is not scored (null)")
        return "none", None
    if hard_labels:
        return "labels", None
    if label_classes == num_classes:
        log.info(
            "val accuracy takes the data's labels 0..%d to be the teacher's %d classes "
            "(the same width); give --label-map FILE if they are not",
            num_classes - 1,
            num_classes,
        )
        return "labels", None
    log.info(
        "val accuracy is not scored (null): the data's labels (%d classes) are not the "
        "teacher's %d classes; give --label-map FILE (data label -> teacher class) to score it",
        label_classes,
        num_classes,
    )
    return "none", None


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    index: DatasetIndex,
    image_size: int,
    device: torch.device,
    workers: int = 0,
    teacher: torch.nn.Module | None = None,
    teacher_image_size: int | None = None,
    ranks: Dist | None = None,
    *,
    student_input: InputConvention = IMAGENET,
    teacher_input: InputConvention = IMAGENET,
    basis: str = "labels",
    label_map: np.ndarray | None = None,
    renderer: Renderer = PILLOW,
) -> dict:
    """-> {"accuracy": top-1 on samples with a scored label, or None when ``basis`` is
    ``none``; "accuracy_basis"; with a teacher also "teacher_agreement" (top-1),
    "teacher_agreement_top5" and "teacher_kl" (mean KL(teacher || student) at T = 1)}."""
    was_training = model.training
    model.eval()
    ranks = ranks or Dist()
    batches = eval_batches(
        index, image_size, teacher_image_size if teacher else None, student_input, teacher_input,
        renderer,
    )  # fmt: skip
    mine = list(range(ranks.rank, len(batches), ranks.world))  # ranks split the val set
    loader = DataLoader(
        torch.utils.data.Subset(batches, mine),
        batch_size=None,
        generator=torch.Generator().manual_seed(0),  # leaves the global RNG alone
        **loader_kwargs(workers),
    )
    correct = scored = agree = agree5 = seen = 0
    kl = 0.0
    for item in loader:
        if not len(item["rows"]):
            continue
        with autocast(device):
            logits = model(pixels.take(item, "pixels", student_input, device)).float().cpu()
        pred = logits.argmax(1)
        label = item["label"]
        if label_map is not None:
            inside = (label >= 0) & (label < len(label_map))
            label = torch.where(
                inside, torch.from_numpy(label_map)[label.clamp(0, len(label_map) - 1)], -1
            )
        known = (label >= 0) & (label < logits.shape[1])
        correct += int((pred == label)[known].sum())
        scored += int(known.sum())
        seen += len(pred)
        if teacher is not None:
            with autocast(device):
                x = pixels.take(item, pixels.teacher_name(item), teacher_input, device)
                t = teacher(x).float().cpu()
            best = t.argmax(1)
            agree += int((pred == best).sum())
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            agree5 += int((top5 == best[:, None]).any(1).sum())
            kl += float(
                F.kl_div(logits.log_softmax(1), t.log_softmax(1), log_target=True, reduction="sum")
            )
    model.train(was_training)
    correct, scored, agree, agree5, seen, kl = ranks.sum(
        [correct, scored, agree, agree5, seen, kl], device
    )
    out: dict = {
        "accuracy": correct / scored if basis != "none" and scored else None,
        "accuracy_basis": basis,
    }
    if teacher is not None:
        out["teacher_agreement"] = agree / max(seen, 1)
        out["teacher_agreement_top5"] = agree5 / max(seen, 1)
        out["teacher_kl"] = kl / max(seen, 1)
    return out


def _run_config(path: str) -> tuple[str, dict]:
    """(weights file, the run's config.json or {}) of a run directory or a weights file."""
    if not os.path.isdir(path):
        return path, {}
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        return os.path.join(path, "model.pt"), {}
    with open(config_path) as f:
        return os.path.join(path, "model.pt"), json.load(f)


def evaluate_saved(
    path: str,
    data: str,
    model_spec: str | None = None,
    image_size: int | str | None = None,
    num_classes: int | None = None,
    teacher: str | None = None,
    teacher_weights: str | None = None,
    teacher_image_size: int | str | None = None,
    device: str = "auto",
    workers: int = 0,
    label_map: str | None = None,
    teacher_mean: tuple[float, float, float] | None = None,
    teacher_std: tuple[float, float, float] | None = None,
    retrieval: bool = False,
    database: str | None = None,
    renderer: str | None = None,
) -> dict:
    """``kdcache eval``: score a run directory (model.pt + config.json) or a weights file.
    The center views are rendered by ``renderer`` (``pillow``, ``ffcv``; the run's own).

    Sizes, class count and input conventions default to the run's (its config.json); the
    teacher's image size to the run's teacher's (the cache's in cached mode). ``retrieval``:
    also the retrieval mAPs (:mod:`kdcache.train.retrieval`) of ``data`` as queries against
    ``database`` (default: the run's training data, its first ``--limit`` samples).
    """
    weights, run = _run_config(path)
    model_spec = model_spec or run.get("student")
    if not model_spec:
        raise KdcacheError(
            f"{path} is not a run directory with a config.json; name the model with --model SPEC"
        )
    index = load_index(data)
    size = resolve_image_size(
        image_size or run.get("image_size_resolved") or run.get("image_size") or 224,
        index.short_sides,
        "--image-size",
    )
    dev = resolve_device(device)
    t = None
    if teacher:
        t_size = resolve_image_size(
            teacher_image_size or run.get("teacher_image_size_resolved") or size,
            index.short_sides,
            "--teacher-image-size",
        )
        conv = run.get("teacher_input") or {}
        t = load_model(
            teacher,
            image_size=t_size,
            num_classes=num_classes or run.get("num_classes"),
            default_classes=index.num_classes,
            weights=teacher_weights,
            mean=teacher_mean or conv.get("mean"),
            std=teacher_std or conv.get("std"),
        )
        t.module = prepare_model(t.module, dev, eval_mode=True)
    classes = num_classes or run.get("num_classes") or (t.num_classes if t else None)
    student_conv = run.get("student_input") or {}
    model = load_model(
        model_spec,
        image_size=size,
        num_classes=classes,
        default_classes=index.num_classes,
        weights=weights,
        mean=student_conv.get("mean"),
        std=student_conv.get("std"),
    )
    hard = run.get("teacher_mode") == "none" or (not run and t is None)
    label_map = label_map or run.get("label_map")
    basis, mapping = accuracy_basis(hard, model.num_classes, index.num_classes, index, label_map)
    render = get_renderer(renderer or run.get("renderer") or "pillow")
    scores = evaluate(
        prepare_model(model.module, dev, eval_mode=True),
        index,
        size,
        dev,
        workers,
        t.module if t else None,
        t_size if t else None,
        student_input=model.convention,
        teacher_input=t.convention if t else IMAGENET,
        basis=basis,
        label_map=mapping,
        renderer=render,
    )
    if retrieval:
        from kdcache.train.retrieval import retrieval_scores

        if not (database or run.get("data")):
            raise KdcacheError(
                f"--retrieval needs a database: {path} is not a run directory with a "
                "config.json; give --database DATA (labelled shards)"
            )
        db = load_index(database or run["data"])
        scores.update(
            retrieval_scores(
                model.module,
                db,
                index,
                size,
                dev,
                workers,
                model.convention,
                None if database else run.get("limit"),
                render,
            )
        )
    return {"model": model_spec, "weights": weights, "samples": index.num_samples, **scores}
