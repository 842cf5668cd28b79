"""DKD on a top-k target against the dense loss, on real teacher and student outputs.

    python tools/dkd_topk.py TEACHER_RUN STUDENT_RUN VAL_SHARDS [--k 1,2,3,5]

Both runs are `kdcache train` run directories (their config.json names the model, size and
input convention). On the val images' center views, the teacher's logits give the dense
target (K = C) and top-k targets with the spread tail, as a cache of ``--topk K`` stores them;
for each K it prints the relative error of the batch-mean DKD loss, the mean per-row relative
error and the cosine between the gradients (with respect to the student's logits) of the
approximate and the dense loss (docs/methods.md quotes the output).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from kdcache import pixels
from kdcache import targets as T
from kdcache.data.index import load_index
from kdcache.models import load_model
from kdcache.train.evaluate import eval_batches


def model_of(run: str):
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    model = load_model(
        config["student"],
        image_size=config["image_size_resolved"],
        num_classes=config["num_classes"],
        weights=os.path.join(run, "model.pt"),
    )
    return model.module.eval(), config["image_size_resolved"], model.convention


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("teacher_run")
    p.add_argument("student_run")
    p.add_argument("val")
    p.add_argument("--k", default="1,2,3,5")
    args = p.parse_args()
    teacher, size, t_conv = model_of(args.teacher_run)
    student, s_size, s_conv = model_of(args.student_run)
    batches = eval_batches(load_index(args.val), s_size, size, s_conv, t_conv)
    zs, zt, labels = [], [], []
    with torch.no_grad():
        for b in range(len(batches)):
            item = batches[b]
            zs.append(student(pixels.take(item, "pixels", s_conv, "cpu")))
            zt.append(teacher(pixels.take(item, pixels.teacher_name(item), t_conv, "cpu")))
            labels.append(item["label"])
    zs, zt, labels = torch.cat(zs), torch.cat(zt), torch.cat(labels).long()
    classes = zt.shape[1]
    dense_target = T.from_logits(zt)

    def rows_and_grad(target):
        z = zs.clone().requires_grad_()
        rows = T.dkd_rows(z, target, labels, 1.0, 8.0, 4.0)
        rows.mean().backward()
        return rows.detach(), z.grad

    dense, dense_grad = rows_and_grad(dense_target)
    print(f"{len(labels)} val images, {classes} classes; DKD(alpha=1, beta=8, T=4), dense mean "
          f"{float(dense.mean()):.4f}")  # fmt: skip
    print("| K | mean loss, relative error | per row, mean relative error | gradient cosine |")
    print("|---|---|---|---|")
    for k in [int(x) for x in args.k.split(",")]:
        approx, grad = rows_and_grad(T.from_logits(zt, k))
        mean_err = abs(float(approx.mean() - dense.mean())) / float(dense.mean())
        row_err = float(((approx - dense).abs() / dense.clamp_min(1e-8)).mean())
        cosine = float(F.cosine_similarity(grad.flatten(), dense_grad.flatten(), dim=0))
        print(f"| {k} | {mean_err:.4f} | {row_err:.4f} | {cosine:.4f} |")


if __name__ == "__main__":
    main()
