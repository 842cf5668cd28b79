"""kdcache.randaugment against timm's own AugmentOp, pixel for pixel.

timm's ``auto_augment.py`` needs only PIL and numpy, so it is loaded straight from the installed
file: importing the ``timm`` package would pull in torch and cost seconds.
"""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdcache import randaugment as ra

if importlib.util.find_spec("timm") is None:
    pytest.skip("timm is not installed (pip install -e '.[timm]')", allow_module_level=True)

MAGNITUDES = (0, 0.5, 3.7, 9, 9.62, 10)
FILTERS = {False: Image.Resampling.BILINEAR, True: Image.Resampling.BICUBIC}


def _load_timm_auto_augment():
    path = Path(importlib.util.find_spec("timm").origin).parent / "data" / "auto_augment.py"
    spec = importlib.util.spec_from_file_location("_timm_auto_augment", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:  # a timm whose auto_augment imports the package: take the slow way
        import timm.data.auto_augment as module
    return module


@pytest.fixture(scope="module")
def timm_aa():
    return _load_timm_auto_augment()


def _image(height: int, width: int, seed: int) -> Image.Image:
    """Gradients, a block and noise in a narrow range: autocontrast and equalize have work."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([40 + 3 * x, 60 + 2 * y, 90 + x + y], axis=-1).astype(np.float64)
    base[height // 4 : height // 2, width // 3 : 2 * width // 3] += (70, -30, 20)
    noisy = base + rng.normal(0, 12, size=base.shape)
    return Image.fromarray(np.clip(noisy, 20, 230).astype(np.uint8), "RGB")


IMAGES = (_image(29, 37, 0), _image(64, 64, 1), _image(17, 48, 2))


def _timm_op(timm_aa, name, magnitude, bicubic, fill=ra.FILL):
    hparams = {
        "magnitude_std": 0,
        "img_mean": fill,
        "interpolation": FILTERS[bicubic],
        "translate_pct": 0.45,
    }
    return timm_aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)


def _run_timm(op, image, negate, monkeypatch) -> tuple[np.ndarray | None, int]:
    """timm's output (None where timm raises) and how often it drew random.random."""
    calls = []

    def fake_random():  # `_randomly_negate` negates when random.random() > 0.5
        calls.append(None)
        return 0.75 if negate else 0.25

    with monkeypatch.context() as patch:
        patch.setattr(random, "random", fake_random)
        try:
            out = np.asarray(op(image))
        except ValueError:
            out = None
    return out, len(calls)


def test_ops_are_timms_increasing_set(timm_aa):
    assert list(ra.OPS) == list(timm_aa._RAND_INCREASING_TRANSFORMS)
    assert ra.SIGNED.issubset(ra.OPS) and ra.GEOMETRIC.issubset(ra.OPS)
    assert ra.MAGNITUDE_MAX == timm_aa._LEVEL_DENOM


def test_fill_is_timms_imagenet_mean():
    mean = (0.485, 0.456, 0.406)  # timm.data.IMAGENET_DEFAULT_MEAN
    assert tuple(min(255, round(255 * m)) for m in mean) == ra.FILL


def test_geometric_is_where_timm_draws_a_filter(timm_aa, monkeypatch):
    draws = []
    monkeypatch.setattr(random, "choice", lambda seq: draws.append(seq) or seq[0])
    for name in ra.OPS:
        draws.clear()
        op = timm_aa.AugmentOp(name, prob=1.0, magnitude=5, hparams={"magnitude_std": 0})
        op(IMAGES[0])
        assert (len(draws) == 1) == (name in ra.GEOMETRIC), name


@pytest.mark.parametrize("index", range(len(ra.OPS)), ids=ra.OPS)
def test_op_matches_timm(timm_aa, monkeypatch, index):
    name = ra.OPS[index]
    for magnitude in MAGNITUDES:
        for bicubic in (False, True):
            timm_op = _timm_op(timm_aa, name, magnitude, bicubic)
            for negate in (False, True):
                for image in IMAGES:
                    expected, sign_draws = _run_timm(timm_op, image, negate, monkeypatch)
                    assert sign_draws == (name in ra.SIGNED), name
                    out = ra.apply_op(image, index, magnitude, negate, bicubic)
                    assert out is not image and out.mode == "RGB" and out.size == image.size
                    where = f"{name} m={magnitude} negate={negate} bicubic={bicubic} {image.size}"
                    if expected is None:  # see test_posterize_keeps_no_bits_at_magnitude_10
                        assert (name, magnitude) == ("PosterizeIncreasing", 10), where
                        continue
                    assert np.array_equal(np.asarray(out), expected), where


def test_posterize_keeps_no_bits_at_magnitude_10(timm_aa, monkeypatch):
    """timm asks for 0 bits; recent Pillow (13 here) raises there, older Pillow (and TF) give black."""
    index = ra.OPS.index("PosterizeIncreasing")
    out = np.asarray(ra.apply_op(IMAGES[0], index, 10, False, False))
    assert not out.any()
    expected, _ = _run_timm(
        _timm_op(timm_aa, "PosterizeIncreasing", 10, False), IMAGES[0], False, monkeypatch
    )
    if expected is not None:
        assert np.array_equal(out, expected)


@pytest.mark.parametrize("name", sorted(ra.GEOMETRIC))
def test_fill_matches_timm_img_mean(timm_aa, monkeypatch, name):
    fill = (250, 3, 77)
    timm_op = _timm_op(timm_aa, name, 9, True, fill=fill)
    expected, _ = _run_timm(timm_op, IMAGES[1], True, monkeypatch)
    out = ra.apply_op(IMAGES[1], ra.OPS.index(name), 9, True, True, fill=fill)
    assert np.array_equal(np.asarray(out), expected)
    assert (np.asarray(out) == fill).all(axis=-1).any()  # the fill does show


@pytest.mark.parametrize(
    ("image", "op", "magnitude", "fill", "match"),
    [
        (IMAGES[0].convert("L"), 0, 5, ra.FILL, "mode 'L'"),
        (IMAGES[0].convert("RGBA"), 3, 5, ra.FILL, "mode 'RGBA'"),
        (IMAGES[0], len(ra.OPS), 5, ra.FILL, "op index 15"),
        (IMAGES[0], -1, 5, ra.FILL, "op index -1"),
        (IMAGES[0], 3, 10.5, ra.FILL, "clip it first"),
        (IMAGES[0], 3, -0.1, ra.FILL, "clip it first"),
        (IMAGES[0], 3, float("nan"), ra.FILL, "clip it first"),
        (IMAGES[0], 3, 5, (1, 2), "RGB colour"),
        (IMAGES[0], 3, 5, (1, 2, 256), "RGB colour"),
    ],
)
def test_bad_arguments_say_what_is_wrong(image, op, magnitude, fill, match):
    with pytest.raises(ValueError, match=match):
        ra.apply_op(image, op, magnitude, False, False, fill=fill)


def test_imports_neither_timm_nor_torch():
    code = (
        "import sys, kdcache.randaugment; "
        "assert 'timm' not in sys.modules and 'torch' not in sys.modules, "
        "sorted(m for m in sys.modules if m.split('.')[0] in ('timm', 'torch'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
