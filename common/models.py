"""Model specs -> ``nn.Module``: ``kdcache:NAME``, ``torchvision:NAME``, ``timm:NAME`` and
``pkg.module:factory``. Nothing is ever downloaded: weights come from ``--*-weights PATH``.

Every factory is called with ``num_classes=C``. The small built-in nets are for tests and the
digits demo; they work at any input size >= 8 px.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Callable

import torch
from torch import nn

from kdcache.errors import KdcacheError


def tiny_cnn(num_classes: int, width: int = 16) -> nn.Module:
    """Three conv-BN-ReLU blocks and a linear head (~25k parameters at width 16)."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]

    return nn.Sequential(
        *block(3, width),
        nn.MaxPool2d(2),
        *block(width, 2 * width),
        nn.MaxPool2d(2),
        *block(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet_s(num_classes: int, width: int = 32, blocks: tuple[int, ...] = (1, 1, 1)) -> nn.Module:
    """A small CIFAR-style ResNet: 3x3 stem, three stages of basic blocks (strides 1, 2, 2)."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
    ]
    cin = width
    for stage, n in enumerate(blocks):
        cout = width * 2**stage
        for b in range(n):
            layers.append(_BasicBlock(cin, cout, 2 if stage and b == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


BUILTIN: dict[str, Callable[..., nn.Module]] = {"tiny_cnn": tiny_cnn, "resnet_s": resnet_s}


def _factory(spec: str) -> Callable[..., nn.Module]:
    source, sep, name = spec.partition(":")
    if not sep or not name:
        raise KdcacheError(
            f"model spec {spec!r} is not SOURCE:NAME; use kdcache:tiny_cnn, "
            "torchvision:resnet18, timm:resnet50 or pkg.module:factory"
        )
    if source == "kdcache":
        if name not in BUILTIN:
            raise KdcacheError(f"no built-in model {name!r}; choose one of {', '.join(BUILTIN)}")
        return BUILTIN[name]
    if source == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model_builder(name)
        except ValueError:
            raise KdcacheError(
                f"torchvision has no model {name!r} (see torchvision.models.list_models())"
            ) from None
    if source == "timm":
        try:
            import timm
        except ImportError:
            raise KdcacheError("timm model specs need timm: pip install 'kdcache[timm]'") from None
        if not timm.is_model(name):
            raise KdcacheError(f"timm has no model {name!r}")
        return lambda num_classes: timm.create_model(
            name, pretrained=False, num_classes=num_classes
        )
    try:
        module = importlib.import_module(source)
    except ImportError as e:
        raise KdcacheError(f"cannot import {source!r} for model spec {spec!r}: {e}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise KdcacheError(f"{source} has no callable {name!r} (model spec {spec!r})")
    return factory


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from ``model.pt``, a ``checkpoint.pt`` (its ``model``) or a raw state dict.
    Prefixes left by DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) are dropped."""
    if not os.path.isfile(path):
        raise KdcacheError(f"no weights file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, truncated files: all one message
        raise KdcacheError(f"cannot load weights from {path}: {e}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise KdcacheError(f"{path} does not hold a state dict")
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def create_model(
    spec: str, num_classes: int, weights: str | None = None, seed: int = 0
) -> nn.Module:
    """Build the model of ``spec`` with ``num_classes`` outputs; load ``weights`` if given.

    The initialisation is drawn from ``seed`` (the global RNG is left as it was), so a model
    without weights is the same model every time.
    """
    factory = _factory(spec)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = factory(num_classes=num_classes)
    except TypeError as e:
        raise KdcacheError(f"model factory of {spec!r} does not take num_classes: {e}") from None
    if weights:
        state = load_state_dict(weights)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).splitlines()[1:3]
            raise KdcacheError(
                f"weights {weights} do not fit {spec} with {num_classes} classes: "
                + " ".join(s.strip() for s in first)
            ) from None
    return model


def weights_hash(model: nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes): identifies a teacher."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]
