"""One source per option: config fields generate the CLI, ``--config FILE`` sets any option, and a
run's ``config.json`` given back as ``--config`` repeats the run (its resolved keys checked)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import TEACHER, run_cli

from kdcache.cli import ablate_config, build_parser, precompute_config, train_config
from kdcache.cli.ablate import CELL_OPTIONS, SHARED_OPTIONS, AblateConfig
from kdcache.errors import KdcacheError
from kdcache.options import cli_fields, flag, split_top_level
from kdcache.precompute_config import PrecomputeConfig
from kdcache.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = ["--data", "d", "--val", "v", "--student", "s", "--out", "o", "--epochs", "3"]


def parse(*argv: str):
    return build_parser().parse_args([str(a) for a in argv])


def test_every_config_option_is_on_its_command_with_its_default():
    """The parser is generated: each field with an option is there, and an unset option is the
    field's default (the dataclass's, not a second copy in the parser)."""
    cfg, _ = train_config(parse("train", *TRAIN))
    assert cfg == TrainConfig(
        data="d", val="v", student="s", out="o", epochs=3, command=cfg.command
    )
    for cls, command in ((TrainConfig, "train"), (PrecomputeConfig, "precompute")):
        text = build_parser()._subparsers._group_actions[0].choices[command].format_help()
        for f in cli_fields(cls):
            assert flag(f) in text, (command, f.name)
    ablate_help = build_parser()._subparsers._group_actions[0].choices["ablate"].format_help()
    for name in SHARED_OPTIONS:
        assert flag(TrainConfig.__dataclass_fields__[name]) in ablate_help, name
    ablate = build_parser()._subparsers._group_actions[0].choices["ablate"]
    flags = {flag for action in ablate._actions for flag in action.option_strings}
    for name in set(CELL_OPTIONS) - {"loss"}:  # set per grid cell (--loss is the loss axis)
        assert "--" + name.replace("_", "-") not in flags, name


def test_options_parse_as_the_fields_hold_them():
    cfg, _ = train_config(
        parse("train", *TRAIN, "--image-size", "auto", "--student-mean", "0.5", "--strict")
    )
    assert cfg.image_size == "auto" and cfg.student_mean == (0.5, 0.5, 0.5) and cfg.strict
    cfg, _ = train_config(parse("train", *TRAIN, "--strict", "--no-strict", "--lr", "0.1"))
    assert not cfg.strict and cfg.lr == 0.1


def test_a_missing_required_option_is_named():
    with pytest.raises(KdcacheError, match=r"required: --val, --out \(on the command line or in"):
        train_config(parse("train", "--data", "d", "--student", "s", "--epochs", "1"))
    code, _, err = run_cli("train", "--data", "d", "--student", "s", "--epochs", "1")
    assert code == 2 and "kdcache train: error: the following options are required: --val" in err


def test_config_file_sets_options_and_the_command_line_wins(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "data: d\nval: v\nstudent: s\nout: o\nepochs: 5\nlr: 0.01\nbatch_size: 64\n"
        "student_mean: [0.1, 0.2, 0.3]\nimage_size: auto\nstrict: true\n"
    )
    cfg, expect = train_config(parse("train", "--config", yaml_file, "--lr", "0.5"))
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.image_size) == (0.5, 64, 5, "auto")
    assert cfg.student_mean == (0.1, 0.2, 0.3) and cfg.strict and expect is None
    cfg, _ = train_config(parse("train", "--config", yaml_file, "--no-strict"))
    assert not cfg.strict  # a file's true is turned off on the command line
    json_file = tmp_path / "pre.json"
    json_file.write_text(json.dumps({"data": "d", "teacher": "t", "out": "c", "epochs": 2}))
    pre = precompute_config(parse("precompute", "--config", json_file, "--views", "center"))
    assert (pre.epochs, pre.views, pre.teacher_image_size) == (2, "center", 224)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("lr: 0.1\nlearning_rate: 2\n", "learning_rate is not an option of `kdcache train`"),
        ("[1, 2]\n", "must hold an object of options"),
        ("lr: [\n", "is not valid YAML"),
        ("epochs: many\n", "epochs: invalid literal"),
        ("strict: 3\n", "strict: expected true or false"),
    ],
)
def test_a_bad_config_file_is_refused_with_what_is_wrong(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(KdcacheError, match=needle):
        train_config(parse("train", *TRAIN, "--config", path))
    with pytest.raises(KdcacheError, match="cannot read --config"):
        train_config(parse("train", *TRAIN, "--config", tmp_path / "missing.json"))


def test_ablate_modes_and_losses_are_repeatable_and_keep_commas_inside_specs(tmp_path):
    assert split_top_level("kl(t=2, w=1)+ce(w=0.1), kl , ") == ["kl(t=2, w=1)+ce(w=0.1)", "kl"]
    base = ["--data", "d", "--val", "v", "--student", "s", "--out", "o", "--epochs", "2"]
    cfg = ablate_config(
        parse(
            "ablate", *base, "--teacher", "t", "--mode", "none", "--mode", "cached:consistent",
            "--modes", "fixed,independent", "--loss", "kl", "--loss", "kl(t=2, w=0.5),ce",
            "--patience", "1,3", "--lr", "0.2",
        )
    )  # fmt: skip
    assert cfg.modes == ("none", "cached:consistent", "fixed", "independent")
    assert cfg.losses == ("kl", "kl(t=2, w=0.5)", "ce") and cfg.patience == (1, 3)
    assert cfg.train.lr == 0.2 and cfg.train.teacher == "t" and cfg.out == "o"
    with pytest.raises(KdcacheError, match="required: --teacher"):
        ablate_config(parse("ablate", *base))
    nested = tmp_path / "grid.json"  # the shape of ablation.json's "config"
    nested.write_text(json.dumps({"train": {"teacher": "t", "lr": 0.3}, "seeds": 2}))
    cfg = ablate_config(parse("ablate", *base, "--config", nested))
    assert (cfg.train.lr, cfg.seeds, cfg.modes) == (0.3, 2, AblateConfig.__dataclass_fields__[
        "modes"].default)  # fmt: skip
    bad = tmp_path / "cell.json"
    bad.write_text(json.dumps({"teacher": "t", "teacher_mode": "online"}))
    with pytest.raises(KdcacheError, match="teacher_mode is not an option of `kdcache ablate`"):
        ablate_config(parse("ablate", *base, "--config", bad))


def test_ablate_loss_axis_trains_every_mode_with_each_loss(tmp_path, train_dir, val_dir):
    code, out, err = run_cli(
        "ablate", "--data", train_dir, "--val", val_dir, "--teacher", TEACHER,
        "--student", "kdcache:tiny_cnn", "--epochs", 1, "--out", tmp_path / "grid",
        "--mode", "online:consistent", "--loss", "kl", "--loss", "kl(t=4)+ce(w=0.5)",
        "--image-size", 16, "--batch-size", 8, "--limit", 32, "--workers", 0, "--device", "cpu",
        "--json",
    )  # fmt: skip
    assert code == 0, err[-2000:]
    modes = json.loads(out.strip().splitlines()[-1])["modes"]
    assert list(modes) == ["online:consistent kl", "online:consistent kl(t=4)+ce(w=0.5)"]
    losses = []
    for cell in modes.values():
        with open(f"{cell['runs'][0]}/config.json") as f:
            losses.append(json.load(f)["loss_resolved"])
    assert losses == ["kl(t=1.0)", "kl(t=4)+ce(t=1.0, w=0.5)"], losses
    code, _, err = run_cli(
        "ablate", "--data", train_dir, "--val", val_dir, "--teacher", TEACHER,
        "--student", "kdcache:tiny_cnn", "--epochs", 1, "--out", tmp_path / "bad",
        "--mode", "online", "--loss", "kl(t=-1)", "--device", "cpu",
    )  # fmt: skip
    assert code == 2 and "kl" in err and "Traceback" not in err
    assert not (tmp_path / "bad" / "caches").exists()  # refused before any work


def test_a_runs_config_json_repeats_the_run(tmp_path, train_dir, val_dir):
    """``--config OUT/config.json --out NEW``: the same options, the same resolved run, the same
    losses step for step; a changed resolved key (another data set) is refused."""
    first = tmp_path / "first"
    common = ["--workers", 0, "--device", "cpu", "--limit", 48]
    code, _, err = run_cli(
        "train", "--data", train_dir, "--val", val_dir, "--student", "kdcache:tiny_cnn",
        "--out", first, "--epochs", 2, "--teacher-mode", "none", "--image-size", 16,
        "--batch-size", 8, "--seed", 3, "--lr", 0.01, *common,
    )  # fmt: skip
    assert code == 0, err[-2000:]
    again = tmp_path / "again"
    code, _, err = run_cli("train", "--config", first / "config.json", "--out", again)
    assert code == 0, err[-2000:]
    with open(first / "config.json") as f:
        a = json.load(f)
    with open(again / "config.json") as f:
        b = json.load(f)
    differ = {k for k in a if a[k] != b[k]}
    assert "out" in differ and differ <= {"out", "command"}, differ

    def losses(run) -> list[float]:
        with open(run / "metrics.jsonl") as f:
            return [json.loads(line)["train_loss"] for line in f]

    assert losses(first) == losses(again)
    a["data_fingerprint"] = "0" * 16
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(a))
    code, _, err = run_cli("train", "--config", edited, "--out", tmp_path / "third")
    assert code == 2, err
    assert "would not repeat the --config run: data_fingerprint: the --config run has" in err


def test_configs_keep_their_field_names():
    """TrainConfig and PrecomputeConfig are public: their field names stay."""
    train = [f.name for f in dataclasses.fields(TrainConfig)]
    assert train[:5] == ["data", "val", "student", "out", "epochs"]
    for name in ("teacher_mode", "cache", "views", "plan_seed", "loss", "label_map", "extend"):
        assert name in train
    pre = [f.name for f in dataclasses.fields(PrecomputeConfig)]
    assert pre[:4] == ["data", "teacher", "out", "epochs"]
    assert {"topk", "views", "plan_seed", "chunk_rows", "limit_units", "command"} <= set(pre)
