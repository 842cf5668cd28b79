"""Views: the exact input one training example sees, as a pure function of where it sits.

A view spec (:class:`ViewSpec`) is a pipeline of view ops (:mod:`kdcache.view_ops`), written
``inception_crop|flip|mixup`` or named by a preset (:data:`PRESETS`). A view of sample ``i`` in
epoch ``e`` is drawn from counter-based streams keyed by ``(plan seed, stream, epoch, i)`` and
the op's position (:mod:`kdcache.draws`), so the same view comes out whatever the worker count,
world size, batch size or processing order.

Views are sampled a whole unit (tar shard) at a time because mixing partners are drawn inside the
unit, so a streaming reader holds both images. The realised parameters are returned already in
the dtypes the cache stores them in (``lam`` as float16 included): the teacher's render at
precompute and the student's replay from the cache therefore start from the very same numbers.

Boxes are ``(top, left, height, width)`` in pixels of the decoded source image, the argument
order of ``torchvision.transforms.v2.functional.resized_crop``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdcache.draws import view_keys
from kdcache.errors import KdcacheError
from kdcache.grammar import bind, parse
from kdcache.view_ops import (
    ONCE,
    CenterCrop,
    Flip,
    InceptionCrop,
    Interpolation,
    Mixup,
    OpDraws,
    OpField,
    ViewOp,
    op_class,
    pick_partners,
)

__all__ = ["PRESETS", "ViewSpec", "Views", "get_spec", "sample_unit_views", "view_keys"]

# Streams: the student's (and a consistent teacher's) views, and the second stream that
# `independent` mode gives the teacher.
STUDENT_STREAM = 0
INDEPENDENT_STREAM = 1
REUSE_STREAM = 2  # ``--reuse sample``: which cached epoch a sample replays (kdcache.replay)
MIN_IMAGE_SIZE = 8  # px: the smallest side views render to (the built-in nets need 8)
EXAMPLE = "inception_crop(min_area=0.08)|flip|randaugment(2, 9)|mixup|erase(p=0.25)"


@dataclass(frozen=True)
class ViewSpec:
    """A view pipeline: ``ops`` applied in order; ``name`` is the preset's, or the spec itself.

    Rules (checked by :meth:`parse`): a crop op comes first; a crop, a flip, a mixing op and an
    interpolation appear at most once each (they draw from the view's base stream); 8-bit
    ``image`` ops (randaugment, color_jitter) come before the mixing op.
    """

    name: str
    ops: tuple[ViewOp, ...]

    @classmethod
    def parse(cls, text: str, name: str | None = None, what: str = "--views") -> ViewSpec:
        """A spec string -> its pipeline (a :class:`KdcacheError` naming what is wrong)."""
        terms = parse(text, "|", what, EXAMPLE)
        ops = []
        for term in terms:
            factory = op_class(term.name, what)
            params = (
                [f.name for f in dataclasses.fields(factory)]
                if dataclasses.is_dataclass(factory)
                else []
            )
            where = f"{what} {text!r}, column {term.column}"
            try:
                op = factory(**bind(term, params, where))
                getattr(op, "check", lambda: None)()
            except (TypeError, ValueError) as e:
                raise KdcacheError(f"{where}: {term} cannot be made ({e})") from None
            ops.append(op)
        spec = cls("", tuple(ops))
        spec._check_order(text, what)
        return dataclasses.replace(spec, name=name or spec.spec)

    def _check_order(self, text: str, what: str) -> None:
        kinds = [getattr(op, "kind", "pixels") for op in self.ops]
        problems = []
        if not kinds or kinds[0] != "crop":
            problems.append("it must start with a crop: inception_crop or center_crop")
        for kind in ONCE:
            if kinds.count(kind) > 1:
                problems.append(f"it has {kinds.count(kind)} {kind} ops; a view has one")
        if "mix" in kinds:
            after = list(zip(self.ops, kinds, strict=True))[kinds.index("mix") :]
            late = [op.name for op, kind in after if kind == "image"]
            if late:
                problems.append(
                    f"{', '.join(late)} works on 8-bit images: put it before the mixing op"
                )
        if problems:
            raise KdcacheError(f"{what} {text!r}: " + "; ".join(problems))

    @property
    def spec(self) -> str:
        """The canonical spec string: every op with the arguments that differ from its
        defaults (what the cache's identity records)."""
        return "|".join(op.describe() for op in self.ops)

    @property
    def mixes(self) -> bool:
        return self.mix_index is not None

    @property
    def mix_index(self) -> int | None:
        kinds = [getattr(op, "kind", "") for op in self.ops]
        return kinds.index("mix") if "mix" in kinds else None

    def same_views(self, other: ViewSpec) -> bool:
        """The same pipeline, whatever either is called."""
        return self.ops == other.ops

    def resample(self, side: str, convention: str = "bilinear") -> str:
        """The resize filter of ``side`` ("teacher" or "student"), given the filter its model's
        input convention names: the interpolation op's choice, else bilinear."""
        for op in self.ops:
            if isinstance(op, Interpolation):
                return op.resample(side, convention)
        return "bilinear"

    def with_teacher_filter(self, convention: str) -> ViewSpec:
        """This pipeline with an interpolation op's unset teacher filter set to what the
        teacher's convention names (``convention``); unchanged without one."""
        ops = tuple(
            dataclasses.replace(op, teacher=op.resample("teacher", convention))
            if isinstance(op, Interpolation) and op.teacher is None
            else op
            for op in self.ops
        )
        if ops == self.ops:
            return self
        spec = ViewSpec("", ops)
        return dataclasses.replace(spec, name=spec.spec if self.name == self.spec else self.name)

    def prefix(self, position: int) -> str:
        """The array-name prefix of op ``position``'s fields: its name, numbered from the
        second op of that name (``erase``, ``erase2``)."""
        name = self.ops[position].name.replace(":", "_").replace(".", "_")
        before = sum(op.name == self.ops[position].name for op in self.ops[:position])
        return name if before == 0 else f"{name}{before + 1}"

    def op_fields(self) -> list[tuple[str, int, bool, OpField]]:
        """Every row array the ops add: (array name, op position, partner's?, field); the
        partner's copies for the ops before the mixing op."""
        mix_at = self.mix_index
        out = []
        for i, op in enumerate(self.ops):
            for f in op.fields():
                out.append((f"{self.prefix(i)}_{f.name}", i, False, f))
            if mix_at is not None and i < mix_at:
                for f in op.fields():
                    out.append((f"partner_{self.prefix(i)}_{f.name}", i, True, f))
        return out

    def field_owners(self) -> dict[str, str]:
        """Array name -> the op (``prefix``) whose parameters it holds, for ``inspect``."""
        owners = {name: self.prefix(i) for name, i, _, _ in self.op_fields()}
        for i, op in enumerate(self.ops):
            kind = getattr(op, "kind", "")
            if kind == "crop":
                owners.update(box=self.prefix(i), partner_box=self.prefix(i))
            elif kind == "flip":
                owners.update(flip=self.prefix(i), partner_flip=self.prefix(i))
            elif kind == "mix":
                owners.update(partner=self.prefix(i), lam=self.prefix(i))
        return owners

    def to_dict(self) -> dict[str, Any]:
        """The cache's ``views`` attribute: name, canonical spec and every op's version."""
        return {
            "name": self.name,
            "spec": self.spec,
            "ops": {op.name: getattr(op, "version", 1) for op in self.ops},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ViewSpec:
        """A cache's ``views`` attribute -> the pipeline; caches made before view ops store the
        old spec dict (crop, flip, mix, ...), read as the preset pipeline it describes."""
        if "spec" in d:
            spec = cls.parse(d["spec"], name=d.get("name"), what="cache attribute views")
            versions = {op.name: getattr(op, "version", 1) for op in spec.ops}
            stored = dict(d.get("ops") or {})
            if stored and stored != versions:
                raise KdcacheError(
                    f"the cache's views were made by op versions {stored}, this kdcache has "
                    f"{versions}; re-make the cache, or use the kdcache that made it"
                )
            return spec
        return cls(d["name"], _legacy_ops(d))


def _legacy_ops(d: Mapping[str, Any]) -> tuple[ViewOp, ...]:
    """The old ``ViewSpec`` dict (schema 1 and 2 caches before view ops) as its pipeline."""
    if d.get("crop", "inception") == "center":
        ops: list[ViewOp] = [CenterCrop(d.get("crop_fraction", 0.875))]
    else:
        ops = [
            InceptionCrop(
                d.get("min_area", 0.05),
                d.get("max_area", 1.0),
                d.get("min_aspect", 3 / 4),
                d.get("max_aspect", 4 / 3),
            )
        ]
    if d.get("flip", True):
        ops.append(Flip())
    if d.get("mix", "none") == "mixup":
        ops.append(Mixup())
    elif d.get("mix", "none") != "none":
        raise KdcacheError(f"unknown mix {d['mix']!r} in the cache's view spec")
    return tuple(ops)


PRESETS: dict[str, ViewSpec] = {
    "function_matching": ViewSpec.parse("inception_crop|flip|mixup", "function_matching"),
    "consistent": ViewSpec.parse("inception_crop|flip", "consistent"),
    "center": ViewSpec.parse("center_crop", "center"),
}


def get_spec(text: str) -> ViewSpec:
    """A preset by name, or a pipeline spec string; a :class:`KdcacheError` otherwise."""
    if text in PRESETS:
        return PRESETS[text]
    if "(" not in text and "|" not in text and text.isidentifier():
        try:
            op_class(text, "--views")
        except KdcacheError:
            raise KdcacheError(
                f"unknown view preset or op {text!r}; --views takes a preset "
                f"({', '.join(PRESETS)}) or a pipeline of ops such as {EXAMPLE!r}"
            ) from None
    return ViewSpec.parse(text)


@dataclass
class Views:
    """Realised views of ``n`` rows, in cache dtypes.

    seed: (n,) uint16        low 16 bits of the view's generator key (a replay check)
    box: (n, 4) uint16       own crop (top, left, height, width), source pixels
    flip: (n,) bool          own horizontal flip
    partner: (n,) int64      global index of the mixing partner, -1 when not mixed
    partner_box: (n, 4) uint16, partner_flip: (n,) bool   the partner's own crop and flip
    lam: (n,) float16        weight of the sample's own image (1.0 when not mixed)
    ops: the other ops' arrays by name (:meth:`ViewSpec.op_fields`), (n, ...) each
    spec: the pipeline they were drawn by (rendering applies its ops)
    """

    seed: np.ndarray
    box: np.ndarray
    flip: np.ndarray
    partner: np.ndarray
    partner_box: np.ndarray
    partner_flip: np.ndarray
    lam: np.ndarray
    ops: dict[str, np.ndarray] = field(default_factory=dict)
    spec: ViewSpec | None = None

    def __len__(self) -> int:
        return len(self.seed)

    def take(self, rows: np.ndarray | slice) -> Views:
        arrays = {name: getattr(self, name)[rows] for name in BASE_FIELDS}
        return Views(**arrays, ops={k: v[rows] for k, v in self.ops.items()}, spec=self.spec)

    @staticmethod
    def concat(parts: list[Views]) -> Views:
        """The rows of ``parts`` one after the other (views of one spec)."""
        arrays = {name: np.concatenate([getattr(p, name) for p in parts]) for name in BASE_FIELDS}
        ops = {k: np.concatenate([p.ops[k] for p in parts]) for k in parts[0].ops}
        return Views(**arrays, ops=ops, spec=parts[0].spec)

    def params(
        self, row: int, position: int, partner: bool = False, spec: ViewSpec | None = None
    ) -> dict[str, Any]:
        """Op ``position``'s parameters for row ``row`` (its own, or its partner's)."""
        spec = spec or self.spec
        op = spec.ops[position]
        kind = getattr(op, "kind", "")
        if kind == "flip":
            return {"flip": bool((self.partner_flip if partner else self.flip)[row])}
        head = ("partner_" if partner else "") + spec.prefix(position) + "_"
        return {f.name: self.ops[head + f.name][row] for f in op.fields()}


BASE_FIELDS = ("seed", "box", "flip", "partner", "partner_box", "partner_flip", "lam")


def sample_unit_views(
    spec: ViewSpec,
    plan_seed: int,
    epoch: int,
    unit_start: int,
    sizes: np.ndarray,
    stream: int = STUDENT_STREAM,
) -> Views:
    """The views of every sample of one unit in one epoch.

    unit_start: global index of the unit's first sample.
    sizes: (n, 2) int (height, width) of each decoded image; (0, 0) marks an unreadable sample,
        which gets empty parameters and is never chosen as a mixing partner.
    """
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    n = len(sizes)
    keys = view_keys(plan_seed, epoch, unit_start + np.arange(n, dtype=np.int64), stream)
    valid = (sizes > 0).all(axis=1)
    hw = np.maximum(sizes, 1)
    views = Views(
        seed=(keys & np.uint64(0xFFFF)).astype(np.uint16),
        box=np.zeros((n, 4), dtype=np.uint16),
        flip=np.zeros(n, dtype=bool),
        partner=np.full(n, -1, dtype=np.int64),
        partner_box=np.zeros((n, 4), dtype=np.uint16),
        partner_flip=np.zeros(n, dtype=bool),
        lam=np.ones(n, dtype=np.float16),
        ops={
            name: np.full((n, *f.shape), f.fill, dtype=f.dtype)
            for name, _, _, f in spec.op_fields()
        },
        spec=spec,
    )
    mix_at = spec.mix_index if n > 1 else None
    if mix_at is not None:
        local = pick_partners(keys)
        mixed = valid & valid[local]
        lam, extra = spec.ops[mix_at].draw_lam(OpDraws(keys, mix_at, False, hw))
        views.partner = np.where(mixed, local + unit_start, -1)
        views.lam = np.where(mixed, lam, np.float16(1.0)).astype(np.float16)
        _store(views, spec, mix_at, False, extra, mixed)
    for i, op in enumerate(spec.ops):
        if getattr(op, "kind", "") in ("mix", "resample"):
            continue
        _store(views, spec, i, False, op.sample(OpDraws(keys, i, False, hw)), valid)
        if mix_at is not None and i < mix_at:
            drawn = op.sample(OpDraws(keys, i, True, hw[local]))
            _store(views, spec, i, True, drawn, mixed)
    return views


def _store(
    views: Views,
    spec: ViewSpec,
    position: int,
    partner: bool,
    drawn: Mapping[str, np.ndarray],
    rows: np.ndarray,
) -> None:
    """Put op ``position``'s draws into the views, on ``rows`` only (the rest keep the fill)."""
    kind = getattr(spec.ops[position], "kind", "")
    for key, values in drawn.items():
        if kind == "crop" and key == "box":
            name = "partner_box" if partner else "box"
        elif kind == "flip" and key == "flip":
            name = "partner_flip" if partner else "flip"
        else:
            name = ("partner_" if partner else "") + f"{spec.prefix(position)}_{key}"
        target = getattr(views, name) if name in BASE_FIELDS else views.ops[name]
        mask = rows.reshape(-1, *([1] * (target.ndim - 1)))
        fill = np.zeros((), dtype=target.dtype) if name in BASE_FIELDS else _fill(spec, name)
        merged = np.where(mask, values, fill).astype(target.dtype)
        if name in BASE_FIELDS:
            setattr(views, name, merged)
        else:
            views.ops[name] = merged


def _fill(spec: ViewSpec, name: str) -> Any:
    for array, _, _, f in spec.op_fields():
        if array == name:
            return np.asarray(f.fill)
    raise KeyError(name)
