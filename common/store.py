"""The teacher cache on disk: create, open, read a unit, write a unit, mark it done.

One work unit is one (epoch, unit): its rows are written whole (every row array, one file each:
a chunk, or a Zarr shard of chunks for long units), then its cell of the ``done`` array is set. A
unit without its done mark is not in the cache, whatever files exist: a killed writer can leave
complete files of some arrays but never a unit that reads as done.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr

from kdcache import faults, schema
from kdcache.chunks import ChunkFile
from kdcache.data.index import DatasetIndex, Unit
from kdcache.errors import CacheDamagedError, CacheMismatchError, KdcacheError
from kdcache.render import InputConvention
from kdcache.views import ViewSpec
from kdcache.zarr_compat import BloscCodec, Crc32cCodec
from kdcache.zarr_compat import sync as zarr_sync  # runs a coroutine on zarr's own I/O loop

log = logging.getLogger(__name__)

# What a damaged chunk raises: a failed checksum (ValueError), blosc (RuntimeError), a torn file
# (OSError), a shard index that points nowhere (KeyError).
_READ_ERRORS = (OSError, ValueError, RuntimeError, KeyError)


def _compressors(shuffle: str = "bitshuffle") -> list:
    # blosc-zstd with a shuffle filter packs rows 10-20 % tighter than plain zstd (measured on
    # ImageNet-shaped rows, docs/benchmarks.md); level 9 costs the background writer little.
    # crc32c on every chunk lets readers tell damage from data.
    return [BloscCodec(cname="zstd", clevel=9, shuffle=shuffle), Crc32cCodec()]


class Cache:
    """An open cache. Array handles are opened lazily, so the object pickles into workers."""

    def __init__(self, path: str, mode: str = "r"):
        self.path = str(path)
        self.mode = mode
        self._group: zarr.Group | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._chunk_files: dict[str, ChunkFile | None] = {}
        self._pid = os.getpid()
        self._has_manifest: bool | None = None
        self.meta: dict[str, Any] = dict(self.group.attrs.get(schema.FORMAT_NAME) or {})
        if not self.meta:
            raise KdcacheError(f"{self.path} is a Zarr group but not a kdcache cache")
        _check_schema_version(self.path, self.meta)
        for key, value in schema.LEGACY_ATTRIBUTES.items():  # older caches mean these
            self.meta.setdefault(key, value)
        self._check_layout()

    def _check_layout(self) -> None:
        """Refuse attributes that do not agree with the arrays (edited or damaged ones): top-k
        width, class-index dtype, rows per unit slot and unit counts."""
        m = self.meta
        try:
            k, c, slot, units = int(m["topk"]), int(m["num_classes"]), self.slot, self.units
            counts = [int(u["count"]) for u in units]
            logits, index = self.array("topk_logits"), self.array("topk_index")
        except (KeyError, TypeError, ValueError) as e:
            raise CacheDamagedError(
                f"cache {self.path}: its attributes are incomplete ({type(e).__name__}: {e}); "
                "restore its zarr.json or re-make the cache"
            ) from None
        problems = []
        if logits.shape[1:] != (len(units) * slot, k) or index.shape[1:] != logits.shape[1:]:
            problems.append(
                f"topk {k} and {len(units)} units of {slot} rows, but topk_logits is "
                f"{tuple(logits.shape[1:])} per epoch"
            )
        if not 1 <= k <= c or np.dtype(index.dtype) != np.dtype(schema.index_dtype(c)):
            problems.append(f"num_classes {c} and topk {k}, but class indices are {index.dtype}")
        if any(not 0 <= n <= slot for n in counts):
            problems.append(f"unit counts {counts} do not fit slots of {slot} rows")
        if problems:
            raise CacheDamagedError(
                f"cache {self.path}: its attributes do not agree with its arrays ("
                + "; ".join(problems)
                + "); they were edited or damaged: restore them or re-make the cache"
            )

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "mode": self.mode, "meta": self.meta}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(
            state, _group=None, _arrays={}, _chunk_files={}, _pid=os.getpid(), _has_manifest=None
        )

    @property
    def group(self) -> zarr.Group:
        # A forked DataLoader worker inherits the parent's handles, and with them its network
        # sessions (s3fs, gcsfs), which do not survive a fork: each process opens its own.
        if self._group is None or self._pid != os.getpid():
            self._group = zarr.open_group(self.path, mode="r" if self.mode == "r" else "r+")
            self._arrays, self._chunk_files = {}, {}
            self._pid = os.getpid()
        return self._group

    def array(self, name: str) -> zarr.Array:
        group = self.group  # reopens (and forgets array handles) after a fork
        if name not in self._arrays:
            self._arrays[name] = group[name]
        return self._arrays[name]

    def _chunk_file(self, name: str) -> ChunkFile | None:
        array = self.array(name)  # first: it forgets the readers after a fork
        if name not in self._chunk_files:
            self._chunk_files[name] = ChunkFile.of(self.path, array)
        return self._chunk_files[name]

    # -- layout ----------------------------------------------------------------------------

    @property
    def units(self) -> list[dict[str, Any]]:
        return self.meta["data"]["units"]

    @property
    def slot(self) -> int:
        return int(self.meta["slot"])

    @property
    def epochs(self) -> int:
        """Epochs allocated (complete or not)."""
        return int(self.array(schema.DONE_ARRAY).shape[0])

    @property
    def topk(self) -> int:
        return int(self.meta["topk"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def spec(self) -> ViewSpec:
        return ViewSpec.from_dict(self.meta["views"])

    @property
    def plan_seed(self) -> int:
        return int(self.meta["plan_seed"])

    @property
    def schema_version(self) -> int:
        return int(self.meta.get("schema_version", 1))

    @property
    def teacher_input(self) -> InputConvention:
        """The teacher's input convention (ImageNet's for caches that do not record one)."""
        return InputConvention.from_identity(
            self.meta["teacher_input"], self.meta.get("teacher_interpolation", "bilinear")
        )

    def unit_rows(self, unit: int) -> slice:
        start = unit * self.slot
        return slice(start, start + int(self.units[unit]["count"]))

    def dataset_index(self) -> DatasetIndex | None:
        """The index of the data this cache was made from (units with their URLs and stamps,
        per-sample arrays in global order); None for a cache that does not record URLs, or whose
        per-sample arrays cannot be read (then the shards are indexed and verify finds why)."""
        units = self.units
        if not all("url" in u and "stamp" in u for u in units):
            return None
        keep = np.concatenate(
            [np.arange(int(u["count"])) + i * self.slot for i, u in enumerate(units)]
        )
        try:  # whole arrays: one zarr call each, its chunks fetched concurrently
            rows = {f.name: self.array(f.name)[...][keep] for f in schema.SAMPLE_FIELDS}
        except _READ_ERRORS as e:
            log.warning(
                "cannot read the index stored in %s (%s); indexing the shards", self.path, e
            )
            return None
        table = [
            Unit(
                u["name"],
                u["url"],
                int(u["start"]),
                int(u["count"]),
                u["content_hash"],
                int(u["bytes"]),
                u["stamp"],
            )
            for u in units
        ]
        return DatasetIndex(table, rows["key_hash"], rows["label"], rows["size"])

    # -- progress --------------------------------------------------------------------------

    def done_mask(self) -> np.ndarray:
        """(epochs, units) bool: which work units are committed."""
        return self.array(schema.DONE_ARRAY)[...].astype(bool)

    def complete_epochs(self) -> list[int]:
        return [int(e) for e in np.flatnonzero(self.done_mask().all(axis=1))]

    # -- rows ------------------------------------------------------------------------------

    def read_unit(
        self, epoch: int, unit: int, fields: tuple[str, ...] | None = None
    ) -> dict[str, np.ndarray]:
        """The unit's rows of one epoch: one contiguous read per array, (count, ...) each."""
        return self._read(fields or tuple(f.name for f in schema.ROW_FIELDS), epoch, unit)

    def read_samples(self, unit: int) -> dict[str, np.ndarray]:
        return self._read(tuple(f.name for f in schema.SAMPLE_FIELDS), None, unit)

    def _read(self, names: tuple[str, ...], epoch: int | None, unit: int) -> dict[str, np.ndarray]:
        """A unit's rows of some arrays (of one epoch, or per-sample when ``epoch`` is None).

        Where the unit is one whole chunk of a local array, the chunk file is read directly
        (:mod:`kdcache.chunks`, ~10x faster than a zarr call). The other arrays (a URL, a sharded
        layout) are read through zarr in one round trip, concurrently: on object storage a unit
        then costs one request latency, not one per array. Damage (a failed checksum or
        decompression) becomes a :class:`CacheDamagedError` naming the array either way.
        """
        rows = self.unit_rows(unit)
        count = rows.stop - rows.start
        out: dict[str, np.ndarray] = {}
        through_zarr = []
        for name in names:
            try:
                chunk = self._chunk_file(name)
                if chunk is None or chunk.shape[0 if epoch is None else 1] != self.slot:
                    through_zarr.append(self.array(name).async_array)
                    continue
                lead = (unit,) if epoch is None else (epoch, unit)
                values = chunk.read(lead + (0,) * (len(chunk.shape) - len(lead)))
                out[name] = values[:count] if epoch is None else values[0, :count]
            except _READ_ERRORS as e:
                raise self._damaged(name, epoch, unit, e) from None
        if through_zarr:
            selection = rows if epoch is None else (epoch, rows)

            async def read_all() -> list[Any]:
                reads = (a.getitem(selection) for a in through_zarr)
                return await asyncio.gather(*reads, return_exceptions=True)

            for array, values in zip(through_zarr, zarr_sync(read_all()), strict=True):
                name = array.basename
                if isinstance(values, _READ_ERRORS):
                    raise self._damaged(name, epoch, unit, values) from None
                if isinstance(values, BaseException):
                    raise values
                out[name] = values
        if epoch is None:
            self._check_samples(unit, out)
        else:
            self._check_rows(epoch, unit, out)
        return {name: out[name] for name in names}

    # -- what was committed ----------------------------------------------------------------

    @property
    def has_manifest(self) -> bool:
        """Whether the cache records each committed unit's checksums (see :mod:`schema`)."""
        if self._has_manifest is None:
            try:
                self.array(schema.MANIFEST_ARRAY)
                self._has_manifest = True
            except KeyError:
                self._has_manifest = False
        return self._has_manifest

    def manifest(self, epoch: int, unit: int) -> np.ndarray | None:
        """(2 + row arrays,) uint32: the cell's (epoch, unit) and each row array's checksum as
        committed; None for a cache without a manifest. All fill for a unit never committed."""
        if not self.has_manifest:
            return None
        name = schema.MANIFEST_ARRAY
        try:
            chunk = self._chunk_file(name)
            if chunk is not None:
                return chunk.read((epoch, unit, 0)).reshape(-1)
            return np.asarray(self.array(name)[epoch, unit])
        except _READ_ERRORS as e:
            raise self._damaged(name, epoch, unit, e) from None

    def committed_entry(self, epoch: int, unit: int) -> np.ndarray | None:
        """The unit's manifest entry, checked to be its own; None without a manifest or for a
        unit never committed. A committed unit without its own entry is damage."""
        entry = self.manifest(epoch, unit)
        if entry is None:
            return None
        if (entry == schema.MANIFEST_FILL).all():
            if not bool(self.array(schema.DONE_ARRAY)[epoch, unit]):
                return None  # not committed: nothing to compare with (readers check the mark)
            raise self._damaged(
                schema.MANIFEST_ARRAY, epoch, unit, ValueError("the unit's checksums are missing")
            )
        if (int(entry[0]), int(entry[1])) != (epoch, unit):
            raise self._damaged(
                schema.MANIFEST_ARRAY,
                epoch,
                unit,
                ValueError(f"it holds the checksums of epoch {entry[0]} unit {entry[1]}"),
            )
        return entry

    def _check_rows(self, epoch: int, unit: int, values: Mapping[str, np.ndarray]) -> None:
        """Refuse rows that are not the ones committed (a missing, swapped, foreign file)."""
        entry = self.committed_entry(epoch, unit)
        if entry is None:
            return
        for name, rows in values.items():
            expected = int(entry[2 + _ROW_NAMES.index(name)])
            if schema.rows_checksum(rows) != expected:
                raise self._damaged(
                    name,
                    epoch,
                    unit,
                    ValueError(
                        "its rows are not the ones committed (a missing, swapped or foreign file)"
                    ),
                )

    def _check_samples(self, unit: int, values: Mapping[str, np.ndarray]) -> None:
        sums = self.meta.get("sample_checksums")
        if not sums:
            return
        for name, rows in values.items():
            expected = sums[unit][_SAMPLE_NAMES.index(name)]
            if schema.rows_checksum(rows) != expected:
                raise self._damaged(
                    name, None, unit, ValueError("its rows are not the ones written")
                )

    def _damaged(
        self, name: str, epoch: int | None, unit: int, error: BaseException
    ) -> CacheDamagedError:
        at = f"epoch {epoch} " if epoch is not None else ""
        return CacheDamagedError(
            f"cache {self.path}: array {name!r}, {at}unit {unit} "
            f"({self.units[unit]['name']}) is damaged ({type(error).__name__}: {error}); "
            "find all damage with `kdcache verify` and fix it with `kdcache verify --repair`"
        )

    def scan(self, progress: Any = None) -> list[dict[str, Any]]:
        """Read every committed chunk of every array, checking every checksum.

        Returns the damage found: ``{"array", "epoch" (None for per-sample arrays), "unit",
        "error"}`` each. A committed unit whose rows read back as padding (a lost unit file)
        counts as damaged too. progress: called with 1 per unit read.
        """
        damage: list[dict[str, Any]] = []

        def record(array: str, epoch: int | None, unit: int, error: str) -> None:
            damage.append({"array": array, "epoch": epoch, "unit": unit, "error": error})

        try:
            done = self.done_mask()
        except (OSError, ValueError, RuntimeError):  # then cell by cell, to name the bad marks
            done = np.zeros((self.epochs, len(self.units)), dtype=bool)
            for epoch, unit in np.ndindex(done.shape):
                try:
                    done[epoch, unit] = bool(self.array(schema.DONE_ARRAY)[epoch, unit])
                except (OSError, ValueError, RuntimeError) as e:
                    record(schema.DONE_ARRAY, epoch, unit, str(e))
        for unit in range(len(self.units)):
            for field in schema.SAMPLE_FIELDS:
                try:
                    self._read((field.name,), None, unit)
                except CacheDamagedError as e:
                    record(field.name, None, unit, str(e))
        for epoch, unit in np.argwhere(done):
            epoch, unit = int(epoch), int(unit)
            try:
                self.committed_entry(epoch, unit)
            except CacheDamagedError as e:  # nothing else of the unit can be checked
                record(schema.MANIFEST_ARRAY, epoch, unit, str(e))
                if progress:
                    progress(1)
                continue
            for field in schema.ROW_FIELDS:
                try:
                    values = self._read((field.name,), epoch, unit)[field.name]
                except CacheDamagedError as e:
                    record(field.name, epoch, unit, str(e))
                    continue
                if field.name == "status" and (values == schema.PADDING).any():
                    record("status", epoch, unit, "committed rows are missing (a lost unit file?)")
            if progress:
                progress(1)
        return damage

    def rewrite_samples(self, unit: int, values: Mapping[str, np.ndarray]) -> None:
        """Write a unit's per-sample rows again (``values``: every sample field, (count, ...))."""
        start = unit * self.slot
        for field in schema.SAMPLE_FIELDS:
            arr = self.array(field.name)
            full = np.full((self.slot, *arr.shape[1:]), field.fill, dtype=arr.dtype)
            full[: int(self.units[unit]["count"])] = values[field.name]
            arr[start : start + self.slot] = full  # the unit's whole chunk

    def uncommit(self, epoch: int, unit: int) -> None:
        """Clear a unit's done mark, so the next precompute writes it again."""
        self.array(schema.DONE_ARRAY)[epoch, unit] = 0

    def write_unit(self, epoch: int, unit: int, rows: Mapping[str, np.ndarray]) -> None:
        """Write one (epoch, unit) whole, then mark it done. ``rows``: every row field, (count, ...).

        The row arrays are written concurrently, one file each (the unit's chunk or shard), on
        zarr's I/O loop: on object storage a unit costs about one request latency, not one per
        array. The done mark is written after all of them.
        """
        count = int(self.units[unit]["count"])
        selection = (epoch, slice(unit * self.slot, (unit + 1) * self.slot))
        writes = []
        entry = [epoch, unit]
        for field in schema.ROW_FIELDS:
            arr = self.array(field.name)
            data = np.asarray(rows[field.name], dtype=arr.dtype)
            if data.shape[0] != count:
                raise ValueError(f"{field.name}: {data.shape[0]} rows for a unit of {count}")
            full = np.full((self.slot, *arr.shape[2:]), field.fill, dtype=arr.dtype)
            full[:count] = data
            writes.append((arr.async_array, full))
            entry.append(schema.rows_checksum(full[:count]))

        async def write(array: Any, values: np.ndarray) -> None:
            await array.setitem(selection, values)
            faults.point("write")

        async def write_all() -> None:
            await asyncio.gather(*(write(a, v) for a, v in writes))

        zarr_sync(write_all())
        if self.has_manifest:
            self.array(schema.MANIFEST_ARRAY)[epoch, unit] = np.array(entry, dtype=np.uint32)
        faults.point("commit")
        self.array(schema.DONE_ARRAY)[epoch, unit] = 1
        faults.point("committed")

    def extend(self, epochs: int) -> None:
        """Allocate ``epochs`` epochs in total (metadata only: no row is rewritten)."""
        if epochs <= self.epochs:
            return
        names = [f.name for f in schema.ROW_FIELDS]
        for name in names + ([schema.MANIFEST_ARRAY] if self.has_manifest else []):
            arr = self.array(name)
            arr.resize((epochs, *arr.shape[1:]))
            faults.point("extend")
        # The done array grows last: until it has, the cache reads as the old size, and the
        # next run's extend resizes again (a resize to the current shape is a no-op).
        done = self.array(schema.DONE_ARRAY)
        done.resize((epochs, done.shape[1]))
        log.info("extended %s to %d epochs", self.path, epochs)

    # -- summary ---------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """What ``kdcache inspect`` prints: progress, size on disk, and what the cache is."""
        from kdcache.sizes import size_report

        done = self.done_mask()
        counts = np.array([int(u["count"]) for u in self.units], dtype=np.int64)
        rows_written = int((done * counts[None, :]).sum())
        # Bytes per row (apparent and on disk), payload vs per-file overhead, and the shard size
        # that would bring the overhead under 10 %: kdcache.sizes says what each number means.
        sizes = size_report(self, done) or {"bytes_per_row": None, "bytes_per_row_by_array": None}
        m = self.meta
        return {
            "path": self.path,
            "schema_version": m["schema_version"],
            "epochs_allocated": self.epochs,
            "epochs_complete": len(self.complete_epochs()),
            "units": len(self.units),
            "units_done": int(done.sum()),
            "work_units_total": int(done.size),
            "samples": int(m["data"]["num_samples"]),
            "rows_written": rows_written,
            **sizes,
            "teacher": m["teacher"],
            "teacher_weights_hash": m["teacher_weights_hash"],
            "views": m["views"]["name"],
            "plan_seed": m["plan_seed"],
            "topk": m["topk"],
            "num_classes": m["num_classes"],
            "teacher_image_size": m["teacher_image_size"],
            "integrity": (
                "manifest: every committed unit file is checked against the checksums recorded "
                "when it was committed"
                if self.has_manifest
                else "chunk checksums only (made before manifests): a damaged chunk is found, "
                "a lost or swapped unit file of some arrays may not be"
            ),
            "teacher_input": self.teacher_input.describe(),
            "teacher_random_init": m.get("teacher_random_init"),  # None: not recorded (schema 1)
            "bad_row_rule": (
                f"schema {self.schema_version}: an unusable image, no label or a label outside "
                "the classes (kept when extended)"
                if schema.labels_rule(self.schema_version)
                else f"schema {self.schema_version}: an unusable image (labels play no part)"
            ),
            "data_fingerprint": m["data_fingerprint"],
            "created": m.get("created"),
            "command": m.get("command"),
            "versions": m.get("versions"),
        }

    # -- identity --------------------------------------------------------------------------

    def check_identity(self, expected: Mapping[str, Any], what: str = "this job") -> None:
        """Refuse when any identity attribute differs, naming each one and both values."""
        diffs = [
            f"{key}: cache has {self.meta.get(key)!r}, {what} has {value!r}"
            for key, value in expected.items()
            if value is not None and self.meta.get(key) != value
        ]
        if diffs:
            hint = (
                " (--teacher-mean/--teacher-std set the teacher's input convention)"
                if any(d.startswith("teacher_input:") for d in diffs)
                else ""
            )
            raise CacheMismatchError(
                f"cache {self.path} was made differently from {what}: "
                + "; ".join(diffs)
                + f". Use a new --out/--cache path, or the settings the cache was made with{hint}."
            )


def _check_schema_version(path: str, meta: Mapping[str, Any]) -> None:
    version = int(meta.get("schema_version", 0))
    if version > schema.SCHEMA_VERSION:
        raise KdcacheError(
            f"cache {path} has schema version {version}, written by kdcache "
            f"{meta.get('versions', {}).get('kdcache', '?')}; this kdcache reads up to version "
            f"{schema.SCHEMA_VERSION}. Upgrade kdcache to read it."
        )


def create_cache(
    path: str,
    meta: dict[str, Any],
    sample_rows: Mapping[str, np.ndarray],
    epochs: int,
    chunk_rows: int | None = None,
) -> Cache:
    """Create an empty cache group with every array allocated for ``epochs`` epochs.

    meta: the ``kdcache`` group attributes; ``meta["data"]["units"]`` (name, count, ...) fixes the
        layout, ``meta["topk"]`` and ``meta["num_classes"]`` the row widths.
    sample_rows: the per-sample fields (``key_hash``, ``label``) in global index order, (N,).
    """
    units = meta["data"]["units"]
    max_count = max(int(u["count"]) for u in units)
    chunk_rows = chunk_rows or schema.default_chunk_rows(max_count)
    slot = schema.slot_size(max_count, chunk_rows)
    meta = {**meta, "slot": slot, "chunk_rows": chunk_rows, "schema_version": schema.SCHEMA_VERSION}
    rows = slot * len(units)
    # The group is born with the creation marker (one write), so a creation killed at any point
    # is recognised as one and redone.
    creating = {_CREATING: True}
    try:
        group = zarr.open_group(path, mode="w-", zarr_format=3, attributes=creating)
    except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
        if not _half_created(path):
            raise KdcacheError(
                f"{path} already exists and is not a kdcache cache; choose another --out"
            ) from None
        # A creation that was killed: nothing in it can be done yet, start it over.
        log.warning("%s is a cache whose creation was interrupted; creating it again", path)
        group = zarr.open_group(path, mode="w", zarr_format=3, attributes=creating)
    except PermissionError as e:
        raise KdcacheError(f"cannot create the cache at {path}: {e.strerror}") from None
    faults.point("group")
    k, c = int(meta["topk"]), int(meta["num_classes"])
    for field in schema.ROW_FIELDS:
        trail = schema.trailing_shape(field, k)
        group.create_array(
            field.name,
            shape=(epochs, rows, *trail),
            dtype=schema.field_dtype(field, c),
            chunks=(1, chunk_rows, *trail),
            # A unit that fits one chunk is one file without zarr's sharding codec, which would
            # only add an index and a second read; larger units are a shard of several chunks.
            shards=(1, slot, *trail) if slot > chunk_rows else None,
            compressors=_compressors(field.shuffle),
            fill_value=field.fill,
            dimension_names=("epoch", "row", *[f"d{i}" for i in range(len(trail))]),
        )
    sums = [[] for _ in units]
    for field in schema.SAMPLE_FIELDS:
        trail = schema.trailing_shape(field, k)
        arr = group.create_array(
            field.name,
            shape=(rows, *trail),
            dtype=field.dtype,
            chunks=(slot, *trail),
            compressors=_compressors(field.shuffle),
            fill_value=field.fill,
            dimension_names=("row", *[f"d{i}" for i in range(len(trail))]),
        )
        full = np.full((rows, *trail), field.fill, dtype=field.dtype)
        for u, unit in enumerate(units):
            start = int(unit["start"])
            full[u * slot : u * slot + int(unit["count"])] = sample_rows[field.name][
                start : start + int(unit["count"])
            ]
            sums[u].append(schema.rows_checksum(full[u * slot : u * slot + int(unit["count"])]))
        arr[:] = full
    meta["sample_checksums"] = sums  # per unit, per sample array (SAMPLE_FIELDS order)
    group.create_array(
        schema.MANIFEST_ARRAY,
        shape=(epochs, len(units), 2 + len(schema.ROW_FIELDS)),
        dtype="uint32",
        chunks=(1, 1, 2 + len(schema.ROW_FIELDS)),
        fill_value=schema.MANIFEST_FILL,
        compressors=_compressors(),
        dimension_names=("epoch", "unit", "entry"),
    )
    group.create_array(
        schema.DONE_ARRAY,
        shape=(epochs, len(units)),
        dtype="uint8",
        chunks=(1, 1),
        fill_value=0,
        compressors=[Crc32cCodec()],
        dimension_names=("epoch", "unit"),
    )
    faults.point("create")
    group.attrs.put({schema.FORMAT_NAME: meta})  # replaces the creation marker in one write
    log.info("created cache %s: %d units x %d rows, %d epochs", path, len(units), slot, epochs)
    return Cache(path, mode="a")


_CREATING = "kdcache_creating"
_ROW_NAMES = [f.name for f in schema.ROW_FIELDS]
_SAMPLE_NAMES = [f.name for f in schema.SAMPLE_FIELDS]


def _half_created(path: str) -> bool:
    try:
        attrs = zarr.open_group(path, mode="r").attrs
    except Exception:  # not a group at all
        return False
    return bool(attrs.get(_CREATING)) and schema.FORMAT_NAME not in attrs


def open_cache(path: str, mode: str = "r") -> Cache:
    """Open an existing cache for reading (``mode="r"``) or appending (``"a"``)."""
    if "://" not in str(path) and not os.path.exists(path):
        raise KdcacheError(f"no cache at {path}; make one with `kdcache precompute --out {path}`")
    try:
        return Cache(path, mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise KdcacheError(f"{path} is not a Zarr group (is it a kdcache cache?)") from None
    except (ValueError, TypeError) as e:  # a truncated or edited zarr.json (JSON errors included)
        raise CacheDamagedError(
            f"cannot read the cache's metadata {path}/zarr.json ({type(e).__name__}: {e}); "
            "it is damaged: restore it or re-make the cache"
        ) from None
