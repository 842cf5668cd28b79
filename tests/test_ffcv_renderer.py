"""FFCV's renderer: its crops are FFCV's own decode-and-resize of kdcache's boxes, its caches
replay exactly through it and are refused through Pillow's, and verify measures the gap."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import TEACHER, cache_config, model_input, small_run
from PIL import Image

from kdcache import ffcv_renderer
from kdcache.cli.shards import ShardWriter
from kdcache.errors import KdcacheError
from kdcache.render import PILLOW, get_renderer

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(
        not ffcv_renderer.available(),
        reason="the ffcv extra is not installed (it builds against OpenCV and libjpeg-turbo)",
    ),
]

SIZE = 24


def jpeg(rng: np.random.Generator, label: int, h: int, w: int) -> bytes:
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 5 + label * 30) % 256, (y * 7) % 256, (x + y) * 3 % 256], -1)
    img = np.clip(base + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for split, n, per in (("train", 20, 8), ("val", 6, 6)):
        writer = ShardWriter(str(root / split), split, per)
        for i in range(n):
            h, w = int(rng.integers(30, 60)), int(rng.integers(30, 60))
            writer.write(f"{split}-{i:04d}", jpeg(rng, i % 4, h, w), "jpg", i % 4)
        writer.close()
    return str(root / "train"), str(root / "val")


@pytest.fixture(scope="module")
def ffcv_cache(tmp_path_factory, jpegs) -> str:
    from kdcache.cache import precompute

    out = str(tmp_path_factory.mktemp("ffcv") / "c.zarr")
    precompute(cache_config(jpegs[0], out, renderer="ffcv", teacher_image_size=SIZE, num_classes=4))
    return out


def test_crops_are_ffcvs_decode_and_inter_area_resize(jpegs):
    import cv2
    from ffcv.libffcv import imdecode

    from kdcache.data.webdataset import expand_data, read_unit

    sample = read_unit(expand_data(jpegs[0])[0])[0]
    h, w = Image.open(io.BytesIO(sample.data)).size[::-1]
    ours = ffcv_renderer.imdecode(sample.data, h, w)
    theirs = np.empty((h, w, 3), np.uint8)
    imdecode(np.frombuffer(sample.data, np.uint8), theirs, h, w, h, w, 0, 0, 1, 1, False, False)
    assert np.array_equal(ours, theirs)
    box = np.array([3, 5, h - 9, w - 7])
    crop = ffcv_renderer.FFCV.crop_resize(ours, box, True, SIZE, "bilinear")
    want = cv2.resize(ours[3 : h - 6, 5 : w - 2], (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    assert np.array_equal(crop, want[:, ::-1])
    pillow = PILLOW.crop_resize(PILLOW.decode(sample.data, h, w), box, True, SIZE, "bilinear")
    assert not np.array_equal(crop, pillow)  # another arithmetic
    with pytest.raises(ValueError, match="JPEG only"):
        ffcv_renderer.imdecode(b"\x89PNG\r\n", h, w)


def test_the_renderer_refuses_ops_it_cannot_render():
    from kdcache.views import get_spec

    get_renderer("ffcv").check(get_spec("inception_crop|flip|mix"))
    with pytest.raises(KdcacheError, match="randaugment .*--renderer pillow"):
        get_renderer("ffcv").check(get_spec("inception_crop|flip|randaugment(2, 9)"))


def test_a_ffcv_cache_records_its_renderer_and_replays_exactly(ffcv_cache, jpegs):
    from conftest import assert_teacher_reproduces

    from kdcache.cache.inspect import summary
    from kdcache.data.index import load_index
    from kdcache.models import create_model
    from kdcache.store import open_cache
    from kdcache.train.batches import EpochData, TrainBatches
    from kdcache.train.order import epoch_order, rank_batches

    cache, index = open_cache(ffcv_cache), load_index(jpegs[0])
    assert cache.meta["renderer"] == ffcv_renderer.RENDERER
    assert summary(cache)["renderer"] == ffcv_renderer.RENDERER
    teacher = create_model(TEACHER, 4, seed=0).eval()
    agree = total = 0
    for epoch in range(cache.epochs):
        batches = rank_batches(epoch_order(index.counts, 0, epoch, 2), 8)
        data = TrainBatches(
            EpochData(
                index,
                batches,
                epoch,
                SIZE,
                cache.spec,
                cache.plan_seed,
                cache=cache,
                cache_epoch=epoch,
                renderer=get_renderer("ffcv"),
            )  # fmt: skip
        )
        for b in range(len(data)):
            item = data[b]
            agree += assert_teacher_reproduces(teacher, model_input(item), item, cache.topk)
            total += len(item["rows"])
    assert agree == total >= cache.epochs * index.num_samples  # top-1 agreement 1.0


def test_the_trainer_refuses_a_cache_of_the_other_renderer(ffcv_cache, jpegs, tmp_path):
    from kdcache.train import fit

    cfg = small_run(*jpegs, tmp_path / "run", teacher_mode="cached", cache=ffcv_cache)
    with pytest.raises(KdcacheError, match=r"renderer: cache has 'ffcv-turbojpeg-area-v1'.*"
                       r"--renderer pillow\|ffcv"):  # fmt: skip
        fit(cfg)
    cfg = small_run(
        *jpegs, tmp_path / "ok", teacher_mode="cached", cache=ffcv_cache, renderer="ffcv",
        image_size=SIZE, epochs=1,
    )  # fmt: skip
    assert fit(cfg)["epoch"] == 1  # epochs done


def test_verify_through_its_own_and_the_other_renderer(ffcv_cache, jpegs):
    from kdcache.cache.verify import verify

    same = verify(ffcv_cache, jpegs[0], TEACHER, None, 40, 0, "cpu", workers=0)
    assert same["top1_agreement"] == 1.0 and "renderer" not in same
    other = verify(ffcv_cache, jpegs[0], TEACHER, None, 40, 0, "cpu", workers=0,
                   renderer="pillow")  # fmt: skip
    assert other["renderer"] == "pil-bilinear-v1"
    assert other["cache_renderer"] == ffcv_renderer.RENDERER
    assert other["max_abs_logit_error"] > 0  # other pixels: the logits move


def test_png_data_is_refused_by_the_ffcv_renderer(train_dir, tmp_path):
    from kdcache.cache import precompute

    with pytest.raises(KdcacheError, match="decodes JPEG only.*is a PNG.*--renderer pillow"):
        precompute(cache_config(train_dir, str(tmp_path / "png.zarr"), renderer="ffcv"))
