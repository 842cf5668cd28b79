"""The results table of docs/methods.md, from the committed run summaries.

    python tools/methods_report.py [docs/results/methods]

Reads every ``STEP/CELL/seedS.json`` that ``kdcache ablate --results`` wrote (tools/methods.sh)
and prints one Markdown row per (step, cell): the loss and feature options, final val accuracy
and retrieval mAPs (mean ± std over seeds), the mean training images/s relative to the step's
plain-KL cell (its own mode's, where the step has one, else step ``logit``'s), and wall time.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections import defaultdict

import numpy as np


def mean_std(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.3f}"


def describe(options: dict) -> str:
    parts = [f"`{options.get('loss') or 'default'}`"]
    if options.get("features"):
        parts.append(f"features `{options['features']}`")
    if options.get("prune_teacher"):
        parts.append("pruned teacher")
    if options.get("curriculum"):
        parts.append(f"curriculum `{options['curriculum']}`")
    return ", ".join(parts)


def main(root: str) -> None:
    cells: dict = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(root, "*", "*", "seed*.json"))):
        step = path.split(os.sep)[-3]
        with open(path) as f:
            cells[(step, path.split(os.sep)[-2])].append(json.load(f))
    rate = {key: np.mean([s["images_per_s"] for s in runs]) for key, runs in cells.items()}
    kl_rate = {
        runs[0]["options"]["teacher_mode"]: rate[key]
        for key, runs in cells.items()
        if runs[0]["options"].get("loss") == "kl" and not runs[0]["options"].get("features")
    }
    print("| step | mode | loss | seeds | val accuracy | mAP cosine | mAP euclidean | "
          "img/s vs KL | wall s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for (step, cell), runs in sorted(cells.items()):
        options = runs[0]["options"]
        last = [r["history"][-1] for r in runs]
        base = kl_rate.get(options["teacher_mode"])
        ratio = f"{rate[(step, cell)] / base:.2f}" if base else "n/a"
        print(
            f"| {step} | {options['teacher_mode']} | {describe(options)} | {len(runs)} | "
            f"{mean_std([m.get('val_accuracy') for m in last])} | "
            f"{mean_std([m.get('retrieval_map_cosine') for m in last])} | "
            f"{mean_std([m.get('retrieval_map_euclidean') for m in last])} | {ratio} | "
            f"{np.mean([r['wall_seconds'] for r in runs]):.0f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/results/methods")
