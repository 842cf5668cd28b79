"""One job per output: an exclusive lock file next to a run directory or a cache.

``with output_lock(path, "run directory"):`` creates ``<path>.lock`` (a sibling of the output,
so it works before the output exists and never adds a file inside a cache) with
``O_CREAT | O_EXCL``, holding JSON ``{host, pid, started, command}``, and removes it on exit
(also on an exception, Ctrl-C or SIGTERM turned into ``KeyboardInterrupt``). A second job on the
same output gets a :class:`~kdcache.errors.KdcacheError` naming the holder's host, pid and start
time. A SIGKILLed holder leaves its lock behind: a lock whose holder ran on this host and whose
pid no longer runs is stale and is replaced (with a warning); one from another host cannot be
checked from here, so the message says to remove the file if that process is gone.

URLs (``s3://...``) are not locked: object storage offers no portable exclusive create, so
the function logs that at debug level and does nothing. Under torchrun only rank 0 should
take the lock: pass ``enabled=ranks.main`` (a disabled lock is a no-op).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

from kdcache.errors import KdcacheError

log = logging.getLogger(__name__)

# A lock file is written right after it is created; one still empty or torn after this long
# belongs to a process killed in between.
_TORN_AFTER_S = 10.0


def lock_path(path: str) -> str:
    """Where the lock of output ``path`` lives: ``<path>.lock``, next to it."""
    return path.rstrip("/" + os.sep) + ".lock"


@contextlib.contextmanager
def output_lock(path: str, what: str = "output", *, enabled: bool = True) -> Iterator[str | None]:
    """Hold an exclusive lock on output ``path`` (``what`` names it in messages, e.g. "run
    directory" or "cache") for the ``with`` block; yields the lock file's path (None when
    nothing was locked: ``enabled`` false, or a URL)."""
    if not enabled:
        yield None
        return
    if "://" in path:
        log.debug("%s %s is on object storage: not locked (no exclusive create there)", what, path)
        yield None
        return
    lock = lock_path(path)
    mine = _acquire(lock, what, path)
    try:
        yield lock
    finally:
        _release(lock, mine)


def _holder_text(holder: dict[str, Any]) -> str:
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
        + (f" ({holder['command']})" if holder.get("command") else "")
    )


def _acquire(lock: str, what: str, path: str) -> dict[str, Any]:
    mine = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join(sys.argv),
    }
    parent = os.path.dirname(os.path.abspath(lock))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise KdcacheError(f"cannot create {parent} for the lock of {path}: {e.strerror}") from None
    deadline = time.monotonic() + 2 * _TORN_AFTER_S
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        except OSError as e:
            raise KdcacheError(f"cannot create the lock file {lock}: {e.strerror}") from None
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(mine, f)
                f.flush()
                os.fsync(f.fileno())
            return mine
        holder, age = _read(lock)
        if holder is None:  # gone meanwhile, or being written: look again
            if age is not None and age > _TORN_AFTER_S:
                log.warning("replacing the unreadable lock file %s (%.0f s old)", lock, age)
                _take_over(lock, None)
            elif time.monotonic() > deadline:
                raise KdcacheError(
                    f"the lock file {lock} of {what} {path} cannot be read; if no kdcache job "
                    "uses it, remove the file"
                )
            else:
                time.sleep(0.05)
            continue
        if holder.get("host") == mine["host"] and not process_running(holder.get("pid")):
            log.warning(
                "replacing the stale lock %s of a process that is gone (%s)",
                lock,
                _holder_text(holder),
            )
            _take_over(lock, holder)
            continue
        raise KdcacheError(
            f"{what} {path} is in use by another kdcache job ({_holder_text(holder)}); wait for "
            f"it to finish, or, if that process is gone (it ran on another host, or its pid was "
            f"reused), remove {lock}"
        )


def _read(lock: str) -> tuple[dict[str, Any] | None, float | None]:
    """(the holder's record or None, the file's age in seconds or None when it is gone)."""
    try:
        age = time.time() - os.stat(lock).st_mtime
        with open(lock) as f:
            holder = json.load(f)
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError):
        return None, age
    return (holder if isinstance(holder, dict) else None), age


def process_running(pid: Any) -> bool:
    """Whether process ``pid`` runs on this host."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        return True
    return True


def _take_over(lock: str, stale: dict[str, Any] | None) -> None:
    """Move a stale lock aside, so two jobs that both found it stale cannot both remove a
    lock one of them has just taken: a lock moved aside that is not the stale one goes back."""
    aside = f"{lock}.stale{os.getpid()}"
    try:
        os.replace(lock, aside)
    except FileNotFoundError:
        return
    moved, _ = _read(aside)
    if moved != stale:
        with contextlib.suppress(OSError):
            os.link(aside, lock)  # fails if a third job holds it by now: then it is theirs
    with contextlib.suppress(OSError):
        os.unlink(aside)


def _release(lock: str, mine: dict[str, Any]) -> None:
    if os.getpid() != mine["pid"]:  # a forked child leaving: the lock is its parent's
        return
    holder, _ = _read(lock)
    if holder == mine:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
    else:
        log.warning("the lock %s was replaced while this job held it; left alone", lock)
