"""The ``kdcache`` command end to end: shards -> index -> precompute -> inspect/verify -> train
-> eval on the digits data, error reporting, --smoke, --help, --version and the demo.

Commands run in-process through ``kdcache.cli.main`` (``run_cli``); only ``--version`` and
``python -m kdcache --help`` start real processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEACHER, copy_tree, run_cli

from kdcache.errors import KdcacheError
from kdcache.store import open_cache
from kdcache.version import __version__

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STUDENT = "kdcache:tiny_cnn"
CPU = ("--workers", "0", "--device", "cpu")
TRAIN_SAMPLES, VAL_SAMPLES = 300, 100


def last_json(stdout: str) -> dict:
    """``--json`` prints one JSON object as the last line of stdout."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "nothing on stdout"
    return json.loads(lines[-1])


def ok(*argv) -> tuple[str, str]:
    code, out, err = run_cli(*argv)
    assert code == 0, (argv, code, err[-2000:])
    return out, err


def assert_one_line_error(err: str, command: str, *needles: str) -> str:
    """A fixable problem: one ``kdcache COMMAND: error: ...`` line, no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    line = errors[0]
    assert line.startswith(f"kdcache {command}: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


# -- digits, end to end -------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("digits")
    d = root / "D"
    for split, limit in (("train", TRAIN_SAMPLES), ("val", VAL_SAMPLES)):
        ok(
            "shards",
            "--from",
            "digits",
            "--out",
            d,
            "--split",
            split,
            "--shard-size",
            100,
            "--limit",
            limit,
        )
    return {"root": str(root), "train": str(d / "train-*.tar"), "val": str(d / "val-*.tar")}


def precompute_args(digits: dict[str, str], out: str, epochs: int = 2) -> list:
    return [
        "precompute",
        "--data",
        digits["train"],
        "--teacher",
        TEACHER,
        "--out",
        out,
        "--epochs",
        epochs,
        "--teacher-image-size",
        16,
        *CPU,
        "--batch-size",
        64,
        "--json",
    ]


@pytest.fixture(scope="module")
def digits_cache(digits) -> str:
    out = os.path.join(digits["root"], "C")
    result = last_json(ok(*precompute_args(digits, out))[0])
    assert result["images"] == 2 * TRAIN_SAMPLES and result["epochs_complete"] == 2
    assert result["bad_rows"] == 0
    return out


def test_shards_and_index(digits):
    names = sorted(os.listdir(os.path.dirname(digits["train"])))
    tars = [n for n in names if n.endswith(".tar")]
    assert tars == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"]
    out, _ = ok("index", digits["train"], "--json")
    result = last_json(out)
    assert result["samples"] == TRAIN_SAMPLES and result["shards"] == 3
    assert result["classes"] == 10
    assert isinstance(result["fingerprint"], str) and len(result["fingerprint"]) >= 16
    assert result["unlabelled"] == 0 and result["unreadable"] == 0
    # The same data named differently (a directory of a copy would too) has the same fingerprint.
    listed = ",".join(
        os.path.join(os.path.dirname(digits["train"]), f"train-{n:06d}.tar") for n in range(3)
    )
    assert last_json(ok("index", listed, "--json")[0])["fingerprint"] == result["fingerprint"]


def test_inspect(digits_cache):
    out, _ = ok("inspect", digits_cache, "--json")
    summary = last_json(out)
    assert summary["epochs_complete"] == 2 and summary["epochs_allocated"] == 2
    assert summary["rows_written"] == 2 * TRAIN_SAMPLES
    assert summary["bytes_per_row"] > 0
    assert summary["teacher"] == TEACHER and summary["views"] == "function_matching"
    assert summary["teacher_image_size"] == 16 and summary["topk"] == 10
    # without --json: a table naming the same things
    table, _ = ok("inspect", digits_cache)
    assert "epochs_complete" in table and "bytes_per_row" in table


def test_verify_agrees_on_this_machine(digits, digits_cache):
    out, _ = ok(
        "verify",
        digits_cache,
        "--data",
        digits["train"],
        "--teacher",
        TEACHER,
        "--samples",
        40,
        "--device",
        "cpu",
        "--json",
    )
    result = last_json(out)
    assert result["checked"] == 40
    assert result["top1_agreement"] == 1.0
    assert {"topk_set_agreement", "max_abs_logit_error"} <= result.keys()
    assert result["topk_set_agreement"] == 1.0
    assert 0.0 <= result["max_abs_logit_error"] < 1e-2  # fp16 rounding of the stored logits


def test_verify_fails_below_min_agreement(digits, digits_cache):
    code, out, err = run_cli(
        "verify",
        digits_cache,
        "--data",
        digits["train"],
        "--teacher",
        TEACHER,
        "--samples",
        8,
        "--device",
        "cpu",
        "--min-agreement",
        1.01,
        "--json",
    )
    assert code == 1, err
    assert last_json(out)["top1_agreement"] == 1.0  # the result is still printed
    assert "below --min-agreement 1.01" in err and "Traceback" not in err


def test_train_cached_then_eval(digits, digits_cache):
    run = os.path.join(digits["root"], "R")
    out, _ = ok(
        "train",
        "--data",
        digits["train"],
        "--val",
        digits["val"],
        "--student",
        STUDENT,
        "--teacher-mode",
        "cached",
        "--cache",
        digits_cache,
        "--epochs",
        1,
        "--image-size",
        16,
        "--batch-size",
        32,
        *CPU,
        "--out",
        run,
        "--json",
    )
    result = last_json(out)
    assert result["epoch"] == 1 and result["cache_epoch"] == 0
    assert result["train_loss"] > 0 and 0.0 <= result["val_accuracy"] <= 1.0
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "model.pt"):
        assert os.path.isfile(os.path.join(run, name)), name
    out, _ = ok("eval", run, "--data", digits["val"], *CPU, "--json")
    scores = last_json(out)
    assert 0.0 <= scores["accuracy"] <= 1.0
    assert scores["samples"] == VAL_SAMPLES and scores["model"] == STUDENT
    assert scores["accuracy"] == result["val_accuracy"]  # the same center views as in training


def test_precompute_rerun_does_nothing_and_more_epochs_extend(digits, digits_cache, tmp_path):
    cache = copy_tree(digits_cache, tmp_path / "C")
    before = open_cache(cache).read_unit(1, 2)
    again = last_json(ok(*precompute_args(digits, cache, epochs=2))[0])
    assert again["images"] == 0 and again["epochs_complete"] == 2
    extended = last_json(ok(*precompute_args(digits, cache, epochs=3))[0])
    assert extended["images"] == TRAIN_SAMPLES and extended["epochs_complete"] == 3
    summary = last_json(ok("inspect", cache, "--json")[0])
    assert summary["epochs_complete"] == 3 and summary["rows_written"] == 3 * TRAIN_SAMPLES
    after = open_cache(cache).read_unit(1, 2)  # old epochs are not rewritten
    for name, values in before.items():
        assert (values == after[name]).all(), name


# -- errors: one line, exit status 2; --debug raises ----------------------------------------


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory, train_dir, val_dir) -> str:
    out = str(tmp_path_factory.mktemp("cli") / "run")
    ok(
        "train",
        "--data",
        train_dir,
        "--val",
        val_dir,
        "--student",
        STUDENT,
        "--teacher-mode",
        "none",
        "--epochs",
        1,
        "--image-size",
        16,
        "--batch-size",
        8,
        *CPU,
        "--out",
        out,
    )
    return out


ERRORS = {
    "unknown model": ("train", "--teacher-mode", "none", "--student", "kdcache:nope"),
    "missing data": ("index", "{tmp}/nowhere"),
    "cached without cache": ("train", "--teacher-mode", "cached", "--student", STUDENT),
    "other teacher": ("verify", "{cache}", "--data", "{train}", "--teacher", "kdcache:resnet_s"),
    "existing run": ("train", "--teacher-mode", "none", "--student", STUDENT, "--out", "{run}"),
    "weights that do not fit": (
        "train",
        "--teacher-mode",
        "none",
        "--student",
        "kdcache:resnet_s",
        "--student-weights",
        "{run}/model.pt",
    ),
    "unwritable output": (
        "train",
        "--teacher-mode",
        "none",
        "--student",
        STUDENT,
        "--out",
        "/proc/kdcache-test/run",
    ),
}
NEEDLES = {
    "unknown model": ("nope", "tiny_cnn"),
    "missing data": ("nowhere",),
    "cached without cache": ("--cache",),
    "other teacher": ("teacher", "resnet_s"),
    "existing run": ("--resume",),
    "weights that do not fit": ("do not fit", "resnet_s"),
    "unwritable output": ("cannot create", "/proc/kdcache-test/run"),
}


def error_argv(case: str, request, tmp_path) -> list[str]:
    values = {"tmp": str(tmp_path)}
    argv = list(ERRORS[case])
    if case == "other teacher":
        values |= {"cache": request.getfixturevalue("tiny_cache")}
    if argv[0] in ("train", "verify"):
        values["train"] = request.getfixturevalue("train_dir")
    if case in ("existing run", "weights that do not fit"):
        values["run"] = request.getfixturevalue("existing_run")
    argv = [a.format(**values) for a in argv]
    if argv[0] == "train":
        if "--out" not in argv:
            argv += ["--out", str(tmp_path / "run")]
        argv += ["--data", values["train"], "--val", request.getfixturevalue("val_dir")]
        argv += ["--epochs", "1", "--image-size", "16", "--batch-size", "8"]
    if argv[0] == "train":
        argv += list(CPU)
    if argv[0] == "verify":
        argv += ["--device", "cpu"]
    return argv


@pytest.mark.faults
@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_with_status_2(case, request, tmp_path):
    argv = error_argv(case, request, tmp_path)
    code, out, err = run_cli(*argv)
    assert code == 2, (code, err)
    assert_one_line_error(err, argv[0], *NEEDLES[case])


@pytest.mark.faults
@pytest.mark.parametrize("case", list(ERRORS))
def test_debug_raises(case, request, tmp_path):
    argv = error_argv(case, request, tmp_path)
    with pytest.raises(KdcacheError):
        run_cli(*argv, "--debug")


# -- --smoke ------------------------------------------------------------------------------


def test_precompute_smoke(digits, tmp_path):
    out = str(tmp_path / "smoke.zarr")
    args = precompute_args(digits, out, epochs=50)
    result = last_json(ok(*args, "--smoke")[0])
    assert result["config"]["epochs"] == 1 and result["config"]["limit"] == 256
    assert result["images"] == 300  # the shards (of 100) holding the first 256 samples, once
    summary = last_json(ok("inspect", out, "--json")[0])
    assert summary["epochs_allocated"] == 1 and summary["rows_written"] == 300


def test_train_smoke(digits, tmp_path):
    out = str(tmp_path / "run")
    result = last_json(
        ok(
            "train",
            "--data",
            digits["train"],
            "--val",
            digits["val"],
            "--student",
            STUDENT,
            "--teacher-mode",
            "none",
            "--epochs",
            50,
            "--image-size",
            16,
            *CPU,
            "--out",
            out,
            "--smoke",
            "--json",
        )[0]
    )
    assert result["epoch"] == 1
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["epochs"] == 1 and config["limit"] <= 256 and config["batch_size"] <= 32


def test_smoke_cache_feeds_a_smoke_train(train_dir, val_dir, tmp_path):
    cache = str(tmp_path / "smoke.zarr")
    ok(
        "precompute",
        "--data",
        train_dir,
        "--teacher",
        TEACHER,
        "--out",
        cache,
        "--epochs",
        3,
        "--teacher-image-size",
        16,
        *CPU,
        "--smoke",
    )
    ok(
        "train",
        "--data",
        train_dir,
        "--val",
        val_dir,
        "--student",
        STUDENT,
        "--teacher-mode",
        "cached",
        "--cache",
        cache,
        "--epochs",
        3,
        "--image-size",
        16,
        *CPU,
        "--out",
        tmp_path / "run",
        "--smoke",
    )


# -- --help, --version ----------------------------------------------------------------------

HELP = {
    "shards": ("--from", "--out", "--split", "--shard-size", "--limit", "--smoke"),
    "index": ("--rebuild", "--json"),
    "precompute": (
        "--data",
        "--teacher",
        "--teacher-weights",
        "--out",
        "--epochs",
        "--topk",
        "--views",
        "--plan-seed",
        "--teacher-image-size",
        "--batch-size",
        "--smoke",
    ),
    "inspect": ("--json",),
    "verify": ("--data", "--teacher", "--samples", "--min-agreement", "--json"),
    "train": (
        "--data",
        "--val",
        "--out",
        "--resume",
        "--student",
        "--teacher-mode",
        "--cache",
        "--teacher",
        "--views",
        "--plan-seed",
        "--image-size",
        "--teacher-image-size",
        "--epochs",
        "--batch-size",
        "--lr",
        "--weight-decay",
        "--warmup",
        "--clip-grad",
        "--temperature",
        "--seed",
        "--limit",
        "--smoke",
    ),
    "ablate": (
        "--data",
        "--val",
        "--teacher",
        "--student",
        "--epochs",
        "--out",
        "--modes",
        "--seeds",
        "--patience",
        "--smoke",
    ),
    "eval": ("--data", "--model", "--teacher", "--json"),
    "demo": ("--out", "--smoke"),
}


@pytest.mark.parametrize("command", list(HELP))
def test_help_of_every_command(command, capsys):
    from kdcache.cli import main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: kdcache {command}")
    for option in (*HELP[command], "--debug", "--json"):
        assert option in text, (command, option)


def test_help_lists_every_command(capsys):
    from kdcache.cli import build_parser

    text = build_parser().format_help()
    for command in HELP:
        assert command in text, command


def test_version_in_process(capsys):
    from kdcache.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"kdcache {__version__}"


def test_version_console_script():
    script = Path(sys.executable).with_name("kdcache")
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable}")
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"kdcache {__version__}"


@pytest.fixture(scope="module")
def python_m_help() -> subprocess.CompletedProcess:
    """``python -X importtime -m kdcache --help``: the help text, and what it imported."""
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "kdcache", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_python_m_kdcache_help(python_m_help):
    assert python_m_help.returncode == 0, python_m_help.stderr[-2000:]
    assert python_m_help.stdout.startswith("usage: kdcache")
    for command in HELP:
        assert command in python_m_help.stdout


def test_help_imports_neither_torch_nor_zarr(python_m_help):
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in python_m_help.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "kdcache.cli" in imported
    assert not {"torch", "zarr", "kdcache.train.trainer"} & imported


# -- demo ---------------------------------------------------------------------------------


def test_demo_smoke(tmp_path):
    out = tmp_path / "demo"
    stdout, _ = ok("demo", "--smoke", "--out", out, *CPU, "--json")
    printed = last_json(stdout)
    with open(out / "report.json") as f:
        report = json.load(f)
    assert printed == report
    assert 0.0 <= report["teacher"]["accuracy"] <= 1.0
    assert set(report["students"]) == {"none", "online", "cached"}
    for mode, student in report["students"].items():
        assert 0.0 <= student["accuracy"] <= 1.0, mode
        assert student["images_per_s"] > 0, mode
    assert (out / "accuracy.png").stat().st_size > 0
    # the table `make demo` prints (without --json) is made from that very report
    from kdcache.cli.demo import format_report

    table = format_report(report)
    assert f"{report['plan']['student_epochs']} epochs:" in table
    assert all(mode in table for mode in report["students"])
