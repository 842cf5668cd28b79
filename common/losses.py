"""Logit losses on sparse targets, one small interface, found by name: ``create_loss(spec)``.

A loss takes the student's logits and the batch's :class:`~kdcache.targets.SparseTarget` and
returns a scalar. A spec is written in :mod:`kdcache.grammar`: ``name(k=v, ...)`` terms joined
by ``+``, each with an optional weight ``w`` (1 by default) that kdcache applies, so
``kl(t=2)+ce(w=0.1)`` is ``KL at T = 2 + 0.1 * cross-entropy``. A name is one of
:data:`LOSSES` (``kl``, ``ce``, or one a module registered with :func:`register_loss`) or a
user's own class, ``pkg.module:Class``, imported with the current directory on the path and
called with the term's other arguments.

This module imports neither torch nor a user's module until a loss is created or called
(``kdcache --help`` reads the teacher modes, which name their default losses).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from kdcache.errors import KdcacheError
from kdcache.grammar import Term, bind, format_term, format_terms, parse, user_object

if TYPE_CHECKING:
    from torch import Tensor

    from kdcache.targets import SparseTarget

EXAMPLE = "kl(t=2)+ce(w=0.1)"


class Loss(Protocol):
    """``loss(student_logits, target)``: student_logits (B, C) float32, ``target`` the batch's
    SparseTarget -> a scalar tensor (a mean over the batch). The built-ins also carry ``name``
    and ``describe()`` (the spec that makes them again); a user's own class needs only
    ``__call__``."""

    def __call__(self, student_logits: Tensor, target: SparseTarget) -> Tensor: ...


LOSSES: dict[str, Callable[..., Loss]] = {}


def register_loss(name: str) -> Callable[[Callable[..., Loss]], Callable[..., Loss]]:
    """Class (or factory) decorator: ``name(k=v)`` in a spec calls it with ``k=v``."""

    def add(factory: Callable[..., Loss]) -> Callable[..., Loss]:
        if name in LOSSES and LOSSES[name] is not factory:
            raise ValueError(f"a loss called {name!r} is already registered")
        LOSSES[name] = factory
        return factory

    return add


def _check_temperature(t: Any) -> None:
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"the temperature t must be a positive number, got {t!r}")


@register_loss("kl")
@dataclass(frozen=True)
class KL:
    """KL(teacher || student) at temperature ``t``, times t² (Hinton's scaling); batch mean."""

    t: float = 1.0
    name: ClassVar[str] = "kl"

    def __post_init__(self) -> None:
        _check_temperature(self.t)

    def __call__(self, student_logits: Tensor, target: SparseTarget) -> Tensor:
        from kdcache import targets as T

        return T.kl_divergence(student_logits, target, self.t)

    def describe(self) -> str:
        return format_term(self.name, {"t": self.t})


@register_loss("ce")
@dataclass(frozen=True)
class CE:
    """Soft cross-entropy H(teacher, student) at temperature ``t``; on a target made from
    labels (``--teacher-mode none``) it is the hard-label (mixed-label) cross-entropy."""

    t: float = 1.0
    name: ClassVar[str] = "ce"

    def __post_init__(self) -> None:
        _check_temperature(self.t)

    def __call__(self, student_logits: Tensor, target: SparseTarget) -> Tensor:
        from kdcache import targets as T

        return T.cross_entropy(student_logits, target, self.t)

    def describe(self) -> str:
        return format_term(self.name, {"t": self.t})


@dataclass(frozen=True)
class Sum:
    """Weighted terms added: ``sum(w * loss(logits, target))``; what :func:`create_loss` makes.
    A weight of 1 is not multiplied in, so ``kl`` alone is exactly :class:`KL`'s value."""

    terms: tuple[tuple[float, Loss], ...]
    spec: str  # the resolved spec: every argument written out

    @property
    def name(self) -> str:
        return "+".join(getattr(loss, "name", type(loss).__name__) for _, loss in self.terms)

    def describe(self) -> str:
        return self.spec

    def __call__(self, student_logits: Tensor, target: SparseTarget) -> Tensor:
        total = None
        for w, loss in self.terms:
            value = loss(student_logits, target)
            if w != 1.0:
                value = value * w
            total = value if total is None else total + value
        return total


def parse_loss(spec: str, what: str = "--loss") -> list[Term]:
    """Check ``spec`` without importing anything: the grammar, the registered names, the
    weights. -> its terms; a :class:`KdcacheError` naming the column otherwise."""
    terms = parse(spec, "+", what, EXAMPLE)
    for term in terms:
        where = f"{what} {spec!r}, column {term.column}"
        if not term.is_user and term.name not in LOSSES:
            raise KdcacheError(
                f"{where}: unknown loss {term.name!r}; choose one of {', '.join(LOSSES)}, or "
                "write pkg.module:Class for your own"
            )
        w = term.kwargs.get("w", 1.0)
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
            raise KdcacheError(f"{where}: the weight w of {term.name} must be a number, got {w!r}")
    return terms


def create_loss(spec: str, defaults: Mapping[str, Any] | None = None, what: str = "--loss") -> Sum:
    """``spec`` -> the loss it names. ``defaults``: arguments given to each term whose class
    takes them and that does not name them (the trainer passes ``t`` from ``--temperature``)."""
    built, resolved = [], []
    for term in parse_loss(spec, what):
        factory = _user_class(term, what) if term.is_user else LOSSES[term.name]
        params = _parameters(factory)
        kwargs = bind(term, [p for p in params if p != "w"], f"{what} {spec!r}")
        w = float(kwargs.pop("w", 1.0))
        kwargs.update(
            {k: v for k, v in (defaults or {}).items() if k in params and k not in kwargs}
        )
        try:
            loss = factory(**kwargs)
        except (TypeError, ValueError) as e:
            raise KdcacheError(
                f"{what} {spec!r}, column {term.column}: {term} cannot be made ({e}); give it "
                f"the arguments {term.name} takes"
            ) from None
        if not term.is_user:  # the built-ins' defaults are written out: config.json says all
            kwargs = {k: p.default for k, p in params.items() if p.default is not p.empty} | kwargs
        built.append((w, loss))
        resolved.append(Term(term.name, kwargs | ({"w": w} if w != 1.0 else {}), term.column))
    return Sum(tuple(built), format_terms(resolved))


def _parameters(factory: Callable[..., Any]) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return {}


def _user_class(term: Term, what: str) -> Callable[..., Loss]:
    """``pkg.module:Class`` -> the class (:func:`kdcache.grammar.user_object`)."""
    source, _, name = term.name.partition(":")
    return user_object(source, name, f"{what} term {term.name}", kind="class")
