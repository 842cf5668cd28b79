"""A background writer, so the teacher never waits on compression or storage."""

from __future__ import annotations

import logging
import queue
import threading
from types import TracebackType

import numpy as np

from kdcache.cache_writer import CacheWriter

log = logging.getLogger(__name__)


class UnitWriter:
    """Writes finished blocks of units from a thread; a bounded queue applies back-pressure.

    Use as a context manager: leaving the block waits for every submitted block to be committed
    and re-raises the first write error in the caller's thread.
    """

    def __init__(self, cache: CacheWriter, max_pending: int = 4):
        self.cache = cache
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="kdcache-writer", daemon=True)

    def __enter__(self) -> UnitWriter:
        self._thread.start()
        return self

    def submit(self, unit: int, block: dict[int, dict[str, np.ndarray]]) -> None:
        """Queue one block of a unit: ``{epoch: rows}`` (every row field, (count, ...)), the
        block's epochs not done yet (:meth:`CacheWriter.write_block`)."""
        self._raise_if_failed()
        self._queue.put((unit, block))

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                unit, block = item
                try:
                    self.cache.write_block(unit, block)
                    log.debug("committed unit %d epochs %s", unit, sorted(block))
                except BaseException as e:  # surfaced in the main thread
                    self._error = e

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def __exit__(
        self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._queue.put(None)
        self._thread.join()
        if exc is None:
            self._raise_if_failed()
