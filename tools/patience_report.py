"""Tables and the patience plot of docs/patience.md, from the committed run summaries.

    python tools/patience_report.py [docs/results/patience]

Reads every ``STEP/CELL[-eEPOCHS][-cCACHE]/seedS.json`` summary that ``kdcache ablate
--results`` wrote, prints Markdown tables (final val accuracy, mean and spread over seeds, per
mode and budget; per cache budget) and writes ``patience.png`` next to them.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
from collections import defaultdict

import numpy as np

NAMES = {  # the run directories' cells, as the doc names them
    "none": "hard labels (none)",
    "fixed": "fixed teacher",
    "cached-consistent": "consistent (cached)",
    "cached-function_matching": "function matching (cached)",
    "online-function_matching": "function matching (online)",
}


def cell_name(slug: str) -> str:
    base = slug.split("-")[0]
    views = "function_matching" if "mixup" in slug else "consistent" if "flip" in slug else ""
    key = base if base in ("none", "fixed") else f"{base}-{views}"
    return NAMES.get(key, slug)


def load(root: str) -> dict:
    """-> {(step, cell, epochs, cache): [final val accuracy per seed]} and wall seconds."""
    out: dict = defaultdict(list)
    wall: dict = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(root, "*", "*", "seed*.json"))):
        step, run = path.split(os.sep)[-3:-1]
        with open(path) as f:
            s = json.load(f)
        m = re.fullmatch(r"(.+?)(?:-e(\d+))?(?:-c(\d+))?", run)
        epochs = int(m.group(2) or s["options"]["epochs"])
        cache = int(m.group(3)) if m.group(3) else None
        views = s["options"].get("views_per_decode", 1)
        reuse = s["options"].get("reuse", "cycle")
        key = (step, cell_name(m.group(1)), epochs, cache, reuse, views)
        out[key].append(s["history"][-1]["val_accuracy"])
        wall[key].append(s["wall_seconds"])
    return out, wall


def fmt(values: list[float]) -> str:
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {float(np.std(values, ddof=1)):.3f} ({len(values)})"


def main() -> None:
    root = sys.argv[1] if len(sys.argv) > 1 else "docs/results/patience"
    acc, wall = load(root)
    curves: dict = defaultdict(dict)
    for (step, cell, epochs, cache, _reuse, views), values in acc.items():
        if (
            cache is None
            and views == 1
            and step in ("grid", "online", "long", "fm1000", "long1000")
        ):
            curves[cell].setdefault(epochs, []).extend(values)
    budgets = sorted({e for c in curves.values() for e in c})
    print("| mode | " + " | ".join(f"{e} epochs" for e in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for cell, points in curves.items():
        print(
            f"| {cell} | "
            + " | ".join(fmt(points[e]) if e in points else "" for e in budgets)
            + " |"
        )
    budget = [k for k in acc if k[0].startswith("cache")]
    if budget:
        print("\n| cache epochs | reuse | final val accuracy | wall s |")
        print("|---|---|---|---|")
        for key in sorted(budget, key=lambda k: (k[4], k[3] or 10**9)):
            size = "all" if key[3] is None else key[3]
            print(f"| {size} | {key[4]} | {fmt(acc[key])} | {np.mean(wall[key]):.0f} |")
    passes = [k for k in acc if k[5] != 1]
    if passes:
        print("\n| mode | epochs | views per decode | final val accuracy | wall s |")
        print("|---|---|---|---|---|")
        for key in passes:
            plain = next(
                (k for k in acc if k[1:5] == key[1:5] and k[5] == 1 and k[0] == "long"), None
            )
            for k in [plain, key] if plain else [key]:
                print(f"| {k[1]} | {k[2]} | {k[5]} | {fmt(acc[k])} | {np.mean(wall[k]):.0f} |")
    print("\n| run | wall s (mean over seeds) |\n|---|---|")
    for key in sorted(wall, key=lambda k: (k[1], k[2])):
        print(
            f"| {key[0]}: {key[1]}, {key[2]} epochs{'' if key[3] is None else f', cache {key[3]}'}"
            f" ({key[4]}{'' if key[5] == 1 else f', {key[5]} views per decode'})"
            f" | {np.mean(wall[key]):.0f} |"
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for cell, points in curves.items():
        xs = sorted(points)
        ys = [float(np.mean(points[x])) for x in xs]
        ax.plot(xs, ys, marker="o", label=cell)
    ax.set(xscale="log", xlabel="student epochs", ylabel="final val accuracy",
           title="patience on digits (32 px, 512 training images)")  # fmt: skip
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(root, "patience.png"))


if __name__ == "__main__":
    main()
