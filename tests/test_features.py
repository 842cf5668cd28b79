"""Feature distillation: layers by their module paths, hooks that capture them, the feature
losses (zero when the student is the teacher, gradients to the student and the loss's own
parts only), and --features through `kdcache train` with a checkpointed regressor."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_steps, run_cli, small_run

from kdcache.errors import KdcacheError
from kdcache.feature_losses import CLASSES, create_feature_loss
from kdcache.features import Tap, layer_shapes, layer_table, parse_pairs
from kdcache.grammar import parse
from kdcache.models import load_model
from kdcache.train.trainer import fit

TEACHER, STUDENT = "kdcache:resnet_s", "kdcache:tiny_cnn"


def maps(seed: int, shape=(6, 8, 4, 4)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_pairs_and_layer_names():
    assert parse_pairs("layer3=2, 5=features.6") == [("layer3", "2"), ("5", "features.6")]
    with pytest.raises(KdcacheError, match="is not TEACHER_LAYER=STUDENT_LAYER"):
        parse_pairs("layer3")
    model = load_model(STUDENT, image_size=16, num_classes=10).module
    table = {name: (kind, shape) for name, kind, shape in layer_table(model, 16)}
    assert table["2"] == ("ReLU", (16, 16, 16)) and table["6"] == ("ReLU", (32, 8, 8))
    assert table["13"] == ("Linear", (10,))
    with pytest.raises(KdcacheError, match="no layer '22'.*`kdcache models --layers SPEC`"):
        Tap(model, ["22"], "--features")
    keys = list(model.state_dict())
    Tap(model, ["5"], "--features").close()
    assert list(model.state_dict()) == keys  # nothing renamed, nothing added


def test_a_tap_keeps_the_output_before_an_inplace_op():
    model = load_model(STUDENT, image_size=16, num_classes=10).module.eval()
    tap = Tap(model, ["1", "2"], "--features")  # BatchNorm, then ReLU(inplace=True)
    model(torch.randn(2, 3, 16, 16))
    bn, relu = tap.take()
    assert (bn < 0).any() and torch.equal(relu, bn.clamp_min(0))
    with pytest.raises(KdcacheError, match="did not run"):
        tap.take()


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_each_feature_loss_is_zero_when_the_student_is_the_teacher(name):
    t = maps(0)
    spec = "akd(p=0)" if name == "akd" else name  # avatars without dropout are the teacher
    loss = create_feature_loss(parse(spec, "+"), [((8, 4, 4), (8, 4, 4))])
    if name == "fitnet":  # an identity regressor makes the student the teacher
        reg = loss.terms[0].regressors[0]
        with torch.no_grad():
            reg.weight.copy_(torch.eye(8)[:, :, None, None])
            reg.bias.zero_()
    with torch.no_grad():
        assert abs(float(loss([t.clone()], [t]))) < 1e-5, name
        assert float(loss([maps(1)], [t])) > 1e-4, name


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_gradients_reach_the_student_and_the_losss_parts_only(name):
    teacher = maps(2, (6, 8, 4, 4)).requires_grad_()
    width = 8 if name == "mse" else 5
    student = maps(3, (6, width, 2, 2)).requires_grad_()  # another width and spatial size
    loss = create_feature_loss(parse(name, "+"), [((8, 4, 4), (width, 2, 2))])
    loss([student], [teacher]).backward()
    assert teacher.grad is None
    assert student.grad is not None and float(student.grad.abs().sum()) > 0
    for p in loss.parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0


def test_a_loss_that_cannot_take_the_shapes_says_so():
    with pytest.raises(KdcacheError, match="at compares spatial maps"):
        create_feature_loss(parse("at", "+"), [((8,), (8,))])
    with pytest.raises(KdcacheError, match="use fitnet .* or --prune-teacher"):
        create_feature_loss(parse("mse", "+"), [((8, 4, 4), (5, 4, 4))])
    assert layer_shapes(load_model(STUDENT, image_size=16, num_classes=10).module, 16, ["8"]) == {
        "8": (64, 4, 4)
    }


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("teacher") / "resnet_s.pt"
    torch.save(load_model(TEACHER, image_size=16, num_classes=10, seed=5).module.state_dict(), path)
    return str(path)


def online(train_dir, val_dir, out, weights=None, **kw):
    return small_run(train_dir, val_dir, out, teacher_mode="online", teacher=TEACHER,
                     teacher_weights=weights, **kw)  # fmt: skip


def test_features_need_a_live_teacher_and_a_feature_term(train_dir, val_dir, tmp_path):
    for kw, needle in (
        (dict(features="4=4"), "--features needs the teacher's features on the student's"),
        (dict(loss="kl+at"), "the feature loss at needs --features"),
        (dict(features="4=4", feature_loss="kl"), "--feature-loss takes feature losses only"),
    ):
        with pytest.raises(KdcacheError, match=needle):
            small_run(train_dir, val_dir, tmp_path / "r", teacher_mode="cached", cache="c",
                      **kw).validate()  # fmt: skip


def test_fitnet_trains_resumes_exactly_and_keeps_its_regressor(
    train_dir, val_dir, tmp_path, teacher_weights
):
    """--features with the default feature loss (fitnet): the regressor is in the checkpoint,
    a kill-and-resume gives the same steps, model.pt is the student alone."""
    kw = dict(features="4=5,5=8", epochs=2, limit=16, loss="kl+fitnet(w=0.5)+at(w=100)",
              weights=teacher_weights)  # fmt: skip
    whole = online(train_dir, val_dir, tmp_path / "whole", **kw)
    fit(whole)
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["loss_resolved"] == "kl(t=1.0)+fitnet(w=0.5)+at(p=2.0, w=100.0)"
    ckpt = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    regressor = ckpt["feature_loss"]["terms.0.regressors.0.weight"]
    assert regressor.shape == (64, 32, 1, 1)  # resnet_s layer 4 (64 ch) <- tiny_cnn 5 (32 ch)
    student_keys = set(load_model(STUDENT, image_size=16, num_classes=10).module.state_dict())
    model = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    assert set(model) == student_keys

    class Killed(Exception):
        pass

    def kill(step_epoch, step, steps, loss):
        if (step_epoch, step) == (1, 0):  # mid-run, after epoch 1's checkpoint
            raise Killed

    with pytest.raises(Killed):
        fit(online(train_dir, val_dir, tmp_path / "half", **kw), on_step=kill)
    fit(online(train_dir, val_dir, tmp_path / "half", **kw, resume=True))
    a, b = read_steps(tmp_path / "whole"), read_steps(tmp_path / "half")
    assert len(a) == 4 and [s["loss"] for s in a] == [s["loss"] for s in b]
    again = torch.load(tmp_path / "half" / "checkpoint.pt", weights_only=False)["feature_loss"]
    assert all(torch.equal(again[k], v) for k, v in ckpt["feature_loss"].items())


def test_kdcache_models_lists_the_layers_features_names():
    code, out, err = run_cli("models", "--layers", "torchvision:resnet18", "--image-size", "64",
                             "--num-classes", "10",
                             "--json")  # fmt: skip
    assert code == 0, err
    layers = {name: shape for name, _, shape in json.loads(out.splitlines()[-1])["layers"]}
    assert layers["layer2"] == [128, 8, 8] and layers["fc"] == [10]
    model = load_model("torchvision:resnet18", image_size=64, num_classes=10).module
    Tap(model, ["layer2", "layer3.1.bn2"], "--features").close()  # the names hook as listed


def test_features_alone_mean_fitnet_and_feature_loss_adds_terms():
    def cfg(**kw):
        return small_run("d", "v", "o", teacher_mode="online", teacher=TEACHER, **kw)

    assert cfg(features="4=4").loss_spec == "kl(t=1.0)+fitnet(w=1.0)"
    assert cfg(features="4=4", feature_loss="pkt").loss_spec == "kl(t=1.0)+pkt"
    assert cfg(features="4=4", loss="dkd").loss_spec == "dkd"  # no feature term: a warning
    assert cfg(features="4=4", loss="dkd+rkd").create_loss().describe().startswith("dkd(")


def test_a_timm_models_layers_tap_by_their_names():
    pytest.importorskip("timm")
    model = load_model("timm:resnet18", image_size=32, num_classes=10).module.eval()
    tap = Tap(model, ["layer3", "embed"], "--features")
    model(torch.zeros(2, 3, 32, 32))
    layer3, embed = tap.take()
    assert layer3.shape == (2, 256, 2, 2) and embed.shape == (2, 512)


def test_a_whole_step_moves_the_student_and_the_regressor_not_the_teacher():
    """The online step's parts as the trainer wires them: the teacher runs under no_grad
    (runtime.teacher_logits) with its tap, the student with its own, KL plus fitnet."""
    from kdcache import targets as T
    from kdcache.losses import create_loss
    from kdcache.runtime import teacher_logits

    teacher = load_model(TEACHER, image_size=16, num_classes=10, seed=1).module.eval()
    student = load_model(STUDENT, image_size=16, num_classes=10, seed=2).module
    t_tap, s_tap = Tap(teacher, ["4"], "t"), Tap(student, ["5"], "s")
    feature = create_feature_loss(parse("fitnet", "+"), [((64, 8, 8), (32, 8, 8))])
    x = torch.randn(4, 3, 16, 16)
    target = T.from_logits(teacher_logits(teacher, x, torch.device("cpu")))
    loss = create_loss("kl")(student(x), target) + feature(s_tap.take(), t_tap.take())
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(float(p.grad.abs().sum()) > 0 for p in feature.parameters())
