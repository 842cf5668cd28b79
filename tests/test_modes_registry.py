"""The teacher-mode registry (kdcache.train.modes): each mode's defaults and needs, the checks
that come from it, and that `kdcache train`, `kdcache ablate` and the README agree on them."""

from __future__ import annotations

import os
import re
import types

import pytest
import torch
from conftest import run_cli

from kdcache import pixels
from kdcache import targets as T
from kdcache.cli.ablate import DEFAULT_PRESET, GRID_PRESET, parse_mode
from kdcache.errors import KdcacheError
from kdcache.render import IMAGENET
from kdcache.train.config import DEFAULT_VIEWS, TEACHER_MODES, TrainConfig
from kdcache.train.modes import MODES, get_mode
from kdcache.views import INDEPENDENT_STREAM, get_spec

README = os.path.join(os.path.dirname(__file__), "..", "README.md")

# name: (default views, reads cache, center cache, replays cache views, runs teacher,
#        teacher stream, unmixed only, trains on labels, sees the student's views)
EXPECTED = {
    "cached": (None, True, False, True, False, None, False, False, True),
    "online": ("function_matching", False, False, False, True, None, False, False, True),
    "fixed": ("consistent", True, True, False, False, None, True, False, False),
    "independent": (
        "consistent",
        False,
        False,
        False,
        True,
        INDEPENDENT_STREAM,
        True,
        False,
        False,
    ),
    "none": ("function_matching", False, False, False, False, None, False, True, False),
}


def cfg(mode: str, **kw) -> TrainConfig:
    return TrainConfig(data="d", val="v", student="s", out="o", epochs=1, teacher_mode=mode, **kw)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_mode_says_what_it_needs_and_does(name):
    m = get_mode(name)
    assert m.name == name and cfg(name).mode is m
    assert (
        m.default_views,
        m.reads_cache,
        m.needs_center_cache,
        m.replays_cache_views,
        m.runs_teacher,
        m.teacher_stream,
        m.unmixed_only,
        m.trains_on_labels,
        m.sees_student_views,
    ) == EXPECTED[name]
    mixing, unmixed = get_spec("function_matching"), get_spec("consistent")
    assert mixing.mixes and not unmixed.mixes
    assert m.allows(unmixed) and m.allows(mixing) is not m.unmixed_only


def test_the_registry_is_all_the_modes_and_the_old_names_follow_it():
    assert tuple(MODES) == TEACHER_MODES == ("cached", "online", "fixed", "independent", "none")
    assert DEFAULT_VIEWS == {
        "online": "function_matching",
        "none": "function_matching",
        "fixed": "consistent",
        "independent": "consistent",
    }


@pytest.mark.parametrize(
    "mode,kw,needle",
    [
        ("cached", {}, "--teacher-mode cached needs --cache CACHE"),
        ("fixed", {}, "--teacher-mode fixed needs --cache CACHE: a one-epoch cache of center"),
        ("online", {}, "--teacher-mode online needs --teacher MODEL"),
        ("independent", {}, "--teacher-mode independent needs --teacher MODEL"),
    ],
)
def test_validate_asks_the_mode_what_it_needs(mode, kw, needle):
    with pytest.raises(KdcacheError, match=re.escape(needle)):
        cfg(mode, **kw).validate()


@pytest.mark.parametrize(
    "mode,kw",
    [
        ("cached", {"cache": "c"}),
        ("fixed", {"cache": "c"}),
        ("online", {"teacher": "t"}),
        ("independent", {"teacher": "t"}),
        ("none", {}),
    ],
)
def test_a_mode_with_what_it_needs_validates(mode, kw):
    cfg(mode, **kw).validate()


def test_an_unknown_mode_is_refused_with_the_list():
    with pytest.raises(KdcacheError, match="unknown teacher mode 'bogus': choose one of cached"):
        get_mode("bogus")
    with pytest.raises(KdcacheError, match="unknown teacher mode 'bogus'"):
        cfg("bogus").mode  # noqa: B018
    with pytest.raises(KdcacheError, match="--teacher-mode must be one of cached, online, fixed"):
        cfg("bogus").validate()
    code, _, err = run_cli("train", "--data", "d", "--val", "v", "--student", "s", "--out", "o",
                           "--epochs", "1", "--teacher-mode", "bogus")  # fmt: skip
    assert code == 2 and "--teacher-mode: invalid choice: 'bogus'" in err and "'online'" in err


def test_targets_and_losses_per_mode():
    """Cache rows, a live teacher or labels; KL at the temperature, or cross-entropy."""
    torch.manual_seed(0)
    logits, teacher = torch.randn(4, 5), torch.randn(4, 5)
    top, index = teacher.topk(3, dim=1)
    item = {
        "topk_logits": top.half(),
        "topk_index": index,
        "lse": torch.logsumexp(teacher, 1),
        "label": torch.tensor([0, 1, 2, 3]),
        "partner_label": torch.tensor([1, 1, 4, 0]),
        "lam": torch.tensor([1.0, 0.5, 0.25, 1.0]),
        "teacher_pixels": torch.rand(4, 2, 2, 3),  # [0, 1] floats, as the workers ship them
    }
    live = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    run = types.SimpleNamespace(
        num_classes=5, teacher=types.SimpleNamespace(module=live), teacher_input=IMAGENET
    )
    cpu = torch.device("cpu")
    expected = {
        "cached": T.from_topk(item["topk_logits"], index, item["lse"], 5),
        "online": T.from_logits(
            live(pixels.take(item, "teacher_pixels", IMAGENET, "cpu")).detach()
        ),
        "none": T.from_labels(item["label"], item["partner_label"], item["lam"], 5),
    }
    expected["fixed"], expected["independent"] = expected["cached"], expected["online"]
    for name, want in expected.items():
        m = get_mode(name)
        got = m.target(item, run, cpu)
        want_loss = (
            T.cross_entropy(logits, want)
            if m.trains_on_labels
            else T.kl_divergence(logits, want, 2.0)
        )
        assert torch.allclose(m.loss(logits, got, 2.0), want_loss), name
    # the temperature reaches the KL modes only
    m = get_mode("cached")
    t = m.target(item, run, cpu)
    assert not torch.allclose(m.loss(logits, t, 1.0), m.loss(logits, t, 2.0))
    m = get_mode("none")
    t = m.target(item, run, cpu)
    assert torch.equal(m.loss(logits, t, 1.0), m.loss(logits, t, 2.0))


def test_ablate_uses_the_registry_defaults_except_its_grid():
    """A bare mode in `kdcache ablate --modes` trains the views `kdcache train` defaults to,
    except the grid's two deliberate choices (none: the paper's unmixed baseline; cached:
    ablate builds the cache, so it names its views)."""
    assert GRID_PRESET == {"none": "consistent", "cached": "function_matching"}
    for name, m in MODES.items():
        want = GRID_PRESET.get(name, m.default_views)
        assert parse_mode(name) == (name, want)
        assert DEFAULT_PRESET[name] == want
        if name not in GRID_PRESET:
            assert want == DEFAULT_VIEWS[name]
    with pytest.raises(KdcacheError, match="fixed teachers train on unmixed views"):
        parse_mode("fixed:function_matching")


def test_the_readme_table_shows_the_registry_defaults():
    with open(README) as f:
        text = f.read()
    section = text.split("## Teacher modes and ablations", 1)[1].split("\n\n`fixed` and", 1)[0]
    rows = {
        m.group(1): m.group(2).strip()
        for m in re.finditer(r"^\| `(\w+)` \|.*\| ([^|]+) \|$", section, re.M)
    }
    assert set(rows) == set(MODES)
    for name, m in MODES.items():
        assert rows[name] == (f"`{m.default_views}`" if m.default_views else "the cache's"), name


def test_fit_makes_the_fixed_teachers_center_cache_as_the_cli_does(tmp_path, train_dir, val_dir):
    """The Python API and the CLI prepare fixed mode alike (the cache is made by fit)."""
    from kdcache.store import open_cache
    from kdcache.train import fit

    cache = str(tmp_path / "center.zarr")
    cfg = TrainConfig(
        data=train_dir,
        val=val_dir,
        student="kdcache:tiny_cnn",
        out=str(tmp_path / "run"),
        epochs=1,
        teacher_mode="fixed",
        cache=cache,
        teacher="kdcache:tiny_cnn",
        image_size=16,
        batch_size=8,
        workers=0,
        device="cpu",
        command="pytest",
    )
    fit(cfg)
    made = open_cache(cache)
    assert made.spec.name == "center" and made.complete_epochs() == [0]
    assert made.meta["teacher_image_size"] == 16
    without = TrainConfig(**{**cfg.__dict__, "cache": str(tmp_path / "none.zarr"), "teacher": None,
                             "out": str(tmp_path / "run2")})  # fmt: skip
    with pytest.raises(KdcacheError, match="name the teacher with --teacher"):
        fit(without)
