"""Reading the teacher cache on disk: :class:`Cache` and :func:`open_cache`.

One work unit is one (epoch, unit): its rows are written whole (every row array, one file each:
a chunk, or a Zarr shard of chunks for long units), then its cell of the ``done`` array is set. A
unit without its done mark is not in the cache, whatever files exist: a killed writer can leave
complete files of some arrays but never a unit that reads as done.

:class:`Cache` opens a cache and reads it: lazy array handles that survive a fork, the unit
table (:class:`~kdcache.schema.UnitRecord`), the data index it holds, done marks, a unit's rows
(whole local chunk files read directly, the rest through zarr) checked against the manifest, and
the identity check. Writing (create, commit a unit, repair, extend) is
:class:`~kdcache.cache_writer.CacheWriter`'s; ``open_cache(path, "a")`` returns one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np
import zarr

from kdcache import schema
from kdcache.chunks import ChunkFile, ShardFile, chunk_reader
from kdcache.data.index import DatasetIndex, Unit
from kdcache.errors import CacheDamagedError, CacheMismatchError, KdcacheError
from kdcache.render import InputConvention
from kdcache.views import ViewSpec
from kdcache.zarr_compat import sync as zarr_sync  # runs a coroutine on zarr's own I/O loop

if TYPE_CHECKING:
    from kdcache.cache_writer import CacheWriter, create_cache  # re-exported lazily: below

log = logging.getLogger(__name__)

__all__ = ["Cache", "CacheWriter", "create_cache", "open_cache"]

# What a damaged chunk raises: a failed checksum (ValueError), blosc (RuntimeError), a torn file
# (OSError), a shard index that points nowhere (KeyError).
_READ_ERRORS = (OSError, ValueError, RuntimeError, KeyError)


class Cache:
    """An open cache, for reading. Array handles are opened lazily, so the object pickles into
    workers."""

    _group_mode = "r"  # the writer's is "r+"

    def __init__(self, path: str):
        self.path = str(path)
        self._group: zarr.Group | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._chunk_files: dict[str, ChunkFile | ShardFile | None] = {}
        self._pid = os.getpid()
        self._has_manifest: bool | None = None
        self.meta: dict[str, Any] = dict(self.group.attrs.get(schema.FORMAT_NAME) or {})
        if not self.meta:
            raise KdcacheError(f"{self.path} is a Zarr group but not a kdcache cache")
        _check_schema_version(self.path, self.meta)
        for key, value in schema.LEGACY_ATTRIBUTES.items():  # older caches mean these
            self.meta.setdefault(key, value)
        # The view spec in today's form (caches made before view ops store the old dict, read
        # as the preset pipeline it describes), so identities compare like with like.
        spec = ViewSpec.from_dict(self.meta["views"])
        self.meta["views"] = spec.to_dict()
        self._spec = spec
        self.row_fields = schema.row_fields(self.meta["views"], self.meta.get("avatars"))
        self.row_names = tuple(f.name for f in self.row_fields)
        self._check_layout()

    def _check_layout(self) -> None:
        """Refuse attributes that do not agree with the arrays (edited or damaged ones): top-k
        width, class-index dtype, rows per unit slot and unit counts."""
        m = self.meta
        try:
            k, c, slot, units = int(m["topk"]), int(m["num_classes"]), self.slot, self.units
            counts = [u.count for u in units]
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
        return {
            "path": self.path,
            "meta": self.meta,
            "_spec": self._spec,
            "row_fields": self.row_fields,
            "row_names": self.row_names,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(
            state, _group=None, _arrays={}, _chunk_files={}, _pid=os.getpid(), _has_manifest=None
        )  # the unit table is parsed again from meta on first use

    @property
    def group(self) -> zarr.Group:
        # A forked DataLoader worker inherits the parent's handles, and with them its network
        # sessions (s3fs, gcsfs), which do not survive a fork: each process opens its own.
        if self._group is None or self._pid != os.getpid():
            self._group = zarr.open_group(self.path, mode=self._group_mode)
            self._arrays, self._chunk_files = {}, {}
            self._pid = os.getpid()
        return self._group

    def array(self, name: str) -> zarr.Array:
        group = self.group  # reopens (and forgets array handles) after a fork
        if name not in self._arrays:
            self._arrays[name] = group[name]
        return self._arrays[name]

    def _chunk_file(self, name: str) -> ChunkFile | ShardFile | None:
        array = self.array(name)  # first: it forgets the readers after a fork
        if name not in self._chunk_files:
            self._chunk_files[name] = chunk_reader(self.path, array)
        return self._chunk_files[name]

    # -- layout ----------------------------------------------------------------------------

    @functools.cached_property
    def units(self) -> tuple[schema.UnitRecord, ...]:
        """The unit table (``data.units`` of the attributes), in slot order."""
        return tuple(schema.UnitRecord.from_attrs(u) for u in self.meta["data"]["units"])

    @property
    def slot(self) -> int:
        return int(self.meta["slot"])

    @property
    def epochs(self) -> int:
        """Epochs allocated (complete or not)."""
        return int(self.array(schema.DONE_ARRAY).shape[0])

    @property
    def epochs_per_block(self) -> int:
        """B: epochs per block, the epochs one file of a unit holds (1 in caches before blocks)."""
        return int(self.meta.get("epochs_per_block", 1))

    def block_of(self, epoch: int) -> range:
        """The allocated epochs of ``epoch``'s block (:func:`kdcache.schema.block_of`)."""
        return schema.block_of(epoch, self.epochs_per_block, self.epochs)

    @property
    def avatars(self) -> dict[str, Any]:
        """The avatar ensembles it holds: {"n": N, "drop": P, "site": LAYER}; n 0 for none."""
        return dict(self.meta.get("avatars") or schema.NO_AVATARS)

    @property
    def topk(self) -> int:
        return int(self.meta["topk"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def spec(self) -> ViewSpec:
        return self._spec

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
        return slice(start, start + self.units[unit].count)

    def dataset_index(self) -> DatasetIndex | None:
        """The index of the data this cache was made from (units with their URLs and stamps,
        per-sample arrays in global order); None for a cache that does not record URLs, or whose
        per-sample arrays cannot be read (then the shards are indexed and verify finds why)."""
        units = self.units
        if not all(u.located for u in units):
            return None
        keep = np.concatenate([np.arange(u.count) + i * self.slot for i, u in enumerate(units)])
        try:  # whole arrays: one zarr call each, its chunks fetched concurrently
            rows = {f.name: self.array(f.name)[...][keep] for f in schema.SAMPLE_FIELDS}
        except _READ_ERRORS as e:
            log.warning(
                "cannot read the index stored in %s (%s); indexing the shards", self.path, e
            )
            return None
        table = [
            Unit(u.name, u.url, u.start, u.count, u.content_hash, u.bytes, u.stamp) for u in units
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
        return self._read(fields or self.row_names, epoch, unit)

    def read_samples(
        self, unit: int, fields: tuple[str, ...] | None = None
    ) -> dict[str, np.ndarray]:
        """The unit's per-sample rows (every per-sample array, or ``fields``), (count, ...) each."""
        return self._read(fields or schema.SAMPLE_NAMES, None, unit)

    def _read(self, names: tuple[str, ...], epoch: int | None, unit: int) -> dict[str, np.ndarray]:
        """A unit's rows of some arrays (of one epoch, or per-sample when ``epoch`` is None).

        Where the unit is one whole chunk of a local array, the chunk is read directly from its
        file, or from its block's shard (:mod:`kdcache.chunks`, ~10x faster than a zarr call). The other arrays (a URL, a sharded
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
            expected = int(entry[2 + self.row_names.index(name)])
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
            expected = sums[unit][schema.SAMPLE_NAMES.index(name)]
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
            f"({self.units[unit].name}) is damaged ({type(error).__name__}: {error}); "
            "find all damage with `kdcache verify` and fix it with `kdcache verify --repair`"
        )

    # -- identity --------------------------------------------------------------------------

    def check_identity(self, expected: Mapping[str, Any], what: str = "this job") -> None:
        """Refuse when any identity attribute differs, naming each one and both values."""
        diffs = [
            f"{key}: cache has {self.meta.get(key)!r}, {what} has {value!r}"
            for key, value in expected.items()
            if value is not None and self.meta.get(key) != value
        ]
        if diffs:
            hint = ""
            if any(d.startswith("teacher_input:") for d in diffs):
                hint = " (--teacher-mean/--teacher-std set the teacher's input convention)"
            if any(d.startswith("renderer:") for d in diffs):
                hint += (
                    " (--renderer pillow|ffcv chooses the renderer; a cache is replayed by the "
                    "renderer that made it)"
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


@overload
def open_cache(path: str, mode: Literal["r"] = "r") -> Cache: ...
@overload
def open_cache(path: str, mode: Literal["a", "r+"]) -> CacheWriter: ...
@overload
def open_cache(path: str, mode: str) -> Cache: ...


def open_cache(path: str, mode: str = "r") -> Cache:
    """Open an existing cache for reading (``mode="r"``: a :class:`Cache`) or for writing
    (``"a"`` or ``"r+"``: a :class:`~kdcache.cache_writer.CacheWriter`)."""
    if mode not in _MODES:
        raise ValueError(f"open_cache: mode {mode!r} is not one of {', '.join(_MODES)}")
    if "://" not in str(path) and not os.path.exists(path):
        raise KdcacheError(f"no cache at {path}; make one with `kdcache precompute --out {path}`")
    if mode == "r":
        kind: type[Cache] = Cache
    else:
        from kdcache.cache_writer import CacheWriter  # it subclasses Cache: imported when used

        kind = CacheWriter
    try:
        return kind(path)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise KdcacheError(f"{path} is not a Zarr group (is it a kdcache cache?)") from None
    except (ValueError, TypeError) as e:  # a truncated or edited zarr.json (JSON errors included)
        raise CacheDamagedError(
            f"cannot read the cache's metadata {path}/zarr.json ({type(e).__name__}: {e}); "
            "it is damaged: restore it or re-make the cache"
        ) from None


_MODES = ("r", "a", "r+")


def __getattr__(name: str) -> Any:
    # The writer's names, as they were when store.py held them (``from kdcache.store import
    # create_cache`` keeps working); kdcache.cache_writer imports this module, hence lazily.
    if name in ("CacheWriter", "create_cache"):
        from kdcache import cache_writer

        return getattr(cache_writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
