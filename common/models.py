"""Model specs -> models: ``kdcache:NAME``, ``torchvision:NAME``, ``timm:NAME[.TAG]`` and
``pkg.module:factory``. Nothing is ever downloaded: weights come from ``--*-weights PATH``.

A model's class space is its output width, measured with one forward pass when it is built. A
factory is called without ``num_classes`` when none is asked for and its signature allows it (a
pretrained architecture keeps its own head); a factory that requires it (the built-ins) gets the
caller's default (the data's label count). Each model also resolves its input convention (mean
and std, and the interpolation it names): timm models from their pretrained config, torchvision
models from their default weights' transforms, a user's factory from the attributes its model
carries (:func:`resolve_convention`), the built-ins ImageNet's.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kdcache.errors import KdcacheError
from kdcache.grammar import user_object
from kdcache.render import IMAGENET, InputConvention

log = logging.getLogger(__name__)


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


def _timm_factory(name: str) -> Callable[..., nn.Module]:
    try:
        import timm
    except ImportError:
        raise KdcacheError("timm model specs need timm: pip install 'kdcache[timm]'") from None
    if not timm.is_model(name):
        raise KdcacheError(f"timm has no model {name!r} (see timm.list_models())")

    def factory(num_classes: int | None = None) -> nn.Module:
        extra = {} if num_classes is None else {"num_classes": num_classes}
        return timm.create_model(name, pretrained=False, **extra)

    return factory


def _user_factory(spec: str, source: str, name: str) -> Callable[..., nn.Module]:
    return user_object(source, name, f"model spec {spec!r}")


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
        return _timm_factory(name)
    return _user_factory(spec, source, name)


def _num_classes_param(factory: Callable[..., nn.Module]) -> tuple[bool, bool]:
    """(takes ``num_classes``, requires it) by the factory's signature."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C callable: assume it takes it
        return True, False
    p = params.get("num_classes")
    if p is not None:
        return True, p.default is inspect.Parameter.empty
    return any(q.kind is inspect.Parameter.VAR_KEYWORD for q in params.values()), False


# -- weights -------------------------------------------------------------------------------


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pt``/``.pth`` file (raw, or wrapped in ``model``/``state_dict``, as
    a ``checkpoint.pt`` is) or a ``.safetensors`` file. Prefixes left by DDP (``module.``) and
    ``torch.compile`` (``_orig_mod.``) are dropped."""
    if not os.path.isfile(path):
        raise KdcacheError(f"no weights file at {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, truncated files: all one message
        raise KdcacheError(f"cannot load weights from {path}: {type(e).__name__}: {e}") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise KdcacheError(f"{path} does not hold a state dict (names -> tensors)")
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def _first(names: Sequence[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (", ..." if len(names) > 3 else "")


def load_weights(model: nn.Module, path: str, what: str) -> None:
    """Load ``path`` into ``model``; weights that do not fit are one sentence: counts of missing,
    unexpected and mismatched keys and the first names of each."""
    state = load_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    other = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here" for k in other]
    problems = [
        f"{len(names)} {kind} ({_first(names)})"
        for kind, names in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("keys of another shape", shapes),
        )
        if names
    ]
    if problems:
        widths = {int(state[k].shape[0]) for k in other if state[k].dim()}
        hint = (
            f"the file's head has {widths.pop()} outputs: pass --num-classes with that width"
            if other and not missing and not unexpected and len(widths) == 1
            else "check the model spec, and --num-classes if the head differs"
        )
        raise KdcacheError(
            f"weights {path} do not fit {what}: " + "; ".join(problems) + f"; {hint}"
        )
    model.load_state_dict(state)


# -- building ------------------------------------------------------------------------------


def create_model(
    spec: str,
    num_classes: int | None = None,
    weights: str | None = None,
    seed: int = 0,
    default_classes: int | None = None,
) -> nn.Module:
    """Build the model of ``spec``; load ``weights`` if given.

    num_classes: the width asked for; None lets a factory that does not require it keep its own
        head, and gives one that does ``default_classes``.
    The initialisation is drawn from ``seed`` (the global RNG is left as it was), so a model
    without weights is the same model every time.
    """
    factory = _factory(spec)
    takes, required = _num_classes_param(factory)
    if num_classes is None and required:
        num_classes = default_classes
        if not num_classes:
            raise KdcacheError(
                f"{spec} needs a class count and the data has no labels to count: "
                "pass --num-classes"
            )
    kwargs = {"num_classes": num_classes} if num_classes is not None and takes else {}
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = factory(**kwargs)
    except KdcacheError:
        raise
    except Exception as e:  # the factory's own error: the user's code, the user's fix
        asked = f" with num_classes={num_classes}" if kwargs else ""
        raise KdcacheError(
            f"model factory of {spec!r} failed{asked}: {type(e).__name__}: {e}"
            + ("; pass --num-classes with a width it supports, or none" if kwargs else "")
        ) from None
    if not isinstance(model, nn.Module):
        raise KdcacheError(
            f"model factory of {spec!r} returned {type(model).__name__}, not a model"
        )
    if weights:
        load_weights(model, weights, spec)
    return model


@torch.no_grad()
def output_width(model: nn.Module, image_size: int, spec: str) -> int:
    """The model's number of outputs: one forward pass of a (1, 3, S, S) zero image, in eval
    mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        out = model(torch.zeros(1, 3, image_size, image_size))
    except Exception as e:
        raise KdcacheError(
            f"{spec} cannot run on a {image_size} px image ({type(e).__name__}: {e}); "
            "check the image size option (--image-size / --teacher-image-size)"
        ) from None
    finally:
        model.train(was_training)
    if not torch.is_tensor(out) or out.dim() != 2:
        what = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise KdcacheError(f"{spec} returns {what}, not (batch, classes) logits")
    return int(out.shape[1])


def _vector(value: object) -> tuple[float, float, float] | None:
    try:
        v = tuple(float(x) for x in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return v if len(v) == 3 else None


def resolve_convention(
    spec: str,
    model: nn.Module,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> InputConvention:
    """The input convention of ``model`` built from ``spec``; ``mean``/``std`` override.

    - ``timm:``: ``timm.data.resolve_data_config`` of the model (its pretrained config, so the
      tag in ``timm:arch.tag`` matters);
    - ``torchvision:``: the transforms of ``get_model_weights(name).DEFAULT`` (ImageNet's when
      the model has no weights enum);
    - ``pkg.module:factory``: the model's ``pretrained_cfg`` or ``default_cfg`` dict (timm's
      names: ``mean``, ``std``, ``interpolation``), else attributes ``input_mean``,
      ``input_std``, ``input_interpolation``; else ImageNet's;
    - ``kdcache:``: ImageNet's.
    """
    source, _, name = spec.partition(":")
    found = IMAGENET
    if source == "timm":
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        found = InputConvention(cfg["mean"], cfg["std"], cfg.get("interpolation", "bilinear"))
    elif source == "torchvision":
        import torchvision

        try:
            t = torchvision.models.get_model_weights(name).DEFAULT.transforms()
            found = InputConvention(t.mean, t.std, t.interpolation.value)
        except (ValueError, AttributeError, KeyError):
            pass
    elif source != "kdcache":
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        m = _vector(cfg.get("mean") if isinstance(cfg, dict) else None)
        s = _vector(cfg.get("std") if isinstance(cfg, dict) else None)
        interp = cfg.get("interpolation") if isinstance(cfg, dict) else None
        m = m or _vector(getattr(model, "input_mean", None))
        s = s or _vector(getattr(model, "input_std", None))
        interp = interp or getattr(model, "input_interpolation", None)
        if m and s:
            found = InputConvention(m, s, str(interp or "bilinear"))
    if mean is not None or std is not None:
        found = InputConvention(
            tuple(mean) if mean is not None else found.mean,
            tuple(std) if std is not None else found.std,
            found.interpolation,
        )
    return found


@dataclass
class Model:
    """A built model and what it was resolved to: its class space and input convention."""

    module: nn.Module
    spec: str
    num_classes: int
    convention: InputConvention
    weights: str | None


def load_model(
    spec: str,
    *,
    image_size: int,
    num_classes: int | None = None,
    default_classes: int | None = None,
    weights: str | None = None,
    seed: int = 0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    asked_by: str = "--num-classes",
) -> Model:
    """Build ``spec`` (see :func:`create_model`), measure its width, resolve its convention.

    A width other than ``num_classes`` (when given) is one sentence naming both; ``asked_by``
    says where the asked width came from (an option, the cache, the teacher).
    """
    module = create_model(spec, num_classes, weights, seed, default_classes)
    width = output_width(module, image_size, spec)
    if num_classes is not None and width != num_classes:
        raise KdcacheError(
            f"{spec} has {width} outputs, but {num_classes} classes are asked for ({asked_by}); "
            f"use a model with {num_classes} outputs"
            + (", or drop --num-classes" if asked_by == "--num-classes" else "")
        )
    if width < 2:
        raise KdcacheError(f"{spec} has {width} output; a classifier needs at least 2")
    return Model(module, spec, width, resolve_convention(spec, module, mean, std), weights)


def weights_hash(model: nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes): identifies a teacher."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def warn_random_teacher(spec: str, weights: str | None) -> None:
    """One line when a teacher runs without a weights file: its outputs mean nothing."""
    if not weights:
        log.warning(
            "teacher %s has no --teacher-weights: it runs with a random initialisation, so its "
            "targets carry no knowledge (fine for a smoke test)",
            spec,
        )
