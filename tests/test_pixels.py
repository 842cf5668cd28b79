"""8-bit batches, finished on the device: bit-identical on the CPU to the worker-side render
(``pil-bilinear-v1``) that every cache was made with, for each mixing op and convention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache import pixels
from kdcache.render import IMAGENET, InputConvention, render_views, renders_8bit
from kdcache.views import PRESETS, get_spec, sample_unit_views

HALF = InputConvention((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

SPECS = [
    "function_matching",
    "consistent",
    "center",
    "inception_crop|flip|cutmix",
    "inception_crop|flip|mix(mixup=0.8, cutmix=1.0)",
    "inception_crop|flip|mixup(alpha=0.2)",
    "inception_crop|flip|randaugment(2, 9)|color_jitter(0.4)|erase(p=0.5)|mixup",
]


def _images(n: int, seed: int = 7) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        100 + i: rng.integers(
            0, 256, (int(rng.integers(20, 90)), int(rng.integers(20, 90)), 3), dtype=np.uint8
        )
        for i in range(n)
    }


def _views(text: str, images: dict) -> tuple:
    spec = PRESETS.get(text) or get_spec(text)
    sizes = np.array([im.shape[:2] for im in images.values()])
    return sample_unit_views(spec, 3, 1, 100, sizes), np.array(list(images))


@pytest.mark.parametrize("text", SPECS)
@pytest.mark.parametrize("convention", [IMAGENET, HALF], ids=["imagenet", "half"])
def test_device_finish_is_bit_identical_to_the_worker_render(text, convention):
    images = _images(40)
    views, rows = _views(text, images)
    assert renders_8bit(views.spec)
    item: dict = {}
    pixels.ship(item, "pixels", views, rows, images, 24)
    assert item["pixels"].dtype == torch.uint8
    got = pixels.take(item, "pixels", convention, "cpu")
    want = render_views(views, rows, images, 24, convention)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, want)
    # taking again (the teacher's convention from the student's render) leaves the batch as is
    assert torch.equal(pixels.take(item, "pixels", convention, "cpu"), want)


def test_mixed_batches_move_half_the_bytes_and_unmixed_a_quarter():
    images = _images(32)
    for text, ratio in (("function_matching", 2.0), ("consistent", 4.0)):
        views, rows = _views(text, images)
        item: dict = {}
        pixels.ship(item, "pixels", views, rows, images, 32)
        floats = render_views(views, rows, images, 32, IMAGENET)
        shipped = pixels.shipped_bytes(item)
        assert floats.numel() * 4 / shipped == pytest.approx(ratio, rel=0.01)


def test_ops_after_the_mix_ship_floats_and_still_match():
    images = _images(24)
    views, rows = _views("inception_crop|flip|mixup|erase(p=0.5)", images)
    assert not renders_8bit(views.spec)
    item: dict = {}
    pixels.ship(item, "pixels", views, rows, images, 16)
    assert item["pixels"].dtype == torch.float32
    assert torch.equal(
        pixels.take(item, "pixels", HALF, "cpu"), render_views(views, rows, images, 16, HALF)
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("text", SPECS)
def test_on_cuda_the_finish_is_bit_identical_too(text):
    images = _images(40)
    views, rows = _views(text, images)
    item: dict = {}
    pixels.ship(item, "pixels", views, rows, images, 24)
    got = pixels.take(item, "pixels", IMAGENET, "cuda")
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got.cpu(), render_views(views, rows, images, 24, IMAGENET))
