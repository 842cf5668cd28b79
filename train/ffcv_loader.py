"""FFCV's loader driving kdcache's views: ``kdcache train --loader ffcv`` on a ``.beton``.

FFCV's own decoders draw their crops with ``np.random`` inside numba-parallel loops (not
reproducible, ffcv issue #392), so kdcache gives FFCV its own two parts instead:

- :class:`PlanOrder`, a ``TraversalOrder`` registered in ``ffcv.loader.loader.ORDER_MAP`` (the
  only orders FFCV 1.0.2 accepts: its branch for order classes is broken), whose
  ``sample_order`` is the epoch's batches of kdcache's plan, concatenated; a batch shorter than
  the loader's batch size is padded with its last row, and the padding is dropped again here;
- :class:`ReplayDecoder`, a pipeline operation for the ``image`` field that decodes each row's
  image and its mixing partner's with FFCV's libjpeg-turbo call, crops each by the row's box
  with FFCV's OpenCV resize and flips it: the very C functions of
  :mod:`kdcache.ffcv_renderer`, so the pixels are bit-identical to the DataLoader path with
  ``--renderer ffcv`` (``tests/test_ffcv_loader.py``).

Numba freezes the arrays a compiled function captures, so the epoch's views cannot be a
captured array: they sit in a buffer (:class:`ViewTable`, (N, 13) int64 by sample index) whose
*address* the compiled decoder holds; the host rewrites it in place before each epoch, while no
batch of the loader is in flight. Decode failures are written to a second buffer, by sample.

Everything else (the mix, cached targets, labels, dropping unusable rows) is the trainer's own
code: :meth:`kdcache.train.batches.TrainBatches.assemble` on the crops this loader made.

FFCV sets torch's intra-op thread count to its worker count on every epoch; this module puts
the caller's back. FFCV reads local files only.
"""

from __future__ import annotations

import gc
import itertools
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from kdcache.data.beton import import_ffcv
from kdcache.errors import KdcacheError
from kdcache.views import Views

log = logging.getLogger(__name__)

# ViewTable columns: own sample, height, width, box (4), flip; partner sample (-1: none), its
# height, width, box (4), flip. Heights and widths are the index's (the decoder's buffer sizes).
_COLUMNS = 16
_PARTNER = 8


def unsupported(spec: Any) -> str | None:
    """Why the decoder cannot replay views ``spec`` (None: it can). It crops, flips the crop
    and leaves the mix to :func:`kdcache.render.mix_8bit`: a pipeline with an op after its
    mixing op (a flip after ``mixup`` flips the mixed image) is not that."""
    from kdcache.render import renders_8bit

    if renders_8bit(spec):
        return None
    return (
        f"its decoder flips each crop before the mix, and views {spec.spec!r} have ops after "
        "their mixing op: put the flip before the mix, or use --loader torch"
    )


def _void_pointer() -> Any:
    """A numba intrinsic: an integer address -> ``void*`` (for ``numba.carray``)."""
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    @intrinsic
    def as_void_pointer(typingctx, address):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], cgutils.voidptr_t)

        return types.voidptr(address), codegen

    return as_void_pointer


class ViewTable:
    """The epoch's views of every sample, by global index, in a buffer FFCV's compiled decoder
    reads through its address: (N, 16) int64 (see ``_COLUMNS``), and (N,) int64 decode
    results (0: decoded, else libjpeg-turbo's error code; set by the decoder)."""

    def __init__(self, sizes: np.ndarray):
        self.sizes = np.asarray(sizes, dtype=np.int64)  # (N, 2) the index's (height, width)
        self.rows = np.zeros((len(sizes), _COLUMNS), dtype=np.int64)
        self.failed = np.zeros(len(sizes), dtype=np.int64)

    def put(self, rows: np.ndarray, views: Views) -> None:
        """Write ``views`` of global ``rows`` (flip ops as drawn; a row without a flip op in its
        pipeline has flip 0)."""
        spec = views.spec
        flips = spec is None or any(op.name == "flip" for op in spec.ops)
        t = self.rows
        t[rows, 0] = rows
        t[rows, 1:3] = self.sizes[rows]
        t[rows, 3:7] = views.box
        t[rows, 7] = views.flip if flips else 0
        partner = views.partner.astype(np.int64)
        t[rows, _PARTNER] = partner
        has = partner >= 0
        t[rows[has], _PARTNER + 1 : _PARTNER + 3] = self.sizes[partner[has]]
        t[rows, _PARTNER + 3 : _PARTNER + 7] = views.partner_box
        t[rows, _PARTNER + 7] = views.partner_flip if flips else 0
        self.failed[rows] = 0
        if has.any():
            self.failed[partner[has]] = 0


def _decoder_class() -> type:
    from ffcv.fields.bytes import BytesDecoder
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler

    class ReplayDecoder(BytesDecoder):
        """Own and partner crops of each row: (2, S, S, 3) uint8 per row (zeros where a row
        has no partner or an image does not decode). A ``BytesDecoder`` to FFCV, which takes
        the first operation of a field's pipeline as its decoder only if it is the field's
        own decoder class."""

        def __init__(self, table: ViewTable, size: int, threads: int):
            super().__init__()
            self.table, self.size, self.threads = table, size, threads
            self.pixels = int((table.sizes[:, 0] * table.sizes[:, 1]).max()) * 3
            self.scratch = np.zeros((max(threads, 1), max(self.pixels, 3)), dtype=np.uint8)

        def declare_state_and_memory(self, previous_state: Any) -> tuple:
            from dataclasses import replace

            shape = (2, self.size, self.size, 3)
            return (
                replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("u1")),
                AllocationQuery(shape, np.dtype("u1")),
            )

        def generate_code(self) -> Any:
            import numba

            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_c = Compiler.compile(resize_crop)
            void_pointer = _void_pointer()
            n = len(self.table.rows)
            rows_at, failed_at = self.table.rows.ctypes.data, self.table.failed.ctypes.data
            scratch_at, scratch_shape = self.scratch.ctypes.data, self.scratch.shape
            parallel = Compiler.num_threads > 1

            def decode(batch_indices, destination, metadata, storage_state):
                table = numba.carray(void_pointer(rows_at), (n, 16), np.int64)
                failed = numba.carray(void_pointer(failed_at), (n,), np.int64)
                scratch = numba.carray(void_pointer(scratch_at), scratch_shape, np.uint8)
                for dst_ix in my_range(len(batch_indices)):
                    row = table[batch_indices[dst_ix]]
                    buffer = scratch[numba.get_thread_id() if parallel else 0]
                    for side in range(2):
                        at = side * 8
                        sample = row[at]
                        out = destination[dst_ix, side]
                        out[:] = 0
                        h, w = row[at + 1], row[at + 2]
                        if sample < 0 or row[at + 5] == 0 or h * w == 0:
                            continue
                        data = mem_read(metadata[sample]["ptr"], storage_state)
                        image = buffer[: 3 * h * w]
                        rc = imdecode_c(data, image, h, w, h, w, 0, 0, 1, 1, False, False)
                        if rc != 0:
                            failed[sample] = rc
                            continue
                        top, left = row[at + 3], row[at + 4]
                        resize_c(image.reshape(h, w, 3), top, top + row[at + 5], left,
                                 left + row[at + 6], out)  # fmt: skip
                        if row[at + 7]:
                            out[:] = out[:, ::-1].copy()
                return destination[: len(batch_indices)]

            decode.is_parallel = True
            return decode

    return ReplayDecoder


class PlanLoader:
    """One FFCV ``Loader`` over a ``.beton`` for a whole run; :meth:`epoch` yields an epoch's
    batches (global rows, (B, 2, S, S, 3) uint8 own and partner crops, decode failures)."""

    _ids = itertools.count()

    def __init__(self, path: str, sizes: np.ndarray, batches: list[np.ndarray], size: int,
                 threads: int):  # fmt: skip
        ffcv_loader = import_ffcv("loader.loader", "--loader ffcv")
        Loader = ffcv_loader.Loader  # noqa: N806
        TraversalOrder = import_ffcv("traversal_order.base", "--loader ffcv").TraversalOrder  # noqa: N806
        self.table = ViewTable(sizes)
        self.batch_size = max(len(b) for b in batches)
        self._order = self._flat(batches)
        plan = self

        class PlanOrder(TraversalOrder):
            """The epoch's order from kdcache's plan (set by :meth:`PlanLoader.epoch`)."""

            def sample_order(self, epoch: int) -> np.ndarray:
                return plan._order

        # FFCV 1.0.2 looks an order up in ORDER_MAP (passing a class fails its isinstance
        # test): a key of our own per loader.
        self.key = f"kdcache-plan-{next(self._ids)}"
        ffcv_loader.ORDER_MAP[self.key] = PlanOrder
        threads_before = torch.get_num_threads()
        try:
            self.loader = Loader(
                path,
                batch_size=self.batch_size,
                num_workers=max(threads, 1),
                order=self.key,
                os_cache=True,
                drop_last=False,
                pipelines={
                    "image": [_decoder_class()(self.table, size, max(threads, 1))],
                    "key": None,
                    "label": None,
                    "unit": None,
                },
            )
        finally:
            torch.set_num_threads(threads_before)

    def _flat(self, batches: list[np.ndarray]) -> np.ndarray:
        """The batches as one order, each padded to the batch size with its last row."""
        padded = [
            np.concatenate([b, np.full(self.batch_size - len(b), b[-1], dtype=np.int64)])
            for b in batches
            if len(b)
        ]
        return np.concatenate(padded).astype(np.uint64) if padded else np.zeros(0, np.uint64)

    def epoch(self, batches: list[np.ndarray], views: Views, rows: np.ndarray) -> Iterator:
        """Batches of one epoch: ``views`` of global ``rows`` (every row the epoch reads, with
        its partner's views) go into the table first. Yields, per batch, (crops (B, 2, S, S, 3)
        uint8, failed {global index: code}); an empty batch yields (None, {}). Consume each
        epoch whole: the next one rewrites the table."""
        if any(len(b) > self.batch_size for b in batches):
            raise KdcacheError("a batch is larger than the FFCV loader's batch size")
        self.table.put(rows, views)
        self._order = self._flat(batches)
        # FFCV cuts every epoch to the length of the order it saw when it was made
        # (``len(loader)`` reads ``first_traversal_order``): a loader made in a resumed, shorter
        # epoch would cut the full ones after it. This epoch's order is the one to go by.
        self.loader.first_traversal_order = self._order
        threads = torch.get_num_threads()
        it = iter(self.loader)
        torch.set_num_threads(threads)  # FFCV set it to its worker count
        for b in batches:
            if not len(b):
                yield None, {}
                continue
            (crops,) = _next(it)
            needed = np.union1d(b, self.table.rows[b, _PARTNER])
            needed = needed[needed >= 0]
            bad = needed[self.table.failed[needed] != 0]
            failed = dict(zip(bad.tolist(), self.table.failed[bad].tolist(), strict=True))
            yield torch.as_tensor(crops)[: len(b)], failed

    def close(self) -> None:
        """Unregister the order and drop the loader now. Each FFCV loader compiles its own
        numba functions; collected later, inside another loader's compiling thread, their
        finalizer prints "Exception ignored ... KeyError" (numba 0.68): collected here."""
        from ffcv.loader import loader as ffcv_loader

        ffcv_loader.ORDER_MAP.pop(self.key, None)
        self.loader = None
        gc.collect()


def _next(it: Any) -> Any:
    """The next batch of FFCV's epoch iterator ``it``. FFCV decodes in a thread of its own,
    and an error there ends that thread with the batch never queued, so ``next(it)`` would
    wait for ever: wait here while the thread lives, and say so when it does not."""
    while it.output_queue.empty():
        if not it.is_alive() and it.output_queue.empty():
            raise KdcacheError(
                "FFCV's loader thread stopped before the epoch's last batch (its error is "
                "printed above); train with --loader torch to go on, and report it"
            )
        time.sleep(0.0005)
    return next(it)


class FfcvEpochs:
    """The trainer's batches through FFCV's loader, epoch after epoch: the items
    :class:`~kdcache.train.batches.TrainBatches` would make (its :meth:`gather` and
    :meth:`assemble`), their crops made by one :class:`PlanLoader` (built, and compiled, at the
    first epoch)."""

    def __init__(self, path: str, sizes: np.ndarray, size: int, threads: int):
        self.path, self.sizes, self.size, self.threads = path, sizes, size, threads
        self.loader: PlanLoader | None = None

    def items(self, data: Any) -> Iterator[dict]:
        """The batches of ``data`` (a TrainBatches), in order."""
        why = unsupported(data.s.spec)
        if why:
            raise KdcacheError(f"--loader ffcv: {why}")
        batches = [np.asarray(b, dtype=np.int64) for b in data.s.batches]
        parts = [data.gather(b) for b in range(len(batches))]
        used = [(b, p[0]) for b, p in zip(batches, parts, strict=True) if len(b)]
        rows = np.concatenate([b for b, _ in used]) if used else np.zeros(0, np.int64)
        views = Views.concat([v for _, v in used]) if used else None
        if self.loader is None:
            self.loader = PlanLoader(self.path, self.sizes, batches, self.size, self.threads)
        for b, (crops, failed), (v, ok, targets, _) in zip(
            batches, self.loader.epoch(batches, views, rows), parts, strict=True
        ):
            if crops is None:
                crops = torch.zeros(0, 2, self.size, self.size, 3, dtype=torch.uint8)
            yield data.assemble(b, v, data.usable(b, v, ok, failed), targets, crops)

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()
            self.loader = None
