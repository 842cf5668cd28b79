"""``kdcache inspect``: :func:`summary`, the report of what a cache is, how far it got and what it
costs on disk (the sizes themselves are :mod:`kdcache.sizes`')."""

from __future__ import annotations

from typing import Any

import numpy as np

from kdcache import schema
from kdcache.sizes import size_report
from kdcache.store import Cache


def summary(cache: Cache) -> dict[str, Any]:
    """What ``kdcache inspect`` prints: progress, size on disk, and what the cache is."""
    done = cache.done_mask()
    counts = np.array([u.count for u in cache.units], dtype=np.int64)
    rows_written = int((done * counts[None, :]).sum())
    # Bytes per row (apparent and on disk), payload vs per-file overhead, and the shard size
    # that would bring the overhead under 10 %: kdcache.sizes says what each number means.
    sizes = size_report(cache, done) or {"bytes_per_row": None, "bytes_per_row_by_array": None}
    by_op = None
    if sizes.get("bytes_per_row_by_array"):
        # Which op's parameters each array holds (the teacher's outputs and the row status are
        # "teacher" and "status", the avatar ensembles "avatars"; the view's replay seed is
        # "view").
        owners = cache.spec.field_owners()
        by_op = {}
        for name, value in sizes["bytes_per_row_by_array"].items():
            owner = owners.get(name) or {"seed": "view", "status": "status"}.get(name)
            owner = owner or ("avatars" if name.startswith("avatar_") else "teacher")
            by_op[owner] = round(by_op.get(owner, 0.0) + value, 2)
    m = cache.meta
    return {
        "path": cache.path,
        "schema_version": m["schema_version"],
        "epochs_allocated": cache.epochs,
        "epochs_complete": len(cache.complete_epochs()),
        "epochs_per_block": cache.epochs_per_block,
        "units": len(cache.units),
        "units_done": int(done.sum()),
        "work_units_total": int(done.size),
        "samples": int(m["data"]["num_samples"]),
        "rows_written": rows_written,
        **sizes,
        "teacher": m["teacher"],
        "teacher_weights_hash": m["teacher_weights_hash"],
        "views": m["views"]["name"],
        "view_spec": m["views"]["spec"],
        "renderer": m.get("renderer", "pil-bilinear-v1"),  # what the views were rendered by
        "bytes_per_row_by_op": by_op,
        "plan_seed": m["plan_seed"],
        "topk": m["topk"],
        # avatar ensembles (Avatar KD): {"n": N, "drop": P, "site": LAYER}, n 0 for none; their
        # bytes are bytes_per_row_by_op["avatars"]
        "avatars": cache.avatars,
        "num_classes": m["num_classes"],
        "teacher_image_size": m["teacher_image_size"],
        "integrity": (
            "manifest: every committed unit file is checked against the checksums recorded "
            "when it was committed"
            if cache.has_manifest
            else "chunk checksums only (made before manifests): a damaged chunk is found, "
            "a lost or swapped unit file of some arrays may not be"
        ),
        "teacher_input": cache.teacher_input.describe(),
        "teacher_random_init": m.get("teacher_random_init"),  # None: not recorded (schema 1)
        "bad_row_rule": (
            f"schema {cache.schema_version}: an unusable image, no label or a label outside "
            "the classes (kept when extended)"
            if schema.labels_rule(cache.schema_version)
            else f"schema {cache.schema_version}: an unusable image (labels play no part)"
        ),
        "data_fingerprint": m["data_fingerprint"],
        "created": m.get("created"),
        "command": m.get("command"),
        "versions": m.get("versions"),
    }
