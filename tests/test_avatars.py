"""Avatar KD (issue 16), online: dropout avatars of the teacher's maps that replay from the
run's seed and the loss's call count, standardised by BatchNorm(affine=False), CWD or MSE;
zero when there is no dropout and the student is the teacher; gradients to the student and
its connector only; --akd-features through `kdcache train`, resumed exactly."""

from __future__ import annotations

import json

import numpy as np
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


# -- cached avatars ---------------------------------------------------------------------------


from conftest import TEACHER as CACHE_TEACHER  # noqa: E402
from conftest import cache_config  # noqa: E402

from kdcache import avatars as A  # noqa: E402
from kdcache import schema  # noqa: E402
from kdcache import targets as T  # noqa: E402
from kdcache.cache import precompute  # noqa: E402
from kdcache.cache.verify import verify  # noqa: E402
from kdcache.errors import CacheMismatchError  # noqa: E402
from kdcache.losses import create_loss  # noqa: E402
from kdcache.store import open_cache  # noqa: E402


@pytest.fixture(scope="module")
def avatar_cache(tmp_path_factory, train_dir) -> str:
    out = str(tmp_path_factory.mktemp("avatars") / "av.zarr")
    precompute(cache_config(train_dir, out, epochs=2, avatars=3, avatar_drop=0.3))
    return out


def test_an_avatar_cache_holds_the_ensemble_and_replays_it(avatar_cache, train_dir):
    cache = open_cache(avatar_cache)
    assert cache.schema_version == schema.AVATARS_VERSION
    assert cache.avatars == {"n": 3, "drop": 0.3, "site": "10"}  # tiny_cnn: the last ReLU
    rows = cache.read_unit(0, 0)
    ok = rows["status"] == schema.OK
    assert (rows["avatar_u"][ok] > 0).all() and (rows["avatar_u"][~ok] == 0).all()
    ens = T.from_topk(*(torch.from_numpy(rows[f"avatar_{n}"][ok]) for n in
                        ("topk_logits", "topk_index", "lse")), cache.num_classes)  # fmt: skip
    assert torch.allclose(ens.dense().sum(1), torch.ones(int(ok.sum())), atol=1e-2)
    # re-running the teacher on the cached views with the stored view keys: the same avatars
    report = verify(avatar_cache, train_dir, CACHE_TEACHER, samples=40,
                    device="cpu", workers=0)  # fmt: skip
    assert report["avatar_top1_agreement"] == 1.0 and report["avatar_max_abs_u_error"] == 0.0
    assert report["avatar_topk_set_agreement"] == 1.0
    assert report["avatar_max_abs_logp_error"] < 1e-2  # the stored float16
    # a job without avatars is not this cache
    with pytest.raises(CacheMismatchError, match="avatars: cache has"):
        precompute(cache_config(train_dir, avatar_cache, epochs=3))


def test_without_dropout_the_avatars_are_the_teacher():
    model = load_model("kdcache:tiny_cnn", image_size=16, num_classes=10, seed=3).module.eval()
    x = torch.randn(5, 3, 16, 16)
    seeds = A.mask_keys(np.arange(5, dtype=np.uint64), 4)
    with torch.no_grad():
        plain = model(x)
        with A.perturbed(model, A.default_site(model, 16), seeds, 0.0):
            stacked = model(x)
    teacher, log_ens, u = A.ensemble(stacked, 4)
    assert torch.allclose(teacher, plain, atol=1e-5) and float(u.abs().max()) == 0.0
    assert torch.allclose(log_ens, plain.log_softmax(1), atol=1e-5)
    with torch.no_grad(), A.perturbed(model, "10", seeds, 0.5):
        _, _, u = A.ensemble(model(x), 4)
    assert (u > 0).all()


def test_the_uncertainty_weight_is_bounded_and_the_term_trains_the_student_only():
    u = torch.tensor([0.0, 0.5, 1.0, 30.0])
    w = T.uncertainty_weight(u)
    assert (w > 0).all() and (w <= 1).all() and w[0] == 1 and w[3] < w[1]
    assert torch.equal(T.uncertainty_weight(torch.zeros(3)), torch.ones(3))
    g = torch.Generator().manual_seed(0)
    z, zt, za = (torch.randn(4, 10, generator=g) for _ in range(3))
    target = T.from_logits(zt, 3)
    target.avatar, target.avatar_u = T.from_logits(za, 3), u
    student = z.clone().requires_grad_()
    loss = create_loss("avatar_kl")(student, target)
    want = (T.kl_rows(z, target.avatar) * w).mean()
    assert torch.allclose(loss, want)
    assert torch.allclose(T.kl_rows(z, target).mean(), T.kl_divergence(z, target), atol=1e-6)
    loss.backward()
    assert student.grad is not None and target.avatar.logp.grad is None
    flat = create_loss("avatar_kl(uncertainty='none')")(z, target)
    assert torch.allclose(flat, T.kl_rows(z, target.avatar).mean())


def test_train_with_avatars_and_refused_without(avatar_cache, tiny_cache, train_dir, val_dir,
                                                tmp_path):  # fmt: skip
    kw = dict(teacher_mode="cached", epochs=1, image_size=16, limit=24)
    with pytest.raises(KdcacheError, match="needs avatar ensembles, and cache .* holds none"):
        fit(small_run(train_dir, val_dir, tmp_path / "no", cache=tiny_cache, avatar_weight=1.0,
                      **kw))  # fmt: skip
    losses = {}
    for name, extra in (("kl", {}), ("inverse", dict(avatar_weight=2.0)),
                        ("none", dict(avatar_weight=2.0, avatar_uncertainty="none"))):  # fmt: skip
        out = tmp_path / name
        fit(small_run(train_dir, val_dir, out, cache=avatar_cache, **kw, **extra))
        losses[name] = read_steps(out)[0]["loss"]
    config = json.loads((tmp_path / "inverse" / "config.json").read_text())
    assert config["loss_resolved"] == "kl(t=1.0)+avatar_kl(t=1.0, uncertainty='inverse', w=2.0)"
    assert len(set(losses.values())) == 3, losses  # the term is in the loss, and its weights


def test_damage_to_an_avatar_array_is_found_and_repaired_to_the_same_bytes(
    avatar_cache, train_dir, tmp_path
):
    from conftest import chunk_file, copy_tree, flip_byte

    from kdcache.errors import CacheDamagedError

    cache = copy_tree(avatar_cache, tmp_path / "c.zarr")
    before = open_cache(cache).read_unit(1, 1)
    flip_byte(chunk_file(cache, "avatar_topk_logits", 1, 1))
    with pytest.raises(CacheDamagedError, match="avatar_topk_logits epoch 1 unit 1"):
        verify(cache, train_dir, CACHE_TEACHER, samples=8, device="cpu")
    verify(cache, train_dir, CACHE_TEACHER, samples=8, device="cpu", repair=True)
    after = open_cache(cache).read_unit(1, 1)
    for name, want in before.items():
        assert np.array_equal(after[name], want), name
