"""Avatar KD (issue 16), online: dropout avatars of the teacher's maps that replay from the
run's seed and the loss's call count, standardised by BatchNorm(affine=False), CWD or MSE;
zero when there is no dropout and the student is the teacher; gradients to the student and
its connector only; --akd-features through `kdcache train`, resumed exactly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_steps, small_run

from kdcache.errors import KdcacheError
from kdcache.feature_losses import AKD, channel_wise_divergence, create_feature_loss
from kdcache.grammar import parse
from kdcache.models import load_model
from kdcache.train.trainer import fit

TEACHER = "kdcache:resnet_s"
SHAPES = [((8, 4, 4), (8, 4, 4))]


def maps(seed: int, shape=(6, 8, 4, 4)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def akd(spec: str = "akd", shapes=SHAPES, seed: int = 0) -> AKD:
    torch.manual_seed(seed)
    return create_feature_loss(parse(spec, "+"), shapes).terms[0]


def test_avatars_are_inverted_dropout_and_replay():
    t = maps(0, (64, 8, 8, 8))
    a, b = akd(seed=1), akd(seed=1)
    first = a.avatars([t])[0]
    assert torch.equal(first, b.avatars([t])[0])  # same seed, same call: the same mask
    dropped = first == 0
    assert abs(float(dropped.float().mean()) - 0.1) < 0.01
    assert torch.allclose(first[~dropped], t[~dropped] / 0.9)
    a.calls += 1  # the next step draws another mask
    assert not torch.equal(a.avatars([t])[0], first)
    assert not torch.equal(akd(seed=2).avatars([t])[0], first)  # another --seed, another mask


def test_without_dropout_the_loss_is_zero_when_the_student_is_the_teacher():
    t = maps(1)
    for base in ("cwd", "mse"):
        loss = akd(f"akd(p=0, base='{base}')")
        with torch.no_grad():
            assert float(loss([t.clone()], [t])) < 1e-6, base
            assert float(loss([maps(2)], [t])) > 1e-3, base
    assert float(channel_wise_divergence(t, t)) < 1e-6


def test_gradients_reach_the_student_and_its_connector_only():
    teacher = maps(3, (6, 8, 4, 4)).requires_grad_()
    student = maps(4, (6, 5, 2, 2)).requires_grad_()
    loss = akd("akd(base='mse')", [((8, 4, 4), (5, 2, 2))])
    loss([student], [teacher]).backward()
    assert teacher.grad is None and float(student.grad.abs().sum()) > 0
    params = list(loss.parameters())
    assert len(params) == 2 and all(float(p.grad.abs().sum()) > 0 for p in params)  # 1x1 conv
    assert list(akd().parameters()) == []  # same width: no connector, BatchNorm has no weights


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("teacher") / "resnet_s.pt"
    torch.save(load_model(TEACHER, image_size=16, num_classes=10, seed=5).module.state_dict(), path)
    return str(path)


def test_akd_features_train_and_resume_exactly(train_dir, val_dir, tmp_path, teacher_weights):
    kw = dict(teacher_mode="online", teacher=TEACHER, teacher_weights=teacher_weights,
              akd_features="4=5,5=9", avatar_drop=0.2, epochs=2, limit=16)  # fmt: skip
    fit(small_run(train_dir, val_dir, tmp_path / "whole", **kw))
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["loss_resolved"] == "kl(t=1.0)+akd(p=0.2, base='cwd', tau=1.0)"
    state = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["feature_loss"]
    assert int(state["terms.0.calls"]) == 4  # 2 epochs of 2 steps

    class Killed(Exception):
        pass

    def kill(epoch, step, steps, loss):
        if (epoch, step) == (1, 0):
            raise Killed

    with pytest.raises(Killed):
        fit(small_run(train_dir, val_dir, tmp_path / "half", **kw), on_step=kill)
    fit(small_run(train_dir, val_dir, tmp_path / "half", resume=True, **kw))
    whole, half = read_steps(tmp_path / "whole"), read_steps(tmp_path / "half")
    assert [s["loss"] for s in whole] == [s["loss"] for s in half]
    with pytest.raises(KdcacheError, match="--akd-features is --features PAIRS with an akd term"):
        small_run(train_dir, val_dir, tmp_path / "x", features="4=5", **kw).validate()
