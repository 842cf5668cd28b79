"""``--views-per-decode V``: passes of V epochs, each image's V views together in the stream,
every view trained once per pass, the same rows and targets as the epochs they come from, and
exact resume."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from conftest import TEACHER_SIZE, model_input, read_steps, small_run

from kdcache.data.index import load_index
from kdcache.store import open_cache
from kdcache.train import fit
from kdcache.train.batches import EpochData, TrainBatches
from kdcache.train.order import epoch_order, pass_batches, rank_batches
from kdcache.train.trainer import _total_steps, read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("world", [1, 2])
def test_a_pass_trains_every_view_once_with_an_images_views_together(world):
    order = epoch_order([7, 7, 5], seed=3, epoch=4)
    views, batch = 3, 6
    seen = []
    for rank in range(world):
        rows, epochs = pass_batches(order, 4, views, batch, world, rank)
        assert len(rows) == len(epochs) == -(-len(order) * views // batch)
        assert all(len(r) == batch // world for r in rows)
        again = pass_batches(order, 4, views, batch, world, rank)  # a pure function
        assert all(np.array_equal(a, b) for a, b in zip(rows, again[0], strict=True))
        seen += list(zip(np.concatenate(rows), np.concatenate(epochs), strict=True))
    first = seen[: len(order) * views] if world == 1 else seen
    assert set(first) == {(int(r), e) for r in order for e in range(4, 4 + views)}
    if world == 1:  # the V views of a sample are consecutive, in epoch order
        flat_rows, flat_epochs = np.concatenate(rows), np.concatenate(epochs)
        assert np.array_equal(flat_rows[: 3 * len(order)].reshape(-1, 3)[:, 0], order)
        assert (flat_rows[: 3 * len(order)].reshape(-1, 3) == order[:, None]).all()
        assert (flat_epochs[:6].reshape(-1, 3) == [4, 5, 6]).all()
    one, none = pass_batches(order, 4, 1, batch)  # one epoch: the plain epoch order
    assert none is None
    assert all(np.array_equal(a, b) for a, b in zip(one, rank_batches(order, batch), strict=True))


def test_a_pass_replays_the_cached_views_and_targets_of_each_rows_epoch(tiny_cache, train_dir):
    cache, index = open_cache(tiny_cache), load_index(train_dir)
    rows = np.array([0, 0, 3, 3, 9, 9, 15, 15])
    epochs = np.array([0, 1] * 4)
    mixed = TrainBatches(
        EpochData(
            index,
            [rows],
            0,
            TEACHER_SIZE,
            cache.spec,
            cache.plan_seed,
            cache=cache,
            row_epochs=[epochs],
            cache_cycle=(0, 1),
        )  # fmt: skip
    )[0]
    for e in (0, 1):
        alone = TrainBatches(
            EpochData(
                index,
                [rows[epochs == e]],
                e,
                TEACHER_SIZE,
                cache.spec,
                cache.plan_seed,
                cache=cache,
                cache_epoch=e,
            )  # fmt: skip
        )[0]
        mine = torch.from_numpy(epochs == e)
        for name in ("rows", "lam", "topk_logits", "topk_index", "lse"):
            assert torch.equal(mixed[name][mine], alone[name]), (name, e)
        assert torch.equal(model_input(mixed)[mine], model_input(alone)), e


def cached_run(train_dir, val_dir, tiny_cache, out, **kw):
    return small_run(
        train_dir, val_dir, out, teacher_mode="cached", cache=tiny_cache,
        image_size=TEACHER_SIZE, **kw,
    )  # fmt: skip


def test_views_per_decode_trains_passes_and_resumes_exactly(
    tmp_path, train_dir, val_dir, tiny_cache
):
    """V = 2 over 3 epochs: a pass of 2, then one of 1; stopped mid-pass and resumed, it ends
    where the straight run ends. Its step count is what the schedule was built for."""
    straight = cached_run(
        train_dir, val_dir, tiny_cache, tmp_path / "a", epochs=3, views_per_decode=2
    )
    fit(straight)
    history = read_metrics(straight.out)
    assert [m["epoch"] for m in history] == [2, 3]
    assert all(m["val_accuracy"] is not None for m in history)
    steps = read_steps(straight.out)
    assert len(steps) == _total_steps(straight, 19) == -(-19 * 2 // 8) + -(-19 // 8)
    stopped = dataclasses.replace(straight, out=str(tmp_path / "b"), checkpoint_every=1)

    def stop(epoch: int, step: int, steps: int, loss: float) -> None:
        if (epoch, step) == (0, 2):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(stopped, on_step=stop)
    fit(dataclasses.replace(stopped, resume=True))
    a, b = read_metrics(straight.out), read_metrics(stopped.out)
    assert [m["train_loss"] for m in a] == pytest.approx([m["train_loss"] for m in b], rel=1e-6)
    wa = torch.load(os.path.join(straight.out, "model.pt"))
    wb = torch.load(os.path.join(stopped.out, "model.pt"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    plain = cached_run(train_dir, val_dir, tiny_cache, tmp_path / "c", epochs=3)
    fit(plain)
    assert [m["cache_epoch"] for m in read_metrics(plain.out)] == [0, 1, 0]
    assert read_metrics(plain.out)[-1]["train_loss"] != a[-1]["train_loss"]
    other = dataclasses.replace(straight, views_per_decode=1, resume=True)
    with pytest.raises(Exception, match="--views-per-decode 1 \\(the run has 2\\)"):
        fit(other)


def test_views_per_decode_works_for_fresh_views_too(tmp_path, train_dir, val_dir):
    cfg = small_run(train_dir, val_dir, tmp_path / "r", epochs=2, views_per_decode=2)
    fit(cfg)
    assert [m["epoch"] for m in read_metrics(cfg.out)] == [2]


def test_views_per_decode_is_checked():
    cfg = small_run("d", "v", "o", views_per_decode=0)
    with pytest.raises(Exception, match="--views-per-decode must be at least 1, got 0"):
        cfg.validate()
