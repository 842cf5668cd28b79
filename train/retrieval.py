"""Retrieval evaluation, as InDistill reports it beside accuracy.

A model's embedding of an image is the input of its last linear layer (found in module order),
on the center view. The database is a labelled split (the run's training data), the queries
another (the val split); an image is relevant to a query when their labels are equal. For each
query the database is ranked by cosine or Euclidean distance, and the query's average
precision is the mean of the interpolated precision (the best precision at this rank or any
later one) at the ranks whose recall is nearest to 0, 0.1, ..., 1 (11 points, as
``utils/retrieval_evaluation.py`` of gsarridis/InDistill picks them); mAP is the mean over the
queries with at least one relevant image. The reference's interpolation loop runs over the
first ``len(queries in a batch)`` ranks only; here it runs over all of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from kdcache import pixels
from kdcache.data.index import DatasetIndex
from kdcache.features import embedding_layer
from kdcache.render import IMAGENET, PILLOW, InputConvention, Renderer
from kdcache.runtime import autocast, loader_kwargs
from kdcache.train.evaluate import eval_batches

METRICS = ("cosine", "euclidean")
RECALL_LEVELS = torch.linspace(0, 1, 11)


@torch.no_grad()
def embed(
    model: nn.Module,
    index: DatasetIndex,
    image_size: int,
    device: torch.device,
    workers: int = 0,
    student_input: InputConvention = IMAGENET,
    limit: int | None = None,
    renderer: Renderer = PILLOW,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (N, D) float32 embeddings on CPU and (N,) int64 labels (-1: none) of the first
    ``limit`` samples (all when None), center views, in index order."""
    captured: list[torch.Tensor] = []
    hook = embedding_layer(model).register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach().float().flatten(1).cpu())
    )
    was_training = model.training
    model.eval()
    batches = eval_batches(index, image_size, student_input=student_input, renderer=renderer)
    n = min(index.num_samples, limit or index.num_samples)
    wanted = [b for b, rows in enumerate(batches.s.batches) if len(rows) and rows[0] < n]
    loader = DataLoader(
        torch.utils.data.Subset(batches, wanted),
        batch_size=None,
        generator=torch.Generator().manual_seed(0),
        **loader_kwargs(workers),
    )
    labels = []
    try:
        for item in loader:
            if not len(item["rows"]):
                continue
            with autocast(device):
                model(pixels.take(item, "pixels", student_input, device))
            keep = item["rows"] < n
            captured[-1] = captured[-1][keep]
            labels.append(item["label"][keep].long())
    finally:
        hook.remove()
        model.train(was_training)
    if not labels:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(captured), torch.cat(labels)


def mean_average_precision(
    database: torch.Tensor,
    database_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    metric: str = "cosine",
    chunk: int | None = None,
) -> float | None:
    """11-point interpolated mAP of ``queries`` (Q, D) against ``database`` (N, D); labels
    (Q,), (N,) int64, -1 (unlabelled) left out. None when no query has a relevant image."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    db_ok, q_ok = database_labels >= 0, query_labels >= 0
    database, database_labels = database[db_ok].double(), database_labels[db_ok]
    queries, query_labels = queries[q_ok].double(), query_labels[q_ok]
    if metric == "cosine":
        database, queries = F.normalize(database, dim=1), F.normalize(queries, dim=1)
    if not len(queries) or not len(database):
        return None
    top = max(int(query_labels.max()), int(database_labels.max()))
    per_class = torch.bincount(database_labels, minlength=top + 1)
    ranks = torch.arange(1, len(database) + 1, dtype=torch.float64)
    chunk = chunk or max(1, min(256, 2**22 // max(len(database), 1)))  # (chunk, N) matrices
    aps = []
    for lo in range(0, len(queries), chunk):
        q, ql = queries[lo : lo + chunk], query_labels[lo : lo + chunk]
        d = 1 - q @ database.T if metric == "cosine" else torch.cdist(q, database)
        order = torch.argsort(d, dim=1, stable=True)
        relevant = (database_labels[order] == ql[:, None]).double()
        hits = relevant.cumsum(1)
        precision = hits / ranks
        interpolated = precision.flip(1).cummax(1).values.flip(1)
        total = per_class[ql].double()
        recall = hits / total.clamp_min(1)[:, None]
        ap = interpolated.gather(1, _nearest(recall, RECALL_LEVELS.double())).mean(1)
        aps.append(ap[total > 0])
    every = torch.cat(aps) if aps else torch.zeros(0)
    return float(every.mean()) if len(every) else None


def _nearest(recall: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """(Q, N) non-decreasing recall, (L,) levels -> (Q, L) the first rank whose recall is
    nearest each level (``argmin |recall - level|``, without the (Q, N, L) difference)."""
    q = len(recall)
    want = levels.expand(q, -1).contiguous()
    hi = torch.searchsorted(recall, want).clamp_max(recall.shape[1] - 1)
    lo = (hi - 1).clamp_min(0)
    r_hi, r_lo = recall.gather(1, hi), recall.gather(1, lo)
    below = (hi > 0) & ((want - r_lo).abs() <= (r_hi - want).abs())
    # a plateau's first rank: where the lower recall value starts
    start = torch.searchsorted(recall, r_lo.contiguous())
    return torch.where(below, start, torch.searchsorted(recall, r_hi.contiguous()))


def retrieval_scores(
    model: nn.Module,
    database: DatasetIndex,
    queries: DatasetIndex,
    image_size: int,
    device: torch.device,
    workers: int = 0,
    student_input: InputConvention = IMAGENET,
    database_limit: int | None = None,
    renderer: Renderer = PILLOW,
) -> dict[str, float | None]:
    """-> {"retrieval_map_cosine", "retrieval_map_euclidean"} of ``model`` (center views
    rendered by ``renderer``)."""
    db, db_labels = embed(
        model, database, image_size, device, workers, student_input, database_limit, renderer
    )
    q, q_labels = embed(
        model, queries, image_size, device, workers, student_input, renderer=renderer
    )
    return {
        f"retrieval_map_{metric}": mean_average_precision(db, db_labels, q, q_labels, metric)
        for metric in METRICS
    }
