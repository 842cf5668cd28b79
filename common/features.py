"""Intermediate features of a model, by the module paths its state dict already uses.

A layer is named by its path in ``model.named_modules()``: ``layer2`` (torchvision's ResNet),
``features.6``, ``blocks.3`` (timm), ``3`` (the built-ins' ``nn.Sequential``); ``embed`` is
the input of the model's last linear layer (its embedding). Nothing is
renamed: the state-dict keys and the weights hash depend on the names. :class:`Tap` captures
the outputs of named layers with forward hooks; :func:`layer_table` lists every layer with its
output shape (``kdcache models --layers SPEC``). ``--features`` pairs them,
``TEACHER_LAYER=STUDENT_LAYER,...`` with the teacher on the left (:func:`parse_pairs`).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from kdcache.errors import KdcacheError

if TYPE_CHECKING:  # torch is imported when a model is tapped, not for --help
    import torch
    from torch import nn

EXAMPLE = "layer3=2,layer4=5"


def parse_pairs(spec: str, what: str = "--features") -> list[tuple[str, str]]:
    """``"t1=s1,t2=s2"`` -> [("t1", "s1"), ("t2", "s2")]; a :class:`KdcacheError` otherwise."""
    pairs = []
    for part in spec.split(","):
        teacher, eq, student = (p.strip() for p in part.partition("="))
        if not eq or not teacher or not student:
            raise KdcacheError(
                f"{what} {spec!r}: {part.strip()!r} is not TEACHER_LAYER=STUDENT_LAYER; write "
                f"pairs joined by commas, e.g. {EXAMPLE} (`kdcache models --layers SPEC` lists "
                "a model's layers)"
            )
        pairs.append((teacher, student))
    return pairs


def module_at(model: nn.Module, path: str, what: str) -> nn.Module:
    """The submodule at ``path`` (a name of ``model.named_modules()``); an error naming the
    closest paths otherwise."""
    names = dict(model.named_modules())
    if path in names and path:
        return names[path]
    close = difflib.get_close_matches(path, [n for n in names if n], n=4, cutoff=0.4)
    hint = f"; close: {', '.join(close)}" if close else ""
    raise KdcacheError(
        f"{what}: the model has no layer {path!r}{hint}; `kdcache models --layers SPEC` lists "
        "its layers with their output shapes"
    )


def _tensor(output: object, path: str) -> torch.Tensor:
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, list | tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise KdcacheError(
        f"layer {path!r} returns {type(output).__name__}, not a tensor; name a layer whose "
        "output is a feature map"
    )


EMBED = "embed"  # the input of the model's last nn.Linear: its embedding


def embedding_layer(model: nn.Module) -> nn.Module:
    """The model's last ``nn.Linear`` (its head): its input is the embedding."""
    from torch import nn

    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise KdcacheError(
            f"{type(model).__name__} has no nn.Linear layer whose input would be its embedding; "
            f"'{EMBED}' needs a model with a linear head"
        )
    return linear[-1]


class Tap:
    """Forward hooks on the layers ``paths`` of ``model``: after a forward, :meth:`take`
    returns their outputs in that order (each a clone, so an in-place op after the layer, such
    as ``ReLU(inplace=True)``, does not change what was captured; gradients flow through it).

    The path ``embed`` is the input of the model's last linear layer, flattened to (B, D).
    substitutes: path -> (source path, module): that path's feature is ``module`` applied to
    the input of the layer at ``source`` instead (a pruned copy, :mod:`kdcache.prune`)."""

    def __init__(
        self,
        model: nn.Module,
        paths: Sequence[str],
        what: str,
        substitutes: Mapping[str, tuple[str, nn.Module]] | None = None,
    ):
        self.paths = list(paths)
        self._out: dict[str, torch.Tensor] = {}
        self._hooks = []
        substitutes = substitutes or {}
        for path in dict.fromkeys(self.paths):  # a layer named twice is hooked once
            if path in substitutes:
                source, replacement = substitutes[path]
                module = module_at(model, source, what)
                hook = module.register_forward_hook(self._instead(path, replacement))
            elif path == EMBED:
                hook = embedding_layer(model).register_forward_pre_hook(self._input(path))
            else:
                module = module_at(model, path, what)
                hook = module.register_forward_hook(self._keep(path))
            self._hooks.append(hook)

    def _keep(self, path: str):
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            self._out[path] = _tensor(output, path).clone()

        return hook

    def _input(self, path: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            self._out[path] = inputs[0].flatten(1).clone()

        return hook

    def _instead(self, path: str, replacement: nn.Module):
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            self._out[path] = replacement(inputs[0])

        return hook

    def take(self) -> list[torch.Tensor]:
        """The captured outputs, one per path, and forget them."""
        missing = [p for p in self.paths if p not in self._out]
        if missing:
            raise KdcacheError(
                f"layers {', '.join(missing)} did not run in the forward pass; name layers "
                "the model's forward calls"
            )
        out, self._out = [self._out[p] for p in self.paths], {}
        return out

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._out = [], {}


def layer_shapes(
    model: nn.Module, image_size: int, paths: Sequence[str] | None = None
) -> dict[str, tuple[int, ...]]:
    """Output shape of each layer (all named submodules when ``paths`` is None; ``embed``
    the head's input) for one (1, 3, S, S) zero input on the model's device, batch dimension
    dropped; layers whose output is not a tensor, or that the forward does not call, are left
    out."""
    import torch

    modules = dict(model.named_modules())
    names = [n for n in (paths if paths is not None else modules) if n]
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name in names:
        if name == EMBED and paths is not None:

            def pre(module, inputs):
                shapes[EMBED] = tuple(inputs[0].flatten(1).shape[1:])

            hooks.append(embedding_layer(model).register_forward_pre_hook(pre))
            continue
        module = modules[name] if paths is None else module_at(model, name, "--features")

        def hook(module, inputs, output, name=name):
            if isinstance(output, torch.Tensor):
                shapes[name] = tuple(output.shape[1:])

        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters(), torch.empty(0)).device
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return {n: shapes[n] for n in names if n in shapes}


def layer_table(model: nn.Module, image_size: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(path, module class, output shape) of every layer the forward calls, in module order."""
    shapes = layer_shapes(model, image_size)
    return [
        (name, type(module).__name__, shapes[name])
        for name, module in model.named_modules()
        if name in shapes
    ]
