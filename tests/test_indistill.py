"""InDistill: a teacher layer pruned physically to the student's width, keeping its highest-L1
filters and giving exactly those channels of the teacher's output; the layer curriculum that
switches stages at the right epochs and resumes mid-stage exactly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_steps, small_run
from torch import nn

from kdcache.errors import KdcacheError
from kdcache.features import Tap
from kdcache.models import load_model
from kdcache.prune import l1_filters, prune_layer
from kdcache.train.feature_distill import parse_curriculum
from kdcache.train.trainer import fit

TEACHER, STUDENT = "kdcache:resnet_s", "kdcache:tiny_cnn"


def teacher_model() -> nn.Module:
    model = load_model(TEACHER, image_size=16, num_classes=10, seed=4).module
    with torch.no_grad():  # running statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
    return model.eval()


@pytest.mark.parametrize("path", ["4.conv2", "4.bn2", "1"])
def test_a_pruned_layer_has_the_students_width_and_the_highest_l1_filters(path):
    model = teacher_model()
    pruned = prune_layer(model, path, 24)
    conv = pruned.module if isinstance(pruned.module, nn.Conv2d) else pruned.module[0]
    assert conv.out_channels == 24 and conv.weight.shape[0] == 24
    source = model.get_submodule(pruned.source)
    norms = source.weight.abs().flatten(1).sum(1)
    kept = set(pruned.kept.tolist())
    assert min(norms[list(kept)]) >= max(n for i, n in enumerate(norms) if i not in kept)
    assert torch.equal(pruned.kept, l1_filters(source, 24))
    if not isinstance(pruned.module, nn.Conv2d):  # the BatchNorm sliced to match
        bn = pruned.module[1]
        assert bn.num_features == 24 and bn.running_mean.shape == (24,)
    # exactly the teacher's kept channels, the rest of the teacher unchanged
    x = torch.randn(2, 3, 16, 16)
    full = Tap(model, [path], "t")
    narrow = Tap(model, [path], "t", {path: (pruned.source, pruned.module)})
    with torch.no_grad():
        logits = model(x)
    (want,), (got,) = full.take(), narrow.take()
    assert got.shape[1] == 24 and torch.allclose(got, want[:, pruned.kept], atol=1e-5)
    assert torch.equal(logits, model(x).detach())
    assert model.get_submodule(pruned.source).out_channels == source.out_channels


def test_what_cannot_be_pruned_says_so():
    model = teacher_model()
    with pytest.raises(KdcacheError, match="is a _BasicBlock; name the conv or BatchNorm inside"):
        prune_layer(model, "4", 24)
    with pytest.raises(KdcacheError, match="has 64 channels, fewer than the student layer's 80"):
        prune_layer(model, "4.bn2", 80)


def test_the_curriculum_parses_and_switches_at_the_right_epochs():
    stages = parse_curriculum("a:3, b:4,embed:rest", ["a", "b", "embed"])
    assert stages == [(0, 3), (1, 4), (2, None)]
    for bad, needle in (("a:3,embed:rest,b:2", "only the last stage"), ("c:3", "not a teacher"),
                        ("a:x", "write a number"), ("a", "is not LAYER:EPOCHS")):  # fmt: skip
        with pytest.raises(KdcacheError, match=needle):
            parse_curriculum(bad, ["a", "b", "embed"])
    from kdcache.train.feature_distill import FeatureDistill

    fd = FeatureDistill(None, None, None, None, parse_curriculum("a:2,b:1", ["a", "b"]))
    assert [fd.stage(e) for e in range(5)] == [0, 0, 1, None, None]


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("teacher") / "resnet_s.pt"
    torch.save(load_model(TEACHER, image_size=16, num_classes=10, seed=5).module.state_dict(), path)
    return str(path)


def test_indistill_trains_switches_and_resumes_mid_stage(
    train_dir, val_dir, tmp_path, teacher_weights
):
    """resnet_s 4.bn2 (64 channels) pruned to tiny_cnn 5 (32), then the embeddings with PKT,
    then KL: the loss of each epoch is what its stage says; a kill inside the second stage
    resumes to the same steps."""
    kw = dict(teacher_mode="online", teacher=TEACHER, teacher_weights=teacher_weights,
              features="4.bn2=5,embed=embed", prune_teacher=True,
              curriculum="4.bn2:1,embed:1", epochs=3, limit=16)  # fmt: skip
    fit(small_run(train_dir, val_dir, tmp_path / "whole", **kw))
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["loss_resolved"] == "kl(t=1.0)" and config["curriculum"] == "4.bn2:1,embed:1"
    steps = read_steps(tmp_path / "whole")
    assert len(steps) == 6

    class Killed(Exception):
        pass

    def kill(epoch, step, steps, loss):
        if (epoch, step) == (1, 1):  # inside the embed stage, after a mid-epoch checkpoint
            raise Killed

    with pytest.raises(Killed):
        fit(small_run(train_dir, val_dir, tmp_path / "half", checkpoint_every=1, **kw),
            on_step=kill)  # fmt: skip
    fit(small_run(train_dir, val_dir, tmp_path / "half", checkpoint_every=1, resume=True, **kw))
    assert [s["loss"] for s in read_steps(tmp_path / "half")] == [s["loss"] for s in steps]
    # the stages' losses are not KL's: a run without the curriculum differs from epoch 1 on
    plain = {k: v for k, v in kw.items() if k not in ("curriculum", "prune_teacher")}
    fit(small_run(train_dir, val_dir, tmp_path / "plain", **plain))
    other = read_steps(tmp_path / "plain")
    assert other[0]["loss"] != steps[0]["loss"]
