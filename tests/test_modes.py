"""The ``fixed`` and ``independent`` teachers, and online vs cached on unmixed views.

fixed: targets are the teacher's predictions on center views, read from a one-epoch ``center``
cache by sample (the teacher never runs while training) while the student sees fresh
``consistent`` views. independent: the teacher sees its own random view of the same sample,
drawn from a second view stream, the same one on every replay.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import (
    NUM_CLASSES,
    TEACHER,
    TEACHER_SIZE,
    cache_config,
    cached_probs,
    epoch_batches,
    initial_logits,
    kl_by_hand,
    loss_tolerance,
    model_input,
    read_metrics,
    read_steps,
    run_cli,
    teacher_probs,
)

from kdcache.cache import precompute
from kdcache.cache.inspect import summary
from kdcache.data.index import load_index
from kdcache.errors import CacheMismatchError, KdcacheError
from kdcache.render import render_views
from kdcache.store import open_cache
from kdcache.train import TrainConfig, fit
from kdcache.train.batches import EpochData, TrainBatches
from kdcache.units import UnitReader
from kdcache.views import INDEPENDENT_STREAM, STUDENT_STREAM, get_spec, sample_unit_views

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STUDENT = "kdcache:tiny_cnn"
CPU = ("--workers", "0", "--device", "cpu")


def train_cfg(train_dir: str, val_dir: str, out, mode: str, **kw) -> TrainConfig:
    opts = dict(
        data=train_dir,
        val=val_dir,
        student=STUDENT,
        out=str(out),
        epochs=1,
        teacher_mode=mode,
        image_size=TEACHER_SIZE,
        batch_size=8,
        workers=0,
        device="cpu",
        seed=3,
        command="pytest",
    )
    opts.update(kw)
    return TrainConfig(**opts)


def expected_pixels(index, rows, preset: str, plan_seed: int, epoch: int, size: int, stream: int):
    """The views of ``rows`` drawn straight from the view generator, rendered."""
    spec = get_spec(preset)
    assert not spec.mixes  # one image per row
    rows = np.asarray(rows, dtype=np.int64)
    images, failed = UnitReader(index).decode(rows)
    assert not failed
    out = []
    for r in rows:
        u = index.units[index.unit_index_of(int(r))]
        sizes = index.size[u.start : u.start + u.count]
        views = sample_unit_views(spec, plan_seed, epoch, u.start, sizes, stream=stream)
        out.append(render_views(views.take([int(r) - u.start]), np.array([r]), images, size))
    return torch.cat(out)


def cached_rows(cache, index, rows, epoch: int) -> dict[str, np.ndarray]:
    """Cache rows of global samples ``rows`` in ``epoch``, through ``read_unit``."""
    out: dict[str, list] = {"topk_logits": [], "topk_index": [], "lse": []}
    for r in np.asarray(rows):
        unit = index.unit_index_of(int(r))
        part = cache.read_unit(epoch, unit)
        for name in out:
            out[name].append(part[name][int(r) - index.units[unit].start])
    return {name: np.stack(values) for name, values in out.items()}


@pytest.fixture(scope="module")
def center_cache(tmp_path_factory, train_dir) -> str:
    """The fixed teacher's predictions: one epoch of center views (tiny_cnn, seed 0)."""
    out = str(tmp_path_factory.mktemp("modes") / "center.zarr")
    summary = precompute(cache_config(train_dir, out, views="center", epochs=1))
    assert summary["epochs_complete"] == 1 and summary["bad_rows"] == 0
    return out


@pytest.fixture(scope="module")
def consistent_cache(tmp_path_factory, train_dir) -> str:
    out = str(tmp_path_factory.mktemp("modes") / "consistent.zarr")
    summary = precompute(cache_config(train_dir, out, views="consistent", epochs=1))
    assert summary["epochs_complete"] == 1
    return out


# A learning rate so small that the student stays as initialised (to float32 precision): every
# step's loss in steps.jsonl is then the initial student's on that step's batch, which a test
# can compute by hand from the plan, the view generator, the cache rows or the live teacher.
TINY_LR = 1e-12


def check_steps_by_hand(cfg: TrainConfig, target, wrong) -> None:
    """Every step of epoch 1 of a ``TINY_LR`` run of ``cfg``: its loss is KL(``target(rows,
    pixels)`` || the initial student on the fresh consistent views of ``rows``); each loss of
    ``wrong(rows, pixels, p)`` (the same step fed other inputs, ``p`` the right targets) is far
    from it, so the comparison tells those inputs apart."""
    assert cfg.lr == TINY_LR
    index = load_index(cfg.data)
    batches = epoch_batches(index, cfg, 0)
    assert set(np.concatenate(batches).tolist()) == set(range(index.num_samples))
    steps = read_steps(cfg.out)
    assert [(s["epoch"], s["step"]) for s in steps] == [(1, b + 1) for b in range(len(batches))]
    for step, rows in zip(steps, batches, strict=True):
        pixels = expected_pixels(index, rows, "consistent", 0, 0, cfg.image_size, STUDENT_STREAM)
        logits = initial_logits(cfg.student, NUM_CLASSES, cfg.seed, pixels)
        p = target(rows, pixels)
        want = kl_by_hand(logits, p)
        assert abs(step["loss"] - want) <= loss_tolerance(want), (step, want)
        for other in wrong(rows, pixels, p):
            assert abs(other - want) > 10 * loss_tolerance(want), (other, want)


# -- fixed --------------------------------------------------------------------------------


@pytest.mark.parametrize("with_teacher", [False, True], ids=["no-teacher", "teacher-for-val"])
def test_fixed_trains_on_the_center_cache_not_the_teacher(
    with_teacher, center_cache, train_dir, val_dir, tmp_path
):
    out = tmp_path / "run"
    teacher = TEACHER if with_teacher else None
    cfg = train_cfg(
        train_dir, val_dir, out, "fixed", cache=center_cache, teacher=teacher, lr=TINY_LR
    )
    result = fit(cfg)
    (metrics,) = read_metrics(out)
    assert metrics["epoch"] == 1 and math.isfinite(metrics["train_loss"])
    assert metrics["train_loss"] > 0 and result["train_loss"] == metrics["train_loss"]
    assert ("teacher_agreement" in metrics) == with_teacher  # val agreement: no teacher_logits
    with open(out / "config.json") as f:
        config = json.load(f)
    assert config["view_spec"]["name"] == "consistent"  # the student's default in fixed mode
    assert config["num_classes"] == NUM_CLASSES

    # Every step (3 of 8: 5 rows wrap around) trains on the cache's epoch-0 rows as targets
    # and the fresh consistent views as pixels: not on the teacher run live on those views,
    # not on the center views the cache was made from.
    index, cache = load_index(train_dir), open_cache(center_cache)

    def cached(rows, pixels):
        return cached_probs(cached_rows(cache, index, rows, 0), NUM_CLASSES)

    def wrong(rows, pixels, p):
        center = expected_pixels(index, rows, "center", 0, 0, TEACHER_SIZE, STUDENT_STREAM)
        assert not torch.equal(pixels, center)
        return [
            kl_by_hand(
                initial_logits(STUDENT, NUM_CLASSES, cfg.seed, pixels), teacher_probs(pixels)
            ),
            kl_by_hand(initial_logits(STUDENT, NUM_CLASSES, cfg.seed, center), p),
        ]

    check_steps_by_hand(cfg, cached, wrong)


@pytest.mark.parametrize("epoch", [0, 3])
def test_fixed_targets_are_epoch_zero_rows_by_sample(center_cache, train_dir, epoch):
    """In any student epoch the target of sample i is cache epoch 0's row of i."""
    index, cache = load_index(train_dir), open_cache(center_cache)
    rows = np.random.default_rng(epoch).permutation(index.num_samples)
    batches = [rows[:8], rows[8:16], rows[16:]]
    spec = get_spec("consistent")
    stream = EpochData(index, batches, epoch, TEACHER_SIZE, spec, 0, target_cache=cache)
    data = TrainBatches(stream)
    for b, batch in enumerate(batches):
        item = data[b]
        assert item["rows"].tolist() == batch.tolist() and item["skipped"] == 0
        want = cached_rows(cache, index, batch, 0)
        for name, values in want.items():
            assert np.array_equal(item[name].numpy(), values), name
        fresh = expected_pixels(index, batch, "consistent", 0, epoch, TEACHER_SIZE, STUDENT_STREAM)
        assert torch.equal(model_input(item), fresh)
        center = expected_pixels(index, batch, "center", 0, epoch, TEACHER_SIZE, STUDENT_STREAM)
        assert not torch.equal(model_input(item), center)
        assert "teacher_pixels" not in item


def test_fixed_refuses_a_non_center_cache(tiny_cache, train_dir, val_dir, tmp_path):
    with pytest.raises(CacheMismatchError, match="center") as e:
        fit(train_cfg(train_dir, val_dir, tmp_path / "run", "fixed", cache=tiny_cache))
    assert "function_matching" in str(e.value)


def test_fixed_needs_a_cache(train_dir, val_dir, tmp_path):
    with pytest.raises(KdcacheError, match="--cache"):
        fit(train_cfg(train_dir, val_dir, tmp_path / "run", "fixed", teacher=TEACHER))


@pytest.mark.parametrize("mode", ["fixed", "independent"])
def test_mixing_views_are_refused(mode, center_cache, train_dir, val_dir, tmp_path):
    extra = {"cache": center_cache} if mode == "fixed" else {"teacher": TEACHER}
    cfg = train_cfg(train_dir, val_dir, tmp_path / "run", mode, views="function_matching", **extra)
    with pytest.raises(KdcacheError, match="unmixed") as e:
        fit(cfg)
    assert "function_matching" in str(e.value)


# -- fixed via the CLI: the center cache is made on first use, then reused ----------------


def last_json(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "nothing on stdout"
    return json.loads(lines[-1])


def ok(*argv) -> tuple[str, str]:
    code, out, err = run_cli(*argv)
    assert code == 0, (argv, code, err[-2000:])
    return out, err


def fixed_args(train_dir, val_dir, cache, out) -> list:
    return [
        "train",
        "--data",
        train_dir,
        "--val",
        val_dir,
        "--student",
        STUDENT,
        "--teacher-mode",
        "fixed",
        "--cache",
        cache,
        "--teacher",
        TEACHER,
        "--epochs",
        1,
        "--image-size",
        16,
        "--batch-size",
        8,
        *CPU,
        "--out",
        out,
        "--json",
    ]


def tree_state(path: str) -> dict[str, tuple[int, int]]:
    return {
        os.path.relpath(os.path.join(d, f), path): (
            os.stat(os.path.join(d, f)).st_mtime_ns,
            os.stat(os.path.join(d, f)).st_size,
        )
        for d, _, files in os.walk(path)
        for f in files
    }


def test_fixed_makes_its_center_cache_once(train_dir, val_dir, tmp_path):
    cache = str(tmp_path / "fixed.zarr")
    first = last_json(ok(*fixed_args(train_dir, val_dir, cache, tmp_path / "a"))[0])
    assert first["cache_epoch"] == 0 and "teacher_agreement" in first
    report = summary(open_cache(cache))
    assert report["views"] == "center" and report["epochs_complete"] == 1
    assert report["epochs_allocated"] == 1 and report["teacher"] == TEACHER
    assert report["teacher_image_size"] == 16
    state = tree_state(cache)
    done = open_cache(cache).done_mask()

    # The second run checks the cache (precompute resumes: nothing left to do) and rewrites
    # nothing in it.
    second = last_json(ok(*fixed_args(train_dir, val_dir, cache, tmp_path / "b"))[0])
    assert tree_state(cache) == state
    assert (open_cache(cache).done_mask() == done).all()
    assert second["train_loss"] == first["train_loss"]  # same targets, same seed


def test_fixed_finishes_an_interrupted_center_cache(train_dir, val_dir, tmp_path):
    cache = str(tmp_path / "fixed.zarr")
    precompute(cache_config(train_dir, cache, views="center", epochs=1, limit_units=1))
    assert open_cache(cache).complete_epochs() == []
    ok(*fixed_args(train_dir, val_dir, cache, tmp_path / "run"))


def test_fixed_cache_honours_num_classes(train_dir, val_dir, tmp_path):
    cache = str(tmp_path / "fixed.zarr")
    ok(*fixed_args(train_dir, val_dir, cache, tmp_path / "run"), "--num-classes", 12)
    assert open_cache(cache).num_classes == 12


# -- independent --------------------------------------------------------------------------


def independent_batches(index, epoch: int, teacher_size: int) -> TrainBatches:
    rows = np.arange(index.num_samples)
    batches = [rows[:8], rows[8:16], rows[16:]]
    stream = EpochData(
        index,
        batches,
        epoch,
        TEACHER_SIZE,
        get_spec("consistent"),
        0,
        teacher_image_size=teacher_size,
        teacher_stream=INDEPENDENT_STREAM,
    )
    return TrainBatches(stream)


@pytest.mark.parametrize("teacher_size", [TEACHER_SIZE, 24])
def test_independent_teacher_sees_its_own_view(train_dir, teacher_size):
    index = load_index(train_dir)
    epoch = 2
    data = independent_batches(index, epoch, teacher_size)
    for b in range(len(data)):
        item = data[b]
        rows = item["rows"].numpy()
        teacher = model_input(item, "teacher_pixels")
        assert teacher.shape == (len(rows), 3, teacher_size, teacher_size)
        want = expected_pixels(
            index, rows, "consistent", 0, epoch, teacher_size, INDEPENDENT_STREAM
        )
        assert torch.equal(teacher, want)
        # the student's views are the ordinary stream's, untouched by the teacher's stream
        student = expected_pixels(index, rows, "consistent", 0, epoch, TEACHER_SIZE, STUDENT_STREAM)
        assert torch.equal(model_input(item), student)
        if teacher_size == TEACHER_SIZE:  # same size, other view: other pixels, row by row
            differs = (teacher != model_input(item)).flatten(1).any(1)
            assert differs.all(), differs
        # the same on replay: again in this dataset, and in a fresh one
        assert torch.equal(model_input(data[b], "teacher_pixels"), teacher)
        again = independent_batches(index, epoch, teacher_size)[b]
        assert torch.equal(model_input(again, "teacher_pixels"), teacher)
    # another epoch, another teacher view
    other = model_input(independent_batches(index, epoch + 1, teacher_size)[0], "teacher_pixels")
    assert not torch.equal(other, model_input(data[0], "teacher_pixels"))


def teacher_on_stream(index, stream: int):
    """Targets: the live teacher on the consistent views of ``stream`` (epoch 0)."""

    def probs(rows, pixels):
        return teacher_probs(expected_pixels(index, rows, "consistent", 0, 0, TEACHER_SIZE, stream))

    return probs


def test_independent_fit_feeds_the_teacher_its_own_views(train_dir, val_dir, tmp_path):
    out = tmp_path / "run"
    cfg = train_cfg(train_dir, val_dir, out, "independent", teacher=TEACHER, lr=TINY_LR)
    fit(cfg)
    (metrics,) = read_metrics(out)
    assert metrics["epoch"] == 1 and math.isfinite(metrics["train_loss"])
    assert metrics["train_loss"] > 0 and "teacher_agreement" in metrics
    with open(out / "config.json") as f:
        assert json.load(f)["view_spec"]["name"] == "consistent"
    index = load_index(train_dir)
    # every step: the teacher on its own view (the second stream), the student on the first;
    # the teacher on the student's very view (online mode) would give another loss
    check_steps_by_hand(
        cfg,
        teacher_on_stream(index, INDEPENDENT_STREAM),
        lambda rows, pixels, p: [
            kl_by_hand(
                initial_logits(STUDENT, NUM_CLASSES, cfg.seed, pixels), teacher_probs(pixels)
            )
        ],
    )


@pytest.mark.parametrize("mode", ["online", "independent"])
def test_independent_and_online_differ_only_in_the_teachers_view(
    mode, train_dir, val_dir, tmp_path
):
    """Same student views and order (the student stream's); only the teacher's input (hence the
    loss) changes: online, the student's very view; independent, the teacher's own view."""
    cfg = train_cfg(
        train_dir, val_dir, tmp_path / mode, mode, teacher=TEACHER, views="consistent", lr=TINY_LR
    )
    fit(cfg)
    index = load_index(train_dir)
    streams = {"online": STUDENT_STREAM, "independent": INDEPENDENT_STREAM}
    other = {"online": "independent", "independent": "online"}[mode]
    wrong = teacher_on_stream(index, streams[other])
    check_steps_by_hand(
        cfg,
        teacher_on_stream(index, streams[mode]),
        lambda rows, pixels, p: [
            kl_by_hand(initial_logits(STUDENT, NUM_CLASSES, cfg.seed, pixels), wrong(rows, pixels))
        ],
    )


def test_independent_needs_a_teacher(train_dir, val_dir, tmp_path):
    with pytest.raises(KdcacheError, match="--teacher"):
        fit(train_cfg(train_dir, val_dir, tmp_path / "run", "independent"))


# -- online vs cached on consistent views ---------------------------------------------------


def test_online_and_cached_agree_on_consistent_views(
    consistent_cache, train_dir, val_dir, tmp_path
):
    """K = C: the cached target is the live teacher's up to fp16 rounding of its logits."""
    assert open_cache(consistent_cache).topk == NUM_CLASSES
    cached_out, online_out = tmp_path / "cached", tmp_path / "online"
    fit(train_cfg(train_dir, val_dir, cached_out, "cached", cache=consistent_cache))
    fit(train_cfg(train_dir, val_dir, online_out, "online", teacher=TEACHER, views="consistent"))
    cached, online = read_metrics(cached_out)[0], read_metrics(online_out)[0]
    with open(cached_out / "config.json") as f:
        assert json.load(f)["view_spec"]["name"] == "consistent"  # the cache decided
    assert abs(cached["train_loss"] - online["train_loss"]) < 1e-3, (cached, online)


@pytest.mark.parametrize("preset", ["center", "consistent"])
def test_verify_works_on_every_preset(preset, train_dir, tmp_path):
    from kdcache.cache.verify import verify

    out = str(tmp_path / f"{preset}.zarr")
    precompute(cache_config(train_dir, out, views=preset, epochs=1))
    result = verify(out, train_dir, TEACHER, samples=12, device="cpu")
    assert result["checked"] == 12 and result["top1_agreement"] == 1.0
