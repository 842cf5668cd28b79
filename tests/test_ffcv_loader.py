"""FFCV's loader driving kdcache's views (``--loader ffcv``): its batches are the DataLoader's
with ``--renderer ffcv``, bit for bit, in kdcache's order, and a run trains the same steps."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import cache_config, model_input, read_steps, small_run
from test_ffcv_renderer import SIZE, jpegs  # noqa: F401 (the fixture)

pytest.importorskip(
    "ffcv", reason="the ffcv extra is not installed (it builds against OpenCV and libjpeg-turbo)"
)

from kdcache.cli.shards import write_beton  # noqa: E402
from kdcache.data.index import load_index  # noqa: E402
from kdcache.errors import KdcacheError  # noqa: E402
from kdcache.render import get_renderer  # noqa: E402
from kdcache.train import fit  # noqa: E402
from kdcache.train.batches import EpochData, TrainBatches  # noqa: E402
from kdcache.train.ffcv_loader import FfcvEpochs  # noqa: E402
from kdcache.train.order import epoch_order, rank_batches  # noqa: E402
from kdcache.views import get_spec  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def betons(tmp_path_factory, jpegs) -> tuple[str, str]:  # noqa: F811
    out = str(tmp_path_factory.mktemp("jpeg-beton"))
    return (write_beton(f"shards:{jpegs[0]}", out, "train"),
            write_beton(f"shards:{jpegs[1]}", out, "val"))  # fmt: skip


@pytest.fixture(scope="module")
def beton_cache(tmp_path_factory, betons) -> str:
    from kdcache.cache import precompute

    out = str(tmp_path_factory.mktemp("bc") / "c.zarr")
    precompute(
        cache_config(betons[0], out, renderer="ffcv", teacher_image_size=SIZE, num_classes=4)
    )
    return out


def test_ffcv_batches_are_the_dataloaders_bit_for_bit(betons):
    """Mixup and CutMix rows (``mix``), flips, two loader threads, two epochs."""
    views, threads = "inception_crop|flip|mix", 2
    index = load_index(betons[0])
    ffcv = FfcvEpochs(betons[0], index.size, SIZE, threads)
    try:
        for epoch in (0, 1):  # the table is rewritten between epochs
            batches = rank_batches(epoch_order(index.counts, 5, epoch, 2), 6)
            if epoch == 0:  # a resumed epoch first: the loader is made on a shorter order
                batches = batches[2:]
            data = EpochData(index, batches, epoch, SIZE, get_spec(views), 3,
                             renderer=get_renderer("ffcv"))  # fmt: skip
            ours = list(ffcv.items(TrainBatches(data)))
            torch_items = TrainBatches(data)
            assert len(ours) == len(batches)
            for b, item in enumerate(ours):
                want = torch_items[b]
                for name in ("rows", "label", "partner_label", "lam"):
                    assert torch.equal(item[name], want[name]), name
                assert torch.equal(model_input(item), model_input(want))
    finally:
        ffcv.close()


def test_a_run_through_ffcvs_loader_trains_the_dataloaders_steps(betons, beton_cache, tmp_path):
    kw = dict(teacher_mode="cached", cache=beton_cache, renderer="ffcv", image_size=SIZE,
              epochs=2, batch_size=6)  # fmt: skip
    fit(small_run(*betons, tmp_path / "torch", **kw))
    fit(small_run(*betons, tmp_path / "ffcv", loader="ffcv", **kw))
    a, b = read_steps(tmp_path / "torch"), read_steps(tmp_path / "ffcv")
    assert len(a) == len(b) > 0
    assert [s["loss"] for s in a] == [s["loss"] for s in b]
    # stopped inside the first epoch and resumed: a new FFCV loader, made on the shorter rest
    stopped = small_run(*betons, tmp_path / "stopped", loader="ffcv", checkpoint_every=1, **kw)

    def stop(epoch: int, step: int, steps: int, loss: float) -> None:
        if (epoch, step) == (0, 1):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(stopped, on_step=stop)
    fit(dataclasses.replace(stopped, resume=True))
    want = torch.load(tmp_path / "torch" / "model.pt")
    got = torch.load(tmp_path / "stopped" / "model.pt")
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_the_ffcv_loader_says_what_it_needs(betons, jpegs, tmp_path):  # noqa: F811
    with pytest.raises(KdcacheError, match="is not a .beton.*pass --renderer ffcv"):
        fit(small_run(*jpegs, tmp_path / "a", loader="ffcv"))
    with pytest.raises(KdcacheError, match="drop --views-per-decode"):
        fit(small_run(*betons, tmp_path / "b", loader="ffcv", renderer="ffcv",
                      views_per_decode=2, epochs=2))  # fmt: skip
    with pytest.raises(KdcacheError, match="ops after their mixing op: put the flip before"):
        fit(small_run(*betons, tmp_path / "c", loader="ffcv", renderer="ffcv",
                      views="inception_crop|mixup|flip", image_size=SIZE))  # fmt: skip
    assert np.all(load_index(betons[0]).size > 0)


@pytest.mark.slow
def test_torchrun_with_the_ffcv_loader_trains_the_dataloaders_steps(betons, beton_cache, tmp_path):
    """Two ranks, each with its own FFCV loader over its half of every global batch."""
    from test_distributed import torchrun

    common = ["train", "--data", betons[0], "--val", betons[1], "--student", "kdcache:tiny_cnn",
              "--epochs", 2, "--cache", beton_cache, "--renderer", "ffcv", "--image-size", SIZE,
              "--batch-size", 8, "--workers", 1, "--device", "cpu"]  # fmt: skip
    torchrun(*common, "--out", tmp_path / "torch", "--loader", "torch")
    torchrun(*common, "--out", tmp_path / "ffcv", "--loader", "ffcv")
    a, b = read_steps(tmp_path / "torch"), read_steps(tmp_path / "ffcv")
    assert len(a) == len(b) > 0
    assert [s["loss"] for s in a] == [s["loss"] for s in b]


def test_a_dead_ffcv_thread_is_an_error_not_a_hang():
    import queue

    from kdcache.train.ffcv_loader import _next

    class Dead:  # an epoch iterator whose thread died before queueing its batch
        output_queue: queue.Queue = queue.Queue()

        def is_alive(self) -> bool:
            return False

    with pytest.raises(KdcacheError, match="FFCV's loader thread stopped"):
        _next(Dead())
