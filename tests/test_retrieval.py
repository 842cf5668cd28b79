"""Retrieval evaluation: the 11-point interpolated mAP against a brute-force form of the
InDistill reference (sklearn's NearestNeighbors), logged by `kdcache train --retrieval` and
printed by `kdcache eval --retrieval`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import read_metrics, run_cli, small_run

from kdcache.features import embedding_layer
from kdcache.models import load_model
from kdcache.train.retrieval import RECALL_LEVELS, _nearest, mean_average_precision
from kdcache.train.trainer import fit


def reference_map(db, db_labels, queries, query_labels, metric):
    """gsarridis/InDistill's Database.get_metrics, with its interpolation over every rank."""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=len(db), algorithm="brute", metric=metric).fit(db)
    _, idx = nn.kneighbors(queries)
    relevant = (db_labels[idx] == query_labels[:, None]).astype(float)
    precision = np.cumsum(relevant, 1) / np.arange(1, len(db) + 1)
    for i in reversed(range(precision.shape[1] - 1)):
        precision[:, i] = np.maximum(precision[:, i], precision[:, i + 1])
    recall = np.cumsum(relevant, 1) / np.bincount(db_labels)[query_labels][:, None]
    at = [np.argmin(np.abs(recall - level), 1) for level in np.arange(0, 1.01, 0.1)]
    return np.stack([precision[np.arange(len(queries)), i] for i in at], 1).mean()


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_the_map_is_the_references(metric):
    rng = np.random.default_rng(0)
    db, db_labels = rng.normal(size=(300, 8)), rng.integers(0, 5, 300)
    q, q_labels = rng.normal(size=(70, 8)), rng.integers(0, 5, 70)
    want = reference_map(db, db_labels, q, q_labels, metric)
    got = mean_average_precision(*map(torch.tensor, (db, db_labels, q, q_labels)), metric, chunk=16)
    assert abs(got - want) < 1e-12
    # a perfect embedding: every query's class first
    perfect = mean_average_precision(
        torch.eye(5)[db_labels], torch.tensor(db_labels), torch.eye(5)[q_labels],
        torch.tensor(q_labels), metric,
    )  # fmt: skip
    assert perfect == 1.0
    # unlabelled images take no part
    q_labels[:10] = -1
    got = mean_average_precision(*map(torch.tensor, (db, db_labels, q, q_labels)), metric)
    assert abs(got - reference_map(db, db_labels, q[10:], q_labels[10:], metric)) < 1e-12


def test_nearest_recall_is_argmin():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        r = torch.rand(5, 40, generator=g, dtype=torch.float64).cumsum(1)
        r = (r / r[:, -1:]).round(decimals=1)
        want = (r[:, :, None] - RECALL_LEVELS.double()).abs().argmin(1)
        assert torch.equal(_nearest(r, RECALL_LEVELS.double()), want)


def test_the_embedding_is_the_heads_input():
    model = load_model("torchvision:resnet18", image_size=32, num_classes=10).module
    assert embedding_layer(model) is model.fc


def test_train_logs_retrieval_and_eval_prints_it(train_dir, val_dir, tmp_path):
    out = tmp_path / "run"
    fit(small_run(train_dir, val_dir, out, retrieval=True, epochs=1, limit=24))
    metrics = read_metrics(out)[-1]
    for key in ("retrieval_map_cosine", "retrieval_map_euclidean"):
        assert 0 < metrics[key] <= 1, metrics
    code, stdout, err = run_cli("eval", str(out), "--data", val_dir, "--retrieval", "--json",
                                "--workers", "0", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    printed = json.loads(stdout.splitlines()[-1])
    assert printed["retrieval_map_cosine"] == pytest.approx(metrics["retrieval_map_cosine"])
    assert printed["accuracy"] == pytest.approx(metrics["val_accuracy"])
    code, _, err = run_cli("eval", str(out / "model.pt"), "--model", "kdcache:tiny_cnn",
                           "--data", val_dir, "--retrieval", "--num-classes", "10",
                           "--device", "cpu")  # fmt: skip
    assert code == 2 and "give --database DATA" in err, err
