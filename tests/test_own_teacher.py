"""Bring your own teacher: a user's pretrained teacher with its own class space and input
convention, on the user's own images, labelled or not (issue 10).

Everything runs through the CLI (``run_cli``) as a new user would, with a teacher factory in a
module of the current directory (``myteachers.py``), a 1000-class head and mean/std 0.5.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import textwrap

import numpy as np
import pytest
import torch
from conftest import png, run_cli
from PIL import Image

from kdcache import schema
from kdcache.cache.inspect import summary
from kdcache.cli.shards import ShardWriter
from kdcache.models import load_model, resolve_convention
from kdcache.render import IMAGENET
from kdcache.store import open_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = ("--workers", "0", "--device", "cpu")
HALF = "0.5,0.5,0.5"
IMAGENET_ARGS = ("--teacher-mean", "0.485,0.456,0.406", "--teacher-std", "0.229,0.224,0.225")
LEGACY = os.path.join(os.path.dirname(__file__), "data", "legacy-v1")

TEACHERS = '''
import torch
from torch import nn


def big():
    """A pretrained-style model: its own 1000-class head and mean/std 0.5, like many timm nets."""
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 1000),
    )
    m.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"}
    return m


def insists(num_classes=1000):
    if num_classes != 1000:
        raise ValueError("this checkpoint has 1000 classes")
    return big()


def ignores(num_classes=10):
    return big()


def broken():
    raise RuntimeError("no GPU driver")
'''


def photo(rng: np.random.Generator, label: int) -> bytes:
    h, w = rng.integers(36, 52, size=2)
    base = np.array([label * 60, 255 - label * 60, (label * 97) % 256])
    a = np.clip(base + rng.integers(-40, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def ok(*argv) -> str:
    code, out, err = run_cli(*argv, "--json")
    assert code == 0, (argv, err[-3000:])
    return out


def result(*argv) -> dict:
    return json.loads(ok(*argv).strip().splitlines()[-1])


def one_line_error(argv: tuple, *needles: str) -> str:
    code, _, err = run_cli(*argv)
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err[-3000:])
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert len(lines[0]) < 600, lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> dict[str, str]:
    """A user's folder: photos in 4 class folders (train), 4 more (val), 8 without classes, the
    teacher factories in myteachers.py and the teacher's weights as .pt and .safetensors."""
    root = tmp_path_factory.mktemp("user")
    rng = np.random.default_rng(11)
    for split, n in (("train", 12), ("val", 4)):
        for i in range(n):
            folder = root / "photos" / split / f"class{i % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:03d}.jpg").write_bytes(photo(rng, i % 4))
    flat = root / "unlabelled"
    flat.mkdir()
    for i in range(8):
        (flat / f"img{i}.jpg").write_bytes(photo(rng, i % 4))
    (root / "myteachers.py").write_text(textwrap.dedent(TEACHERS))
    old = os.getcwd()
    os.chdir(root)
    try:
        for split in ("train", "val"):
            ok("shards", "--from", f"imagefolder:{root / 'photos'}", "--out", root / "data",
               "--split", split, "--shard-size", "6")  # fmt: skip
        ok("shards", "--from", f"imagefolder:{flat}", "--out", root / "flat", "--shard-size", "4")
        model = load_model("myteachers:big", image_size=32).module
        torch.save({"state_dict": model.state_dict()}, root / "big.pt")
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(root / "big.safetensors"))
    finally:
        os.chdir(old)
    return {
        "root": str(root),
        "train": str(root / "data" / "train-*.tar"),
        "val": str(root / "data" / "val-*.tar"),
        "flat": str(root / "flat"),
    }


@pytest.fixture
def in_user_dir(user, monkeypatch):
    """The user's commands run in their folder, where myteachers.py is."""
    monkeypatch.chdir(user["root"])
    return user


def precompute_argv(user: dict, out: str, *extra: str) -> tuple:
    return (
        "precompute", "--data", user["train"], "--teacher", "myteachers:big",
        "--teacher-weights", os.path.join(user["root"], "big.safetensors"), "--out", out,
        "--epochs", "2", "--teacher-image-size", "32", "--batch-size", "8", *CPU, *extra,
    )  # fmt: skip


def train_argv(user: dict, out: str, cache: str, *extra: str) -> tuple:
    return (
        "train", "--data", user["train"], "--val", user["val"], "--student", "kdcache:tiny_cnn",
        "--out", out, "--epochs", "1", "--cache", cache, "--image-size", "16",
        "--batch-size", "4", *CPU, *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def big_cache(user, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("big") / "big.zarr")
    old = os.getcwd()
    os.chdir(user["root"])
    try:
        ok(*precompute_argv(user, out))
    finally:
        os.chdir(old)
    return out


# -- class spaces ------------------------------------------------------------------------


def test_a_1000_class_teacher_on_4_class_data(in_user_dir, big_cache, tmp_path):
    cache = open_cache(big_cache)
    assert cache.num_classes == 1000 and cache.topk == 10
    assert cache.meta["teacher_input"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert cache.meta["teacher_interpolation"] == "bicubic"
    index = cache.read_unit(0, 0)["topk_index"]
    assert index.max() >= 4  # real class ids of the teacher's space, not the labels'
    weights = os.path.join(in_user_dir["root"], "big.pt")  # the same teacher, wrapped .pt
    checked = result(
        "verify", big_cache, "--data", in_user_dir["train"], "--teacher", "myteachers:big",
        "--teacher-weights", weights, "--samples", "20", *CPU,
    )  # fmt: skip
    assert checked["checked"] == 20 and checked["top1_agreement"] == 1.0
    run = str(tmp_path / "run")
    metrics = result(*train_argv(in_user_dir, run, big_cache, "--teacher", "myteachers:big",
                                 "--teacher-weights", weights))  # fmt: skip
    assert metrics["val_accuracy"] is None and metrics["accuracy_basis"] == "none"
    assert 0 <= metrics["teacher_agreement"] <= metrics["teacher_agreement_top5"] <= 1
    assert metrics["teacher_kl"] > 0
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    assert config["num_classes"] == 1000 and config["teacher_input"]["mean"] == [0.5] * 3
    scores = result("eval", run, "--data", in_user_dir["val"], "--teacher", "myteachers:big",
                    "--teacher-weights", weights, *CPU)  # fmt: skip
    assert scores["accuracy"] is None and scores["accuracy_basis"] == "none"
    assert scores["teacher_agreement"] == metrics["teacher_agreement"]
    assert scores["teacher_kl"] == pytest.approx(metrics["teacher_kl"], rel=1e-5)


def test_a_label_map_scores_accuracy(in_user_dir, big_cache, tmp_path):
    label_map = tmp_path / "map.json"
    label_map.write_text(json.dumps({"0": 281, "1": 285, "2": 207, "3": 1}))
    metrics = result(*train_argv(in_user_dir, str(tmp_path / "run"), big_cache,
                                 "--label-map", label_map))  # fmt: skip
    assert metrics["accuracy_basis"] == "label_map" and 0 <= metrics["val_accuracy"] <= 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([0, 1000]))
    one_line_error(train_argv(in_user_dir, str(tmp_path / "r2"), big_cache, "--label-map", bad),
                   "label map", "out of range")  # fmt: skip


def test_another_input_convention_is_refused(in_user_dir, big_cache, tmp_path):
    weights = os.path.join(in_user_dir["root"], "big.pt")
    verify = ("verify", big_cache, "--data", in_user_dir["train"], "--teacher", "myteachers:big",
              "--teacher-weights", weights, *CPU)  # fmt: skip
    line = one_line_error((*verify, *IMAGENET_ARGS), "teacher_input", "0.5", "0.485")
    assert "cache has" in line
    one_line_error(
        train_argv(in_user_dir, str(tmp_path / "run"), big_cache, "--teacher", "myteachers:big",
                   "--teacher-weights", weights, *IMAGENET_ARGS),
        "teacher_input",
    )  # fmt: skip
    resumed = precompute_argv(in_user_dir, big_cache, *IMAGENET_ARGS)
    one_line_error(resumed, "teacher_input")


@pytest.mark.parametrize(
    "spec,extra,needles",
    [
        ("myteachers:insists", ("--num-classes", "4"), ("failed with num_classes=4", "ValueError")),
        ("myteachers:ignores", ("--num-classes", "4"), ("has 1000 outputs", "4 classes")),
        ("myteachers:broken", (), ("myteachers:broken' failed", "RuntimeError: no GPU driver")),
        ("notamodule:make", (), ("cannot import 'notamodule'", "current directory")),
    ],
)
def test_a_factory_that_cannot_build_is_one_sentence(in_user_dir, tmp_path, spec, extra, needles):
    argv = ("precompute", "--data", in_user_dir["train"], "--teacher", spec, "--out",
            tmp_path / "c.zarr", "--epochs", "1", "--teacher-image-size", "32", *CPU, *extra)  # fmt: skip
    one_line_error(argv, *needles)
    assert not os.path.exists(tmp_path / "c.zarr")


def test_weights_that_do_not_fit_are_summarised(in_user_dir, tmp_path):
    weights = tmp_path / "tiny.pt"
    torch.save(load_model("kdcache:tiny_cnn", image_size=16, num_classes=4).module.state_dict(),
               weights)  # fmt: skip
    argv = ("precompute", "--data", in_user_dir["train"], "--teacher", "myteachers:big",
            "--teacher-weights", weights, "--out", tmp_path / "c.zarr", "--epochs", "1", *CPU)  # fmt: skip
    one_line_error(argv, "do not fit", "missing keys", "unexpected keys")
    head = tmp_path / "head.pt"  # the right net with a 4-class head: the hint names the width
    net = load_model("kdcache:tiny_cnn", image_size=16, num_classes=4).module
    torch.save(net.state_dict(), head)
    argv = ("precompute", "--data", in_user_dir["train"], "--teacher", "kdcache:tiny_cnn",
            "--teacher-weights", head, "--num-classes", "10", "--out", tmp_path / "d.zarr",
            "--epochs", "1", *CPU)  # fmt: skip
    one_line_error(argv, "keys of another shape", "head has 4 outputs", "--num-classes")


@pytest.mark.parametrize(
    "argv,needle",
    [
        (("--epochs", "0"), "--epochs must be at least 1"),
        (("--topk", "0"), "--topk must be at least 1"),
        (("--teacher-image-size", "0"), "--teacher-image-size must be at least 8"),
        (("--batch-size", "0"), "--batch-size must be at least 1"),
        (("--topk", "1001"), "more than the teacher's 1000 classes"),
    ],
)
def test_numbers_out_of_range_are_refused_before_work(in_user_dir, tmp_path, argv, needle):
    out = str(tmp_path / "c.zarr")
    one_line_error((*precompute_argv(in_user_dir, out), *argv), needle)
    assert not os.path.exists(out)


def test_train_options_out_of_range(in_user_dir, big_cache, tmp_path):
    for argv, needle in (
        (("--image-size", "0"), "--image-size must be at least 8"),
        (("--lr", "-1"), "--lr"),
        (("--workers", "-1"), "--workers"),
    ):
        one_line_error((*train_argv(in_user_dir, str(tmp_path / "r"), big_cache), *argv), needle)
    assert not os.path.exists(tmp_path / "r")


def test_resuming_with_another_student_is_one_sentence(in_user_dir, big_cache, tmp_path):
    run = str(tmp_path / "run")
    ok(*train_argv(in_user_dir, run, big_cache))
    argv = list(train_argv(in_user_dir, run, big_cache, "--resume", "--epochs", "2"))
    argv[argv.index("kdcache:tiny_cnn")] = "kdcache:resnet_s"
    one_line_error(tuple(argv), "kdcache:tiny_cnn", "--student kdcache:resnet_s")


# -- unlabelled data ------------------------------------------------------------------------


def test_unlabelled_images_distil(in_user_dir, tmp_path):
    flat = in_user_dir["flat"]
    out = str(tmp_path / "flat.zarr")
    argv = ("precompute", "--data", flat, "--teacher", "kdcache:resnet_s", "--out", out,
            "--epochs", "1", "--teacher-image-size", "16", *CPU)  # fmt: skip
    one_line_error(argv, "no labels", "--num-classes")  # a built-in needs a class count
    summary = result(*argv, "--num-classes", "4")
    assert summary["bad_rows"] == 0 and summary["images"] == 8
    assert (open_cache(out).read_unit(0, 0)["status"] == schema.OK).all()
    metrics = result("train", "--data", flat, "--val", flat, "--student", "kdcache:tiny_cnn",
                     "--out", tmp_path / "run", "--epochs", "1", "--cache", out,
                     "--image-size", "16", "--batch-size", "4", *CPU)  # fmt: skip
    assert metrics["skipped_rows"] == 0 and metrics["val_accuracy"] is None
    assert metrics["accuracy_basis"] == "none"
    # a loss with a hard-label term cannot train here: said before any work
    one_line_error(("train", "--data", flat, "--val", flat, "--student", "kdcache:tiny_cnn",
                    "--out", tmp_path / "ce", "--epochs", "1", "--cache", out, "--loss",
                    "kl+ce(w=0.1)", "--image-size", "16", *CPU),
                   "needs hard labels", "has no labels", "--label-map")  # fmt: skip
    assert not os.path.exists(tmp_path / "ce" / "config.json")
    one_line_error(("train", "--data", flat, "--val", flat, "--student", "kdcache:tiny_cnn",
                    "--out", tmp_path / "hard", "--epochs", "1", "--teacher-mode", "none",
                    "--num-classes", "4", "--image-size", "16", *CPU),
                   "trains on labels", "no label")  # fmt: skip


# -- batches with no usable row ---------------------------------------------------------


@pytest.fixture(scope="module")
def half_broken(tmp_path_factory) -> str:
    """Unit 0: 3 good images; unit 1: 3 images, none of which decodes."""
    out = tmp_path_factory.mktemp("half") / "train"
    rng = np.random.default_rng(3)
    writer = ShardWriter(str(out), "train", 3)
    for n in range(6):
        data = png(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) if n < 3 else b"junk"
        writer.write(f"s-{n}", data, "png", n % 2)
    writer.close()
    return str(out)


@pytest.mark.parametrize(
    "mode,workers",
    [("cached", 1), ("cached", 2), ("online", 1), ("online", 2), ("none", 1), ("fixed", 1),
     ("independent", 1)],
)  # fmt: skip
def test_a_batch_with_no_usable_row_steps(half_broken, tmp_path, mode, workers):
    cache = str(tmp_path / "c.zarr")
    if mode == "cached":
        result("precompute", "--data", half_broken, "--teacher", "kdcache:tiny_cnn", "--out",
               cache, "--epochs", "1", "--teacher-image-size", "16", *CPU)  # fmt: skip
    teacher = () if mode in ("cached", "none") else ("--teacher", "kdcache:tiny_cnn")
    run = tmp_path / "run"
    metrics = result(
        "train", "--data", half_broken, "--val", half_broken, "--student", "kdcache:tiny_cnn",
        "--out", run, "--epochs", "1", "--teacher-mode", mode, "--cache", cache,
        "--image-size", "16", "--batch-size", "1", "--workers", str(workers),
        "--device", "cpu", *teacher,
    )  # fmt: skip
    assert metrics["skipped_rows"] == 3 and np.isfinite(metrics["train_loss"])
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 6 and sum(s["loss"] == 0.0 for s in steps) == 3


# -- input conventions ---------------------------------------------------------------------


def test_each_model_resolves_its_own_convention():
    pytest.importorskip("timm")
    tv = load_model("torchvision:resnet18", image_size=32)
    assert tv.num_classes == 1000 and tv.convention.identity() == IMAGENET.identity()
    assert tv.convention.interpolation == "bilinear"
    half = load_model("timm:test_resnet.r160_in1k", image_size=32)
    assert half.num_classes == 1000 and half.convention.mean == (0.5, 0.5, 0.5)
    other = load_model("timm:test_efficientnet.r160_in1k", image_size=32)
    assert other.convention.identity() == IMAGENET.identity()
    assert other.convention.interpolation == "bicubic"
    assert load_model("kdcache:tiny_cnn", image_size=16, num_classes=3).convention == IMAGENET
    module = torch.nn.Linear(1, 1)
    module.input_mean, module.input_std = (0.1, 0.2, 0.3), (1, 1, 1)
    assert resolve_convention("me:f", module).mean == (0.1, 0.2, 0.3)
    assert resolve_convention("me:f", module, std=(2, 2, 2)).std == (2.0, 2.0, 2.0)


def test_a_timm_teacher_caches_and_verifies_with_its_convention(user, tmp_path):
    pytest.importorskip("timm")
    weights = tmp_path / "t.pt"
    torch.save(load_model("timm:test_resnet.r160_in1k", image_size=32).module.state_dict(),
               weights)  # fmt: skip
    out = str(tmp_path / "t.zarr")
    common = ("--data", user["train"], "--teacher", "timm:test_resnet.r160_in1k",
              "--teacher-weights", weights, *CPU)  # fmt: skip
    result("precompute", *common, "--out", out, "--epochs", "1", "--teacher-image-size", "32",
           "--views", "consistent")  # fmt: skip
    assert open_cache(out).meta["teacher_input"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    checked = result("verify", out, *common, "--samples", "12")
    assert checked["top1_agreement"] == 1.0 and checked["checked"] == 12
    one_line_error(("verify", out, *common, *IMAGENET_ARGS), "teacher_input")


# -- caches written before this issue --------------------------------------------------------


@pytest.fixture
def legacy(tmp_path) -> str:
    shutil.copytree(LEGACY, tmp_path / "legacy")
    return str(tmp_path / "legacy")


def test_a_schema_1_cache_still_verifies_trains_and_extends(legacy, tmp_path):
    cache = os.path.join(legacy, "cache.zarr")
    data, val = os.path.join(legacy, "train"), os.path.join(legacy, "val")
    opened = open_cache(cache)
    assert opened.schema_version == 1 and opened.teacher_input == IMAGENET
    checked = result("verify", cache, "--data", data, "--teacher", "kdcache:tiny_cnn", *CPU)
    assert checked["top1_agreement"] >= 0.99 and checked["checked"] == 16
    assert checked["status_counts"] == {"ok": 16, "bad input": 4}
    metrics = result("train", "--data", data, "--val", val, "--student", "kdcache:tiny_cnn",
                     "--out", tmp_path / "run", "--epochs", "2", "--cache", cache,
                     "--image-size", "16", "--batch-size", "4", *CPU)  # fmt: skip
    # label 7 makes 8 label classes against the teacher's 4: not the same space
    assert metrics["skipped_rows"] == 2 and metrics["accuracy_basis"] == "none"
    before = opened.read_unit(1, 0)["status"]
    made = result("precompute", "--data", data, "--teacher", "kdcache:tiny_cnn", "--out",
                  cache, "--epochs", "3", "--num-classes", "4", "--teacher-image-size", "16",
                  "--batch-size", "8", *CPU)  # fmt: skip
    assert made["bad_rows_by_reason"] == {"bad input": 2}  # the old rule, for epoch 2
    extended = open_cache(cache)
    assert (extended.read_unit(2, 0)["status"] == before).all()
    assert extended.read_unit(1, 0)["status"].tolist() == before.tolist()
    assert "schema 1" in summary(extended)["bad_row_rule"]


# -- small things --------------------------------------------------------------------------


def test_random_teacher_is_said_and_recorded(user, tmp_path):
    out = str(tmp_path / "r.zarr")
    code, _, err = run_cli("precompute", "--data", user["train"], "--teacher", "kdcache:tiny_cnn",
                           "--out", out, "--epochs", "1", "--teacher-image-size", "16", *CPU)  # fmt: skip
    assert code == 0 and "no --teacher-weights" in err
    assert summary(open_cache(out))["teacher_random_init"] is True


def test_quiet_has_no_bars_and_verify_says_when_it_checks_fewer(user, big_cache, tmp_path):
    weights = os.path.join(user["root"], "big.pt")
    old = os.getcwd()
    os.chdir(user["root"])
    try:
        code, out, err = run_cli("verify", big_cache, "--data", user["train"], "--teacher",
                                 "myteachers:big", "--teacher-weights", weights, "--samples",
                                 "500", "--batch-size", "5", "--json", *CPU)  # fmt: skip
        assert code == 0 and "verifying all 24 usable views" in err
        checked = json.loads(out.strip().splitlines()[-1])
        assert checked["checked"] == 24 and checked["requested"] == 500
        code, _, err = run_cli("verify", big_cache, "--data", user["train"], "--teacher",
                               "myteachers:big", "--teacher-weights", weights, "-q", *CPU)  # fmt: skip
        assert code == 0 and "view/s" not in err and "\r" not in err, err  # no bar
    finally:
        os.chdir(old)


def test_image_size_auto_and_the_upscale_warning(user, tmp_path):
    out = str(tmp_path / "a.zarr")
    code, _, err = run_cli("precompute", "--data", user["train"], "--teacher", "kdcache:tiny_cnn",
                           "--out", out, "--epochs", "1", "--teacher-image-size", "auto",
                           "--num-classes", "4", *CPU)  # fmt: skip
    assert code == 0, err
    assert open_cache(out).meta["teacher_image_size"] == 40  # median short side 36..51 -> 40
    code, _, err = run_cli("precompute", "--data", user["train"], "--teacher", "kdcache:tiny_cnn",
                           "--out", tmp_path / "b.zarr", "--epochs", "1", "--smoke",
                           "--teacher-image-size", "224", *CPU)  # fmt: skip
    assert code == 0 and "upscales the data's images" in err and "auto" in err


def test_teacher_and_student_of_other_conventions_get_their_own_pixels(train_dir):
    """One render at one size feeds both models, normalised each its own way: bit for bit the
    pixels each would get rendered alone (the student's are not the teacher's)."""
    from conftest import model_input

    from kdcache import pixels
    from kdcache.data.index import load_index
    from kdcache.render import InputConvention, render_views
    from kdcache.train.batches import EpochData, TrainBatches
    from kdcache.units import UnitReader
    from kdcache.views import get_spec, sample_unit_views

    index, spec = load_index(train_dir), get_spec("function_matching")
    half = InputConvention((0.5,) * 3, (0.5,) * 3)
    rows = np.arange(index.units[0].count)
    batch = TrainBatches(
        EpochData(index, [rows], 0, 16, spec, 0, teacher_image_size=16, teacher_input=half)
    )[0]
    views = sample_unit_views(spec, 0, 0, 0, index.size[rows])
    images, _ = UnitReader(index).decode(np.arange(index.units[0].count))
    student = model_input(batch)
    teacher = model_input(batch, pixels.teacher_name(batch), half)
    assert "teacher_pixels" not in batch  # one render feeds both
    assert torch.equal(student, render_views(views, rows, images, 16, IMAGENET))
    assert torch.equal(teacher, render_views(views, rows, images, 16, half))
    assert not torch.equal(student, teacher)
