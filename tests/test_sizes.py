"""Bytes per row split into payload and per-file overhead, and the shard size to choose (#10)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from conftest import cache_config, run_cli, write_split

from kdcache import schema
from kdcache.cache import precompute
from kdcache.cache.inspect import summary
from kdcache.sizes import size_report
from kdcache.store import open_cache

IMAGES = 256  # the same images as shards of 8 and of 64


def make_cache(root, per_shard: int, images: int) -> str:
    counts = (per_shard,) * (images // per_shard)
    write_split(root / f"data{per_shard}", "train", counts, seed=1)
    out = str(root / f"c{per_shard}.zarr")
    precompute(cache_config(str(root / f"data{per_shard}"), out, epochs=1))
    return out


@pytest.fixture(scope="module")
def caches(tmp_path_factory, one_torch_thread) -> dict[int, str]:
    root = tmp_path_factory.mktemp("sizes")
    return {n: make_cache(root, n, IMAGES) for n in (8, 64)}


@pytest.fixture(scope="module")
def summaries(caches) -> dict[int, dict]:
    return {n: summary(open_cache(path)) for n, path in caches.items()}


def test_small_shards_pay_more_overhead_per_row(summaries):
    small, large = summaries[8], summaries[64]
    assert small["rows_written"] == large["rows_written"] == IMAGES
    assert small["overhead_fraction"] > large["overhead_fraction"] > 0
    assert small["overhead_bytes_per_row"] > 4 * large["overhead_bytes_per_row"]
    assert small["bytes_per_row"] > large["bytes_per_row"]
    assert small["bytes_per_row_on_disk"] > large["bytes_per_row_on_disk"]
    # the same rows: their payload hardly depends on how they are split into files
    assert small["payload_bytes_per_row"] == pytest.approx(large["payload_bytes_per_row"], rel=0.1)
    assert small["overhead_fraction_on_disk"] > small["overhead_fraction"]


def test_payload_and_overhead_add_up_to_the_files(caches, summaries):
    for n, path in caches.items():
        s = summaries[n]
        apparent = allocated = 0
        for field in schema.ROW_FIELDS:
            for d, _, names in os.walk(os.path.join(path, field.name)):
                for name in names:
                    st = os.stat(os.path.join(d, name))
                    apparent, allocated = apparent + st.st_size, allocated + st.st_blocks * 512
        rows = s["rows_written"]
        assert s["bytes_per_row"] == pytest.approx(apparent / rows, abs=0.01)
        assert s["bytes_per_row_on_disk"] == pytest.approx(allocated / rows, abs=0.01)
        parts = s["payload_bytes_per_row"] + s["overhead_bytes_per_row"]
        assert parts + s["metadata_bytes_per_row"] == pytest.approx(s["bytes_per_row"], abs=0.03)
        on_disk = s["payload_bytes_per_row"] + s["overhead_bytes_per_row_on_disk"]
        total = on_disk + s["metadata_bytes_per_row_on_disk"]
        assert total == pytest.approx(s["bytes_per_row_on_disk"], abs=0.03)
        assert sum(s["bytes_per_row_by_array"].values()) == pytest.approx(s["bytes_per_row"], 1e-3)
        units = IMAGES // n
        assert units * (len(schema.ROW_FIELDS) - 1) <= s["unit_files"]
        assert s["unit_files"] <= units * len(schema.ROW_FIELDS)
    assert size_report(SimpleNamespace(path="s3://bucket/cache.zarr")) is None


def test_recommended_shard_size_brings_overhead_under_ten_percent(
    summaries, tmp_path_factory, one_torch_thread
):
    recs = {n: s["shard_size_for_10pct_overhead"] for n, s in summaries.items()}
    assert recs[8] > 64 and recs[64] > 64
    assert recs[8] == pytest.approx(recs[64], rel=0.25)  # both shard sizes give the same advice
    for s in summaries.values():  # the fixed-cost model: F / (F + p n) < 10 % from n on
        fixed, rate = s["overhead_bytes_per_unit"], s["payload_bytes_per_row"]
        assert 9 * fixed / rate == pytest.approx(s["shard_size_for_10pct_overhead"], abs=2)
        assert s["shard_size_for_10pct_overhead_on_disk"] > 10 * s["shard_size_for_10pct_overhead"]
    rec = recs[64]
    made = summary(open_cache(make_cache(tmp_path_factory.mktemp("rec"), rec, 2 * rec)))
    assert made["overhead_fraction"] < 0.13  # the model's 10 %, give or take F's slow growth
    assert made["overhead_fraction"] < summaries[64]["overhead_fraction"] / 2


def test_inspect_prints_the_split_and_the_advice(caches, summaries):
    code, out, _ = run_cli("inspect", caches[8])
    assert code == 0
    for key in ("payload_bytes_per_row", "overhead_fraction", "shard_size_for_10pct_overhead"):
        assert key in out
    share = f"{summaries[8]['overhead_fraction']:.1%}"
    assert share in out
    rec = summaries[8]["shard_size_for_10pct_overhead"]
    assert f"shards of >= {rec} samples would bring it under 10 %" in out
