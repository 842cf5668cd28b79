"""The results table of docs/methods.md, from the committed run summaries.

    python tools/methods_report.py [docs/results/methods]

Reads every ``STEP/CELL/seedS.json`` that ``kdcache ablate --results`` wrote (tools/methods.sh)
and prints one Markdown row per (step, cell): the loss and feature options, final val accuracy
and retrieval mAPs (mean ± std over seeds) and the mean wall time per run. Step-time costs are
not read from these runs (they shared the machine in varying ways): `tools/bench.py`'s methods
stage measures them side by side.
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
    if options.get("akd_features"):
        parts.append(
            f"avatar KD on `{options['akd_features']}` (p {options.get('avatar_drop')}, "
            f"{options.get('akd_loss')})"
        )
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
    print("| step | mode | loss | seeds | val accuracy | mAP cosine | mAP euclidean | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for (step, _cell), runs in sorted(cells.items()):
        options = runs[0]["options"]
        last = [r["history"][-1] for r in runs]
        print(
            f"| {step} | {options['teacher_mode']} | {describe(options)} | {len(runs)} | "
            f"{mean_std([m.get('val_accuracy') for m in last])} | "
            f"{mean_std([m.get('retrieval_map_cosine') for m in last])} | "
            f"{mean_std([m.get('retrieval_map_euclidean') for m in last])} | "
            f"{np.mean([r['wall_seconds'] for r in runs]):.0f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/results/methods")
