"""The one grammar of kdcache's component strings: ``name(k=v, ...)`` terms joined by a separator.

Losses join terms with ``+`` (``kl(t=2)+ce(w=0.1)``); view ops will join them with ``|``. A
name is a registered one (``kl``) or a user's own, ``pkg.module:Class``. Each value is a Python
literal read with :func:`ast.literal_eval`: an int, float, bool or quoted string. A term without
arguments may drop its parentheses (``kl`` is ``kl()``). A spec that does not parse is a
:class:`KdcacheError` naming the column (1-based) and what to write instead.

This module imports only the standard library (``kdcache --help`` may read it).
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

from kdcache.errors import KdcacheError

_NAME = re.compile(r"[A-Za-z_][\w.]*(?::[A-Za-z_]\w*)?")
_KEY = re.compile(r"\s*([A-Za-z_]\w*)\s*=(?!=)")
_WORD = re.compile(r"[A-Za-z_]\w*")
_LITERALS = (bool, int, float, str)


@dataclass(frozen=True)
class Term:
    """One ``name(k=v, ...)``; ``column`` is where its name starts in the spec (1-based)."""

    name: str
    kwargs: dict[str, Any]
    column: int
    args: tuple[Any, ...] = ()  # arguments without a key, in order

    @property
    def is_user(self) -> bool:
        """A user's own ``pkg.module:Class`` rather than a registered name."""
        return ":" in self.name

    def __str__(self) -> str:
        return format_term(self.name, self.kwargs, self.args)


def format_term(name: str, kwargs: dict[str, Any], args: tuple[Any, ...] = ()) -> str:
    """``name(a, k=v, ...)`` with the values as literals, the form :func:`parse` reads back."""
    if not kwargs and not args:
        return name
    parts = [repr(v) for v in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


def bind(term: Term, parameters: list[str], what: str) -> dict[str, Any]:
    """The term's arguments by name: those without a key take ``parameters`` in order."""
    if len(term.args) > len(parameters):
        raise KdcacheError(
            f"{what}: {term.name} takes at most {len(parameters)} arguments without a key "
            f"({', '.join(parameters) or 'none'}), got {len(term.args)}"
        )
    named = dict(zip(parameters, term.args, strict=False))
    twice = sorted(set(named) & set(term.kwargs))
    if twice:
        raise KdcacheError(f"{what}: {term.name} is given {', '.join(twice)} twice")
    return {**named, **term.kwargs}


class _Parser:
    def __init__(self, spec: str, sep: str, what: str, example: str):
        self.spec, self.sep, self.what, self.example = spec, sep, what, example
        self.pos = 0

    def fail(self, pos: int, problem: str, fix: str) -> KdcacheError:
        shown = self.spec[:pos] + "<here>" + self.spec[pos:]
        return KdcacheError(
            f"{self.what} {self.spec!r}, column {pos + 1} ({shown!r}): {problem}; {fix}"
        )

    def skip_space(self) -> None:
        while self.pos < len(self.spec) and self.spec[self.pos].isspace():
            self.pos += 1

    def terms(self) -> list[Term]:
        out = [self.term()]
        while self.pos < len(self.spec):
            if not self.spec.startswith(self.sep, self.pos):
                raise self.fail(
                    self.pos,
                    f"expected {self.sep!r} or the end, got {self.spec[self.pos]!r}",
                    f"join terms with {self.sep!r}, as in {self.example}",
                )
            self.pos += len(self.sep)
            out.append(self.term())
        return out

    def term(self) -> Term:
        self.skip_space()
        m = _NAME.match(self.spec, self.pos)
        if m is None:
            got = repr(self.spec[self.pos]) if self.pos < len(self.spec) else "the end"
            raise self.fail(
                self.pos,
                f"expected a name, got {got}",
                f"write a registered name or pkg.module:Class, as in {self.example}",
            )
        column = self.pos + 1
        self.pos = m.end()
        self.skip_space()
        kwargs: dict[str, Any] = {}
        args: tuple[Any, ...] = ()
        if self.pos < len(self.spec) and self.spec[self.pos] == "(":
            args, kwargs = self.arguments()
            self.skip_space()
        return Term(m.group(), kwargs, column, args)

    def arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """From ``(`` to its ``)``: values, then ``k=v`` pairs, split at commas outside
        quotes."""
        opened = self.pos
        self.pos += 1
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        while True:
            self.skip_space()
            if self.spec.startswith(")", self.pos):
                self.pos += 1
                return tuple(args), kwargs
            if self.pos >= len(self.spec):
                raise self.fail(opened, "'(' is never closed", "close it with ')'")
            m = _KEY.match(self.spec, self.pos)
            if m is None:
                if kwargs:
                    raise self.fail(
                        self.pos,
                        "an argument without a key after key=value ones",
                        "put arguments without a key first, e.g. (2, 9, mstd=0.5)",
                    )
                start = self.pos
                end = self.value_end(start, opened)
                args.append(self.value(f"argument {len(args) + 1}", start, end))
                self.pos = end
                if self.spec.startswith(",", self.pos):
                    self.pos += 1
                continue
            key, start = m.group(1), m.end()
            if key in kwargs:
                raise self.fail(m.start(1), f"{key} is given twice", "give each argument once")
            end = self.value_end(start, opened)
            kwargs[key] = self.value(key, start, end)
            self.pos = end
            if self.spec.startswith(",", self.pos):
                self.pos += 1

    def value_end(self, start: int, opened: int) -> int:
        """Where the value starting at ``start`` ends: the next ``,`` or ``)`` outside quotes."""
        quote, i = None, start
        while i < len(self.spec):
            c = self.spec[i]
            if quote:
                if c == "\\":
                    i += 1
                elif c == quote:
                    quote = None
            elif c in "'\"":
                quote = c
            elif c in ",)":
                return i
            i += 1
        if quote:
            raise self.fail(
                start, f"the string {quote}... is never closed", f"close it with {quote}"
            )
        raise self.fail(opened, "'(' is never closed", "close it with ')'")

    def value(self, key: str, start: int, end: int) -> Any:
        text = self.spec[start:end].strip()
        if not text:
            raise self.fail(start, f"{key} has no value", f"write {key}=VALUE, e.g. {key}=2")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text if _WORD.fullmatch(text) else None  # a bare word: mode=pixel
        if not isinstance(value, _LITERALS):
            raise self.fail(
                start,
                f"the value of {key}, {text}, is not an int, float, bool, string or word",
                f"write a number, True/False, or a quoted string such as {key}='{text}'",
            )
        return value


def parse(
    spec: str, sep: str = "+", what: str = "spec", example: str = "kl(t=2)+ce(w=0.1)"
) -> list[Term]:
    """``spec`` -> its terms, in order. ``what`` names the spec in errors (``--loss``) and
    ``example`` shows a good one; a :class:`KdcacheError` when it does not parse."""
    if not isinstance(spec, str) or not spec.strip():
        raise KdcacheError(f"{what} is empty; write one or more terms, as in {example}")
    return _Parser(spec, sep, what, example).terms()


def format_terms(terms: list[Term], sep: str = "+") -> str:
    """The terms back as one spec, the form :func:`parse` reads."""
    return sep.join(str(t) for t in terms)


def user_object(source: str, name: str, what: str, kind: str = "callable") -> Any:
    """``source:name`` -> the object, for a user's own component (``pkg.module:Class``).

    The module is imported with the current directory on the path: ``kdcache`` is a console
    script, so it is not there as it is for ``python -m``, and a user expects ``./mine.py`` to be
    found. ``what`` names the option in errors (e.g. ``model spec 'mine:make'``).
    """
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)
    importlib.invalidate_caches()  # a module written a moment ago is found
    try:
        module = importlib.import_module(source)
    except Exception as e:  # ImportError, or the module's own error (a SyntaxError, ...)
        raise KdcacheError(
            f"cannot import {source!r} for {what} ({type(e).__name__}: {e}); the current "
            f"directory {here} is on the path: run from the folder that holds "
            f"{source.split('.')[0]}, or install its package"
        ) from None
    obj = getattr(module, name, None)
    if not callable(obj):
        raise KdcacheError(f"{source} has no {kind} {name!r} ({what})")
    return obj
