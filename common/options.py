"""Config fields that carry their own command-line option: one source per option.

A config dataclass (``TrainConfig``, ``PrecomputeConfig``, ``AblateConfig``) declares each field
with :func:`option`: its default, its help text, and, where the name does not say it, how the
command line spells and parses it. :func:`add_options` turns a dataclass's fields into argparse
options; :func:`build` makes the dataclass back from the parsed options, a ``--config FILE``
(JSON or YAML) and the defaults, the command line winning over the file and the file over the
defaults. A field declared with plain ``field()`` or a bare default has no option.

argparse stays the parser (no new dependency, and every existing spelling, alias and help line
is kept as it was); this module only feeds it. It imports neither torch nor zarr: the config
modules import it, and ``kdcache --help`` must stay fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kdcache.errors import KdcacheError

MISSING = dataclasses.MISSING


def option(
    default: Any = MISSING,
    *,
    help: str,
    flags: tuple[str, ...] = (),
    parse: Callable[[str], Any] | None = None,
    choices: Iterable[str] | None = None,
    metavar: str | None = None,
    group: str | None = None,
    shown: str | None = None,
    repeat: bool = False,
    default_factory: Any = MISSING,
) -> Any:
    """A dataclass field with its command-line option.

    help: the option's help; the default is appended as ``[default]``, or ``shown`` instead
      (for defaults that are decided later, such as "the cache's").
    flags: the spellings (default ``--field-name``); later ones are aliases (old spellings).
    parse: str -> value (default: from the annotation: int, float, str, px-or-auto, R,G,B).
    repeat: the option may be given several times, and each value may hold several items
      separated by top-level commas (commas inside brackets do not split); the field is a tuple.
    group: the help section the option is listed under.
    """
    metadata = {
        "help": help,
        "flags": tuple(flags),
        "parse": parse,
        "choices": tuple(choices) if choices is not None else None,
        "metavar": metavar,
        "group": group,
        "shown": shown,
        "repeat": repeat,
    }
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def image_size(text: str) -> int | str:
    """``224`` -> 224; ``auto`` stays (the data's median short side)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected px (an integer) or auto, got {text!r}"
        ) from None


def rgb(text: str) -> tuple[float, float, float]:
    """``0.5,0.4,0.3`` -> (0.5, 0.4, 0.3); one value is used for all three channels."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected R,G,B (or one value), got {text!r}")
    return values  # type: ignore[return-value]


def split_top_level(text: str) -> list[str]:
    """``a,b(x=1, y=2),c`` -> ["a", "b(x=1, y=2)", "c"]: commas inside brackets stay."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


# Parsers by annotation (``from __future__ import annotations`` keeps them as strings).
_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "str": str,
    "int | str": image_size,
    "tuple[float, float, float]": rgb,
    "tuple[str, ...]": str,
    "tuple[int, ...]": int,
}


class _Items:
    """argparse ``type`` of a repeatable option: one value -> its comma-separated items."""

    def __init__(self, parse: Callable[[str], Any], what: str):
        self.parse, self.what = parse, what
        self.__name__ = what  # argparse names the type in its error messages

    def __call__(self, text: str) -> list[Any]:
        try:
            return [self.parse(p) for p in split_top_level(text)]
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(
                f"expected {self.what}, or several separated by commas, got {text!r}"
            ) from None


def _annotation(f: dataclasses.Field) -> str:
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return text.removesuffix(" | None")


def _parser_of(f: dataclasses.Field) -> Callable[[str], Any]:
    parse = f.metadata.get("parse")
    if parse is not None:
        return parse
    try:
        return _PARSERS[_annotation(f)]
    except KeyError:
        raise TypeError(
            f"option {f.name}: no parser for {f.type!r}; give option(parse=...)"
        ) from None


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not MISSING or f.default_factory is not MISSING


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def flag(f: dataclasses.Field) -> str:
    """The option's main spelling: ``--teacher-mode`` for ``teacher_mode``."""
    return (f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),))[0]


def _show_default(value: Any) -> str:
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    return str(value)


def cli_fields(cls: type, only: Iterable[str] | None = None) -> list[dataclasses.Field]:
    """The fields of ``cls`` that have an option, in declaration order (``only``: those)."""
    keep = set(only) if only is not None else None
    return [
        f
        for f in dataclasses.fields(cls)
        if "help" in f.metadata and (keep is None or f.name in keep)
    ]


def add_options(
    parser: argparse.ArgumentParser,
    cls: type,
    only: Iterable[str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    groups: dict[str, Any] | None = None,
) -> None:
    """Add an option per field of ``cls`` (``only``: those fields) to ``parser``.

    overrides: per field, metadata to use instead of the field's (``help``, ``shown``,
      ``required``: True makes an optional field required on this command).
    groups: argument groups by title, shared between calls (one section per title).

    Every option defaults to "not given" (argparse.SUPPRESS), so :func:`build` can tell the
    command line from the file and the defaults; required options are checked there too, after
    ``--config`` had its say.
    """
    groups = {} if groups is None else groups
    for f in cli_fields(cls, only):
        meta = {**f.metadata, **((overrides or {}).get(f.name) or {})}
        title = meta.get("group")
        where: Any = parser
        if title:
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            where = groups[title]
        required = meta.get("required", not _has_default(f))
        text = meta["help"]
        if meta.get("shown") is not None:
            text += f" [{meta['shown']}]"
        elif not required and _has_default(f) and _default(f) not in (None, False, ()):
            text += f" [{_show_default(_default(f))}]"
        if required:
            text += " (required)"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": text}
        if _annotation(f) == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            parse = _parser_of(f)
            if meta.get("repeat"):
                kwargs["action"] = "extend"
                kwargs["type"] = _Items(parse, meta.get("metavar") or f.name.upper())
            else:
                kwargs["type"] = parse
            if meta.get("choices"):
                if meta.get("repeat"):
                    kwargs["metavar"] = meta.get("metavar") or "{" + ",".join(meta["choices"]) + "}"
                else:
                    kwargs["choices"] = meta["choices"]
            if meta.get("metavar") and "metavar" not in kwargs:
                kwargs["metavar"] = meta["metavar"]
        where.add_argument(*(meta.get("flags") or (flag(f),)), **kwargs)


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="a JSON or YAML file of options (names as in config.json: batch_size, lr, ...); "
        "options given on the command line win. A run's own OUT/config.json repeats the run",
    )


def read_config_file(path: str) -> dict[str, Any]:
    """The options in a JSON or YAML file (an object at the top)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise KdcacheError(f"cannot read --config {path}: {e.strerror}") from None
    if os.path.splitext(path)[1].lower() in (".yaml", ".yml"):
        import yaml

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise KdcacheError(f"--config {path} is not valid YAML: {e}") from None
    else:
        try:
            values = json.loads(text)
        except ValueError as e:
            raise KdcacheError(f"--config {path} is not valid JSON: {e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise KdcacheError(f"--config {path} must hold an object of options, not a list or value")
    return values


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    """A config file's value as the field holds it: strings parsed as on the command line,
    lists made tuples."""
    if value is None:
        return None
    kind = _annotation(f)
    try:
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {value!r}")
            return value
        parse = _parser_of(f)
        if kind.endswith(", ...]"):  # a repeatable option: a list, or one comma-separated text
            items = split_top_level(value) if isinstance(value, str) else list(value)
            return tuple(parse(v) if isinstance(v, str) else v for v in items)
        if kind == "tuple[float, float, float]" and not isinstance(value, str):
            return rgb(",".join(str(v) for v in value))
        if isinstance(value, str):
            return parse(value)
        if kind == "float" and isinstance(value, int | float):
            return float(value)
        return value
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        raise KdcacheError(f"{where}: {f.name}: {e}") from None


def build(
    cls: type,
    args: argparse.Namespace,
    file_values: Mapping[str, Any] | None = None,
    only: Iterable[str] | None = None,
    required: Iterable[str] = (),
    extra: Mapping[str, Any] | None = None,
    where: str = "--config",
) -> Any:
    """``cls`` from the command line (``args``), then ``file_values``, then the defaults.

    only: the fields that are options here (the file may set only those too; without it, the
    file may set any field but ``command``); required: fields that must be set here although
    they have a default; extra: fields given by the caller (ablate's ``train``). A required
    field set by neither the command line nor the file is an error naming its option, as
    argparse's own would be.
    """
    options = {f.name: f for f in cli_fields(cls, only)}
    settable = {
        f.name: f
        for f in dataclasses.fields(cls)
        if (f.name in options if only is not None else f.name != "command")
    }
    values = {
        k: _coerce(settable[k], v, where) for k, v in (file_values or {}).items() if k in settable
    }
    given = {k: v for k, v in vars(args).items() if k in options}
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    values.update(extra or {})
    missing = [
        flag(f)
        for f in options.values()
        if f.name not in values and (not _has_default(f) or f.name in set(required))
    ]
    if missing:
        raise KdcacheError(
            f"the following options are required: {', '.join(missing)} (on the command line "
            "or in --config)"
        )
    return cls(**values)


# Help shared by the options of several configs (and commands without one: verify, eval).
WEIGHTS_HELP = (
    "the teacher's weights: a .pt/.pth state dict (raw, or in a 'model' or 'state_dict' key) "
    "or a .safetensors file; without one the teacher is a random initialisation"
)
DEVICE_HELP = "cpu, cuda, cuda:N or auto (cuda when available)"
WORKERS_HELP = "DataLoader worker processes that decode and render (0: in-process)"
VIEWS_HELP = (
    "a view preset, function_matching (inception_crop|flip|mixup), consistent "
    "(inception_crop|flip) or center (center_crop), or a pipeline of view ops such as "
    "'inception_crop(min_area=0.08)|flip|randaugment(2, 9)|mix(mixup=0.8, cutmix=1)|erase' "
    "(ops: inception_crop, center_crop, flip, randaugment, color_jitter, erase, mixup, cutmix, "
    "mix, interpolation, or pkg.module:Class; see the README)"
)
PLAN_SEED_HELP = "seed of the views (not of the model or order)"
RENDERER_HELP = (
    "what turns images into views: pillow (Pillow decode, one Pillow crop-and-resize call; "
    "every view op) or ffcv (FFCV's libjpeg-turbo decode and OpenCV INTER_AREA resize, JPEG "
    "only; crops, flips and mixing only; needs the ffcv extra). A cache records its renderer "
    "and is replayed by that one only"
)
MAX_PIXELS_HELP = (
    "images of more pixels are bad rows ('too large'), never decoded [Pillow's limit, "
    "PIL.Image.MAX_IMAGE_PIXELS: about 89 M]"
)
LABEL_MAP_HELP = (
    "JSON: data label -> teacher class (a list, or an object), so val accuracy can be scored "
    "when the labels are not the teacher's classes"
)


def mean_help(who: str) -> str:
    return (
        f"the {who}'s input mean on [0, 1] pixels [its own: timm's pretrained config, "
        "torchvision's weights transforms, a factory's pretrained_cfg; else ImageNet's]"
    )


def num_classes_help(default: str) -> str:
    return (
        "the class count models are built with; checked against the width each model really "
        f"has [{default}]"
    )
