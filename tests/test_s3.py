"""Data and caches on object storage: an S3-compatible server on loopback (moto), via fsspec.

The server is started and stopped by the fixture; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from kdcache.cache import PrecomputeConfig, precompute
from kdcache.cache.verify import verify
from kdcache.data import index as index_module
from kdcache.data.index import load_index
from kdcache.store import open_cache
from kdcache.train import TrainConfig, fit

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def s3(train_dir, val_dir):
    """A moto S3 server on 127.0.0.1 with the tiny shards uploaded to s3://kdcache-test/."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("kdcache-test")
    for split, local in (("train", train_dir), ("val", val_dir)):
        for name in sorted(os.listdir(local)):
            if name.endswith(".tar"):
                fs.put(os.path.join(local, name), f"kdcache-test/{split}/{name}")
    yield fs
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_index_of_s3_shards_matches_local(s3, train_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    remote = load_index("s3://kdcache-test/train")
    local = load_index(train_dir)
    # The fingerprint covers base names, counts and content, not where the shards are.
    assert remote.fingerprint == local.fingerprint
    assert np.array_equal(remote.key_hash, local.key_hash)
    assert remote.units[0].url.startswith("s3://")
    # Indexes of URLs are kept in the user cache directory.
    assert os.listdir(tmp_path / "xdg" / "kdcache" / "index")


def test_cache_on_s3_precompute_train_verify(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cfg = PrecomputeConfig(
        data="s3://kdcache-test/train/train-{000000..000002}.tar",
        teacher="kdcache:tiny_cnn",
        out="s3://kdcache-test/caches/t.zarr",
        epochs=1,
        teacher_image_size=16,
        workers=0,
        device="cpu",
    )
    assert precompute(cfg)["epochs_complete"] == 1
    cache = open_cache("s3://kdcache-test/caches/t.zarr")
    assert cache.complete_epochs() == [0]
    assert s3.exists("kdcache-test/caches/t.zarr/zarr.json")
    # Train on "another machine": no saved index; the shards' index comes from the cache.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-trainer"))
    indexed: list[str] = []
    build = index_module.build_index
    monkeypatch.setattr(
        index_module,
        "build_index",
        lambda urls, p=None, **kw: indexed.extend(urls) or build(urls, p, **kw),
    )
    result = fit(
        TrainConfig(
            data="s3://kdcache-test/train",
            val="s3://kdcache-test/val",
            student="kdcache:tiny_cnn",
            out=str(tmp_path / "run"),
            epochs=1,
            teacher_mode="cached",
            cache="s3://kdcache-test/caches/t.zarr",
            image_size=16,
            batch_size=8,
            workers=2,  # forked workers open their own S3 connections
            device="cpu",
        )
    )
    assert np.isfinite(result["train_loss"])
    assert indexed and not any("/train/" in url for url in indexed)  # only val was read to index
    checked = verify(
        "s3://kdcache-test/caches/t.zarr", "s3://kdcache-test/train", "kdcache:tiny_cnn", samples=10
    )
    assert checked["top1_agreement"] == 1.0
