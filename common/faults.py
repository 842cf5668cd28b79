"""Deterministic fault injection for the reliability tests: die exactly where a test says.

``KDCACHE_FAULT=POINT`` (or ``POINT:N``, the N-th time the point is reached, 1-based) makes the
process kill itself with SIGKILL at that point, as a preempted machine would, with no cleanup;
``KDCACHE_FAULT_SIGNAL=SIGTERM`` (or ``SIGINT``) sends that signal instead, to test a clean stop.
Unset (always, outside tests) it costs one dictionary lookup. Points:

- ``group``: a new cache's group exists (with its creation marker), no array yet;
- ``create``: a new cache's arrays exist, its attributes not yet;
- ``batch``: the teacher finished a batch;
- ``write``: a unit's row array was written (the N-th array write of the job; a unit's arrays
  are written concurrently, so the others may be written, half written or not yet);
- ``commit``: all of a unit's arrays were written, its done mark not yet;
- ``committed``: a unit's done mark was written;
- ``extend``: a row array was resized while extending a cache.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def point(name: str) -> None:
    """Reached fault point ``name``: die here if ``KDCACHE_FAULT`` says so."""
    spec = os.environ.get("KDCACHE_FAULT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(nth or 1):
        sig = getattr(signal, os.environ.get("KDCACHE_FAULT_SIGNAL", "SIGKILL"))
        os.kill(os.getpid(), sig)
