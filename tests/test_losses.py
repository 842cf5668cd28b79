"""Losses as components: the grammar, the registry, weights that add, --loss through the trainer,
and the worked example of docs/extending.md run through `kdcache train`."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    NUM_CLASSES,
    TEACHER_SIZE,
    cached_batch,
    cached_probs,
    epoch_batches,
    initial_logits,
    kl_by_hand,
    loss_tolerance,
    read_steps,
    render_rows,
    run_cli,
)

from kdcache import targets as T
from kdcache.data.index import load_index
from kdcache.errors import KdcacheError
from kdcache.grammar import Term, format_terms, parse
from kdcache.losses import LOSSES, create_loss, register_loss
from kdcache.render import IMAGENET
from kdcache.store import open_cache
from kdcache.train.config import TrainConfig
from kdcache.train.modes import get_mode

DOC = Path(__file__).resolve().parent.parent / "docs" / "extending.md"
STUDENT = "kdcache:tiny_cnn"


def batch(seed: int = 0, k: int = 3) -> tuple[torch.Tensor, T.SparseTarget]:
    """Student logits (4, 5) and a top-``k`` teacher target whose rows carry labels."""
    g = torch.Generator().manual_seed(seed)
    logits, teacher = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    top, index = teacher.topk(k, dim=1)
    target = T.from_topk(top, index, teacher.logsumexp(1), 5)
    label = torch.randint(0, 5, (4,), generator=g)
    target.labels = T.Labels(label, label.roll(1), torch.tensor([1.0, 1.0, 0.7, 0.4]))
    return logits, target


def hard_ce(logits: torch.Tensor, target: T.SparseTarget) -> torch.Tensor:
    labels = target.labels
    return T.cross_entropy(
        logits, T.from_labels(labels.label, labels.partner, labels.lam, target.num_classes)
    )


# -- the grammar ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, sep, want",
    [
        ("kl", "+", [("kl", {})]),
        ("kl()", "+", [("kl", {})]),
        ("kl(t=2)+ce(w=0.1)", "+", [("kl", {"t": 2}), ("ce", {"w": 0.1})]),
        (" kl ( t = 2.5 ) +  ce ( ) ", "+", [("kl", {"t": 2.5}), ("ce", {})]),
        (
            "pkg.mod:Cls(a='x,)+', b=True, c=-1, d=1e+3, e=\"q\")",
            "+",
            [("pkg.mod:Cls", {"a": "x,)+", "b": True, "c": -1, "d": 1e3, "e": "q"})],
        ),
        (
            "inception_crop(size=224)|flip_lr",
            "|",
            [("inception_crop", {"size": 224}), ("flip_lr", {})],
        ),
        ("a+b", "|", None),  # '+' is not the separator here: an error, checked below
    ],
)
def test_the_grammar_reads_good_specs(spec, sep, want):
    if want is None:
        with pytest.raises(KdcacheError, match=r"expected '\|' or the end, got '\+'"):
            parse(spec, sep)
        return
    terms = parse(spec, sep)
    assert [(t.name, t.kwargs) for t in terms] == want
    again = parse(format_terms(terms, sep), sep)  # what config.json writes reads back the same
    assert [(t.name, t.kwargs) for t in again] == want


def test_a_term_knows_its_column_and_kind():
    kl, user = parse("kl + my.mod:Loss(k=1)")
    assert (kl.column, kl.is_user, user.column, user.is_user) == (1, False, 6, True)
    assert str(user) == "my.mod:Loss(k=1)" and isinstance(user, Term)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "--loss is empty; write one or more terms, as in kl(t=2)+ce(w=0.1)"),
        ("   ", "--loss is empty"),
        ("kl(t=2", "column 3 ('kl<here>(t=2'): '(' is never closed; close it with ')'"),
        ("kl(t=1, 2)", "column 9 ('kl(t=1, <here>2)'): an argument without a key after key=value"),
        ("kl(t=)", "column 6 ('kl(t=<here>)'): t has no value; write t=VALUE, e.g. t=2"),
        ("kl(t=1+2)", "the value of t, 1+2, is not an int, float, bool, string or word; write"),
        ("kl(t=None)", "the value of t, None, is not an int"),
        ("kl(t=1, t=2)", "column 9 ('kl(t=1, <here>t=2)'): t is given twice; give each argument"),
        ("kl(t='x)", "the string '... is never closed; close it with '"),
        ("kl+", "column 4 ('kl+<here>'): expected a name, got the end; write a registered name or"),
        ("+kl", "column 1 ('<here>+kl'): expected a name, got '+'"),
        (
            "kl ce",
            "column 4 ('kl <here>ce'): expected '+' or the end, got 'c'; join terms with '+'",
        ),
        ("kl(t=1))", "column 8 ('kl(t=1)<here>)'): expected '+' or the end, got ')'"),
        ("3kl", "expected a name, got '3'"),
    ],
)
def test_each_grammar_error_names_the_column_and_what_to_write(spec, message):
    with pytest.raises(KdcacheError) as e:
        parse(spec, "+", "--loss")
    assert message in str(e.value), str(e.value)


# -- the registry and the built-ins -----------------------------------------------------------


@pytest.mark.parametrize("spec", ["kll", "kl+KL(t=2)", "ce+dkdd"])
def test_an_unknown_loss_name_is_refused_with_the_names(spec):
    bad = re.split(r"[+(]", spec)[-1] if spec != "kl+KL(t=2)" else "KL"
    with pytest.raises(KdcacheError, match=f"unknown loss '{bad}'; choose one of kl, ce, soft_ce"):
        create_loss(spec)
    cfg = TrainConfig("d", "v", "s", "o", 1, teacher_mode="none", loss=spec)
    with pytest.raises(KdcacheError, match="or write pkg.module:Class for your own"):
        cfg.validate()  # refused before any work, without importing anything


def test_the_builtins_are_the_targets_functions():
    logits, target = batch()
    for t in (1.0, 2.0):
        assert torch.equal(
            create_loss(f"kl(t={t})")(logits, target), T.kl_divergence(logits, target, t)
        )
        assert torch.equal(
            create_loss(f"soft_ce(t={t})")(logits, target), T.cross_entropy(logits, target, t)
        )
        assert torch.equal(
            create_loss(f"reverse_kl(t={t})")(logits, target), T.reverse_kl(logits, target, t)
        )
    assert torch.equal(create_loss("ce")(logits, target), hard_ce(logits, target))
    kl, ce = create_loss("kl(t=3)").terms[0][1], create_loss("ce").terms[0][1]
    assert (kl.name, kl.describe(), ce.name, ce.describe()) == ("kl", "kl(t=3)", "ce", "ce(t=1.0)")


def test_the_default_losses_are_bit_identical_to_before():
    """A mode's default (no --loss) is the function the trainer called before losses were
    components: KL at --temperature with a teacher, cross-entropy without one on labels."""
    logits, target = batch(1)
    for t in (1.0, 2.0, 0.5):
        want = T.kl_divergence(logits, target, t)
        cfg = TrainConfig("d", "v", "s", "o", 1, teacher_mode="cached", cache="c", temperature=t)
        assert torch.equal(cfg.create_loss()(logits, target), want)
        assert torch.equal(get_mode("online").loss(logits, target, t), want)
        cfg = TrainConfig("d", "v", "s", "o", 1, teacher_mode="none", temperature=t)
        labels = target.labels
        hard = T.from_labels(labels.label, labels.partner, labels.lam, 5)
        hard.labels = labels  # what the trainer gives the none mode: labels, twice
        assert torch.equal(cfg.create_loss()(logits, hard), T.cross_entropy(logits, hard))
        assert cfg.create_loss().describe() == "ce(t=1.0)"


def test_plus_adds_the_weighted_terms():
    logits, target = batch(2)
    kl2, ce = T.kl_divergence(logits, target, 2.0), hard_ce(logits, target)
    loss = create_loss("kl(t=2)+ce(w=0.1)")
    assert torch.allclose(loss(logits, target), kl2 + 0.1 * ce)
    assert loss.describe() == "kl(t=2)+ce(t=1.0, w=0.1)" and loss.name == "kl+ce"
    halves = create_loss("kl(w=0.25) + kl(w=0.75)")(logits, target)
    assert torch.allclose(halves, T.kl_divergence(logits, target))
    assert torch.allclose(create_loss("ce(w=3)")(logits, target), 3 * ce)
    assert torch.allclose(
        create_loss("ce(w=0)+kl")(logits, target), T.kl_divergence(logits, target)
    )
    with pytest.raises(
        KdcacheError, match="column 4: the weight w of ce must be a number, got 'x'"
    ):
        create_loss("kl+ce(w='x')")


def test_temperature_and_loss_have_one_rule():
    """With --loss, --temperature (other than 1) is the t of the terms that name none; a term
    naming its own t as well is refused."""

    def cfg(loss, temperature=1.0):
        return TrainConfig(
            "d", "v", "s", "o", 1, teacher_mode="none", loss=loss, temperature=temperature
        )

    assert cfg(None, 2.0).create_loss().describe() == "ce(t=1.0)"  # hard labels: no T
    assert cfg("kl", 2.0).create_loss().describe() == "kl(t=2.0)"
    # ce is on hard labels: --temperature is not its t
    assert cfg("kl+ce(w=0.5)", 2.0).create_loss().describe() == "kl(t=2.0)+ce(t=1.0, w=0.5)"
    assert cfg("dkd+soft_ce", 2.0).create_loss().describe() == (
        "dkd(alpha=1.0, beta=8.0, t=2.0)+soft_ce(t=2.0)"
    )
    assert cfg("kl(t=3)").create_loss().describe() == "kl(t=3)"
    cfg("kl(t=3)").validate()
    with pytest.raises(
        KdcacheError, match=r"--temperature 2.0 and --loss 'kl\(t=3\)\+ce' both set"
    ):
        cfg("kl(t=3)+ce", 2.0).validate()


def test_a_registered_name_and_a_users_class(monkeypatch, tmp_path):
    monkeypatch.delitem(LOSSES, "scaled", raising=False)  # undone: removed again after

    @register_loss("scaled")
    class Scaled:
        def __init__(self, k: float = 1.0, t: float = 1.0):
            self.k, self.t = k, t

        def __call__(self, logits, target):
            return self.k * T.kl_divergence(logits, target, self.t)

    logits, target = batch(3)
    loss = create_loss("scaled(k=2)", {"t": 2.0})
    assert torch.allclose(loss(logits, target), 2 * T.kl_divergence(logits, target, 2.0))
    assert loss.describe() == "scaled(k=2, t=2.0)"
    with pytest.raises(ValueError, match="already registered"):
        register_loss("kl")(Scaled)
    with pytest.raises(KdcacheError, match=r"scaled\(j=1\) cannot be made .*unexpected keyword"):
        create_loss("scaled(j=1)")
    with pytest.raises(KdcacheError, match="cannot import 'no_such_loss_module' for --loss term"):
        create_loss("kl+no_such_loss_module:X")
    with pytest.raises(KdcacheError, match=r"kdcache.targets has no class 'Nope'"):
        create_loss("kdcache.targets:Nope")


# -- the worked example of docs/extending.md, through `kdcache train` --------------------------


def doc_example() -> tuple[str, str]:
    """(the source of docs/extending.md's myloss.py, its --loss spec)."""
    text = DOC.read_text()
    module = re.search(r"```python\n(# myloss\.py\n.*?)```", text, re.S).group(1)
    spec = re.search(r"--loss '([^']*myloss:[^']*)'", text).group(1)
    return module, spec


@pytest.fixture
def in_tmp_with_myloss(tmp_path, monkeypatch):
    module, spec = doc_example()
    (tmp_path / "myloss.py").write_text(module)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    sys.modules.pop("myloss", None)
    yield tmp_path, spec
    sys.modules.pop("myloss", None)


def test_the_worked_example_through_kdcache_train(
    in_tmp_with_myloss, train_dir, val_dir, tiny_cache
):
    tmp_path, spec = in_tmp_with_myloss
    assert spec == "kl+myloss:Smooth(w=0.5)"
    out = tmp_path / "run"
    options = dict(epochs=1, batch_size=8, seed=3, limit=12)
    argv = ["train", "--data", train_dir, "--val", val_dir, "--student", STUDENT, "--out", out,
            "--teacher-mode", "cached", "--cache", tiny_cache, "--image-size", TEACHER_SIZE,
            "--workers", 0, "--device", "cpu", "--loss", spec]  # fmt: skip
    for key, value in options.items():
        argv[1:1] = [f"--{key.replace('_', '-')}", value]
    code, _, err = run_cli(*argv)
    assert code == 0, err
    with open(out / "config.json") as f:
        config = json.load(f)
    assert config["loss"] == spec
    assert config["loss_resolved"] == "kl(t=1.0)+myloss:Smooth(w=0.5)"

    cfg = TrainConfig(train_dir, val_dir, STUDENT, str(out), teacher_mode="cached", **options)
    index = load_index(train_dir)
    rows = epoch_batches(index, cfg, 0)[0]
    views, rows_targets = cached_batch(open_cache(tiny_cache), index, rows, 0)
    pixels = render_rows(index, rows, views, TEACHER_SIZE, IMAGENET)
    logits = initial_logits(STUDENT, NUM_CLASSES, cfg.seed, pixels)
    smooth = float(-torch.log_softmax(logits.double(), 1).mean(1).mean())
    want = kl_by_hand(logits, cached_probs(rows_targets, NUM_CLASSES)) + 0.5 * smooth
    first = read_steps(out)[0]
    assert (first["epoch"], first["step"]) == (1, 1)
    assert abs(first["loss"] - want) <= loss_tolerance(want), (first, want)
    kl_only = want - 0.5 * smooth  # the check can tell: the user's term is in the loss
    assert abs(first["loss"] - kl_only) > 10 * loss_tolerance(want), (first, kl_only)

    # --resume keeps the loss: another --loss is refused, naming both
    code, _, err = run_cli(*argv[:-1], "kl", "--resume")
    assert code == 2 and f"--loss kl (the run has {spec})" in err, err


def test_a_loss_module_that_is_not_there_fails_before_any_work(
    tmp_path, monkeypatch, train_dir, val_dir
):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("train", "--data", train_dir, "--val", val_dir, "--student", STUDENT,
                           "--out", tmp_path / "run", "--epochs", 1, "--teacher-mode", "none",
                           "--workers", 0, "--device", "cpu", "--loss", "ce+nomodule:X")  # fmt: skip
    assert code == 2 and "cannot import 'nomodule' for --loss term nomodule:X" in err, err
    assert str(tmp_path) in err
    assert not os.path.exists(tmp_path / "run" / "steps.jsonl")
