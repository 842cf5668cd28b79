"""Where to put the avatars: KL(avatar ensemble || teacher) at each site, on real views.

    python tools/avatar_sites.py TEACHER_RUN VAL_SHARDS [--sites 3,4,5,8] [--n 4] [--p 0.1]

TEACHER_RUN is a `kdcache train` run directory (its config.json names the model, size and input
convention). On the val images' center views, for each site (a module path whose input the
avatars' dropout perturbs; the default site of `kdcache precompute --avatars` is marked), it
prints the mean KL(ensemble || teacher), the mean uncertainty u and the ensemble's top-1
agreement with the teacher (docs/methods.md quotes the output).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from kdcache import avatars as A
from kdcache.data.index import load_index
from kdcache.models import load_model
from kdcache.pixels import take
from kdcache.train.evaluate import eval_batches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("teacher_run")
    p.add_argument("val")
    p.add_argument("--sites", default=None, help="module paths [every top-level layer]")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--p", type=float, default=0.1)
    args = p.parse_args()
    with open(os.path.join(args.teacher_run, "config.json")) as f:
        config = json.load(f)
    size = config["image_size_resolved"]
    built = load_model(config["student"], image_size=size, num_classes=config["num_classes"],
                       weights=os.path.join(args.teacher_run, "model.pt"))  # fmt: skip
    model = built.module.eval()
    default = A.default_site(model, size)
    sites = args.sites.split(",") if args.sites else [n for n, _ in model.named_children()]
    batches = eval_batches(load_index(args.val), size, student_input=built.convention)
    pixels = torch.cat(
        [take(batches[b], "pixels", built.convention, "cpu") for b in range(len(batches))]
    )
    keys = np.arange(len(pixels), dtype=np.uint64)  # any fixed keys: one mask set per image
    print(f"{len(pixels)} val images; {args.n} avatars, dropout {args.p}; default site {default}")
    print("| site (its input perturbed) | KL(ensemble ‖ teacher) | mean u | top-1 agreement |")
    print("|---|---|---|---|")
    for site in sites:
        with torch.no_grad(), A.perturbed(model, site, A.mask_keys(keys, args.n), args.p):
            try:
                stacked = model(pixels)
            except RuntimeError as e:  # a site whose input the rest of the model reads again
                print(f"| {site} | n/a ({str(e).splitlines()[0][:60]}) | | |")
                continue
        teacher, log_ens, u = A.ensemble(stacked, args.n)
        log_t = teacher.log_softmax(1)
        kl = (log_ens.exp() * (log_ens - log_t)).sum(1).mean()
        agree = (log_ens.argmax(1) == teacher.argmax(1)).float().mean()
        mark = " (default)" if site == default else ""
        print(f"| {site}{mark} | {float(kl):.5f} | {float(u.mean()):.2e} | {float(agree):.4f} |")


if __name__ == "__main__":
    main()
