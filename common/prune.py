"""InDistill's width alignment: a teacher layer pruned to the student layer's width.

For a distilled pair, the teacher layer's output filters with the highest L1 norm are kept, as
many as the student layer has, in a physically narrower copy: a ``Conv2d`` with those filters
only and, when the layer is the ``BatchNorm2d`` after it, that BatchNorm's weight, bias and
running statistics sliced to match (``torch.nn.utils.prune.ln_structured`` only masks, which
leaves the width as it was). The copy is applied to that layer alone: it reads the input the
teacher's own convolution reads, so its output is exactly the kept channels of the teacher's
and the rest of the teacher runs unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from kdcache.errors import KdcacheError
from kdcache.features import module_at


@dataclass
class PrunedLayer:
    """A narrower copy of the teacher layer ``path``, fed the input of its conv ``source``."""

    path: str
    source: str
    module: nn.Module  # Conv2d, or Sequential(Conv2d, BatchNorm2d); eval mode
    kept: torch.Tensor  # (width,) int64: the output channels kept, in the teacher's order


def l1_filters(conv: nn.Conv2d, width: int) -> torch.Tensor:
    """(width,) int64: the ``width`` filters of ``conv`` with the highest L1 norm, sorted by
    index (ties: the lower index)."""
    norms = conv.weight.detach().abs().flatten(1).sum(1)
    order = torch.argsort(-norms, stable=True)
    return order[:width].sort().values


def _narrow_conv(conv: nn.Conv2d, kept: torch.Tensor) -> nn.Conv2d:
    if conv.groups != 1:
        raise KdcacheError("--prune-teacher prunes ordinary convolutions, not grouped ones")
    out = copy.deepcopy(conv)
    out.out_channels = len(kept)
    out.weight = nn.Parameter(conv.weight.detach()[kept].clone(), requires_grad=False)
    if conv.bias is not None:
        out.bias = nn.Parameter(conv.bias.detach()[kept].clone(), requires_grad=False)
    return out


def _narrow_bn(bn: nn.BatchNorm2d, kept: torch.Tensor) -> nn.BatchNorm2d:
    out = copy.deepcopy(bn)
    out.num_features = len(kept)
    if bn.affine:
        out.weight = nn.Parameter(bn.weight.detach()[kept].clone(), requires_grad=False)
        out.bias = nn.Parameter(bn.bias.detach()[kept].clone(), requires_grad=False)
    if bn.track_running_stats:
        out.running_mean = bn.running_mean[kept].clone()
        out.running_var = bn.running_var[kept].clone()
    return out


def _conv_before(model: nn.Module, path: str) -> str:
    """The path of the last ``Conv2d`` before the module at ``path`` among its siblings."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    before = None
    for child_name, child in parent.named_children():
        if child_name == name:
            break
        if isinstance(child, nn.Conv2d):
            before = child_name
    if before is None:
        raise KdcacheError(
            f"--prune-teacher: no convolution comes before the BatchNorm {path!r} in its parent"
        )
    return f"{parent_path}.{before}" if parent_path else before


def prune_layer(model: nn.Module, path: str, width: int) -> PrunedLayer:
    """The teacher layer ``path`` (a ``Conv2d``, or a ``BatchNorm2d`` after one) narrowed to
    ``width`` output channels by the L1 norm of its convolution's filters."""
    layer = module_at(model, path, "--prune-teacher")
    if isinstance(layer, nn.Conv2d):
        source, conv, bn = path, layer, None
    elif isinstance(layer, nn.BatchNorm2d):
        source = _conv_before(model, path)
        conv, bn = model.get_submodule(source), layer
    else:
        raise KdcacheError(
            f"--prune-teacher prunes a Conv2d or the BatchNorm2d after one, and teacher layer "
            f"{path!r} is a {type(layer).__name__}; name the conv or BatchNorm inside it (e.g. "
            f"{path}.bn2 of a residual block: the output before the shortcut is added)"
        )
    if width > conv.out_channels:
        raise KdcacheError(
            f"--prune-teacher: teacher layer {path!r} has {conv.out_channels} channels, fewer "
            f"than the student layer's {width}; nothing to prune (drop --prune-teacher)"
        )
    kept = l1_filters(conv, width)
    module: nn.Module = _narrow_conv(conv, kept)
    if bn is not None:
        module = nn.Sequential(module, _narrow_bn(bn, kept))
    return PrunedLayer(path, source, module.eval(), kept)
