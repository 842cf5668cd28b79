"""The cache schema: array names, dtypes, fill values, layout and the schema version.

Both stages use this module and nothing else to know what a cache holds. ``docs/cache-format.md``
is its prose twin; change the two together and bump :data:`SCHEMA_VERSION` when a reader of the
old version could misread the new layout.

Layout. Rows are ``unit * slot + position``: each unit (tar shard) owns a slot of ``slot`` rows
(its largest unit rounded up to ``chunk_rows``; unused rows are padding). Epochs are grouped in
blocks of ``epochs_per_block`` (B; 1 in caches made before blocks existed), and one file per
array is exactly one (block, slot): a chunk when B is 1 and the unit fits one chunk, else a Zarr
shard of (1 epoch, ``chunk_rows``) chunks. A block of a unit is written whole by one writer and
no two units ever share a file. Done marks and manifest cells stay per (epoch, unit), stored in
(block, unit) shards the same way.

Units. The group attributes list the units (``data.units``); :class:`UnitRecord` is one entry,
typed, read from the stored dict and written back to the same one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np

# 2: a row is bad only when its image is unusable, and says why (statuses 3-6); labels play no
# part. Version 1 caches read as before: their status 2 covers every reason, unlabelled rows and
# labels outside the teacher's classes included, and extending one keeps that rule.
# 3: epochs in blocks of ``epochs_per_block`` > 1, one shard per array per (unit, block). Readers
# of version 2 would read such a cache right, but their writers would write its blocks an epoch
# at a time (several ranks into one shard file), so they must refuse it: a cache with one epoch
# per block is still written as version 2, and any kdcache reads and extends it.
# 4: avatar ensembles (``--avatars N``): four more row arrays (AVATAR_FIELDS), named by the
# ``avatars`` attribute. Readers of version 3 would take the manifest's extra checksums for
# damage, so such a cache is version 4; a cache without avatars is written as before.
SCHEMA_VERSION = 4
BLOCKS_VERSION = 3  # the first version with epoch blocks
AVATARS_VERSION = 4  # the first version with avatar ensembles
FORMAT_NAME = "kdcache"

# Row status. Anything but OK is skipped by training.
PADDING, OK, BAD_INPUT, NO_IMAGE, UNDECODABLE, PARTNER_UNUSABLE = 0, 1, 2, 3, 4, 5
TOO_LARGE = 6
STATUS_NAMES = {
    PADDING: "padding",
    OK: "ok",
    BAD_INPUT: "bad input",  # schema 1: any reason, a missing or out-of-range label included
    NO_IMAGE: "no image",  # the sample has no image member, or an empty one
    UNDECODABLE: "undecodable",  # the image bytes do not decode
    PARTNER_UNUSABLE: "partner undecodable",  # the mixing partner's image failed to decode
    TOO_LARGE: "too large",  # more pixels than Pillow's limit (PIL.Image.MAX_IMAGE_PIXELS)
}
BAD_STATUSES = (BAD_INPUT, NO_IMAGE, UNDECODABLE, PARTNER_UNUSABLE, TOO_LARGE)


def labels_rule(schema_version: int) -> bool:
    """Whether a cache of this version marks unlabelled and out-of-range rows bad (version 1)."""
    return schema_version < 2


@dataclass(frozen=True)
class Field:
    """One array. ``trailing`` is the shape after (epoch, row) or (row,)."""

    name: str
    dtype: str
    fill: float | int | bool
    trailing: tuple[int | str, ...] = ()  # "k" is replaced by top-k
    per_epoch: bool = True
    doc: str = ""
    shuffle: str = "bitshuffle"  # blosc's filter before zstd: bits pack small ints tightest


ROW_FIELDS: tuple[Field, ...] = (
    # 16 bits are plenty for a check (a unit of wrong rows passes with odds 2**-16 per row) and
    # save 2 of the 44 bytes a row may take.
    Field("seed", "uint16", 0, doc="low 16 bits of the view's generator key"),
    Field("box", "uint16", 0, (4,), doc="own crop (top, left, height, width), source pixels"),
    Field("flip", "bool", False, doc="own horizontal flip"),
    Field("partner", "int32", -1, doc="global index of the mixing partner, -1 when not mixed"),
    Field("partner_box", "uint16", 0, (4,), doc="partner's crop (top, left, height, width)"),
    Field("partner_flip", "bool", False, doc="partner's horizontal flip"),
    Field("lam", "float16", 1.0, doc="weight of the sample's own image, 1 when not mixed"),
    Field(
        "topk_logits",
        "float16",
        0.0,
        ("k",),
        doc="teacher's k largest logits, descending",
        shuffle="shuffle",  # floats: byte shuffle packs ~0.5 B/row tighter than bit shuffle
    ),
    Field("topk_index", "int16", 0, ("k",), doc="their class indices (int32 when C > 32767)"),
    Field("lse", "float32", 0.0, doc="log-sum-exp of the teacher's full logits"),
    Field(
        "status",
        "uint8",
        PADDING,
        doc="0 padding, 1 ok, 2 bad input (schema 1), 3 no image, 4 undecodable, "
        "5 partner undecodable, 6 too large",
    ),
)
SAMPLE_FIELDS: tuple[Field, ...] = (
    Field("key_hash", "uint64", 0, per_epoch=False, doc="blake2b-64 of the sample's key"),
    Field("label", "int32", -1, per_epoch=False, doc="dataset label, -1 when missing"),
    Field(
        "size",
        "int32",
        0,
        (2,),
        per_epoch=False,
        doc="decoded image (height, width); (0, 0) when unreadable",
    ),
)
# With ``--avatars N`` (the ``avatars`` attribute: {"n": N, "drop": P, "site": LAYER}): the
# avatar ensemble's target, as the teacher's, and the view's uncertainty.
AVATAR_FIELDS: tuple[Field, ...] = (
    Field(
        "avatar_topk_logits",
        "float16",
        0.0,
        ("k",),
        doc="the avatar ensemble's k largest log-probabilities (log of the mean of the N "
        "avatars' probabilities), descending",
        shuffle="shuffle",
    ),
    Field("avatar_topk_index", "int16", 0, ("k",), doc="their class indices"),
    Field("avatar_lse", "float32", 0.0, doc="log-sum-exp of the ensemble's log-probabilities"),
    Field(
        "avatar_u",
        "float32",
        0.0,
        doc="uncertainty: variance over the N avatars of KL(avatar || teacher)",
    ),
)
NO_AVATARS: dict[str, Any] = {"n": 0}
ROW_NAMES = tuple(f.name for f in ROW_FIELDS)  # a manifest cell's checksums come in this order
SAMPLE_NAMES = tuple(f.name for f in SAMPLE_FIELDS)  # and ``sample_checksums``' in this one
VIEW_FIELDS = ("seed", "box", "flip", "partner", "partner_box", "partner_flip", "lam")


def row_fields(
    views: Mapping[str, Any], avatars: Mapping[str, Any] | None = None
) -> tuple[Field, ...]:
    """The per-epoch arrays of a cache whose ``views`` attribute is ``views``: the
    :data:`ROW_FIELDS` every cache has, then one per field of its view ops
    (:meth:`kdcache.views.ViewSpec.op_fields`: RandAugment's ops and magnitudes, erasing's and
    CutMix's boxes, ...), in pipeline order, then the :data:`AVATAR_FIELDS` when its
    ``avatars`` attribute has ``n > 0``. A manifest cell checksums them in this order."""
    from kdcache.views import ViewSpec

    spec = ViewSpec.from_dict(views)
    extra = tuple(
        Field(name, f.dtype, f.fill, f.shape, doc=f.doc) for name, _, _, f in spec.op_fields()
    )
    return ROW_FIELDS + extra + (AVATAR_FIELDS if has_avatars(avatars) else ())


def has_avatars(avatars: Mapping[str, Any] | None) -> bool:
    """Whether an ``avatars`` attribute asks for avatar ensembles."""
    return bool(avatars) and int(avatars.get("n", 0)) > 0


DONE_ARRAY = "done"  # (epochs, units) uint8, one chunk per cell: the commit marker of a unit
# (epochs, units, 2 + row arrays) uint32, one chunk per cell, written just before the done mark:
# the cell's (epoch, unit), then per row array (ROW_FIELDS order) the crc32c of the unit's rows
# as committed. A missing, swapped or foreign unit file reads back as other rows: damage. Caches
# made before it existed (schema 1, and early schema 2) have none and are checked less.
MANIFEST_ARRAY = "manifest"
MANIFEST_FILL = 0xFFFFFFFF  # a cell never written: no (epoch, unit) is 2**32 - 1


@dataclass(frozen=True)
class UnitRecord:
    """One unit (tar shard) of a cache, as its attributes record it (an entry of ``data.units``).

    ``start``: its first global sample index; ``count``: its samples (rows ``unit * slot`` to
    ``unit * slot + count``). ``url``, ``bytes`` and ``stamp`` say where the shard was when it was
    indexed; None in caches that do not record them.
    """

    name: str
    count: int
    start: int
    content_hash: str
    url: str | None = None
    bytes: int | None = None
    stamp: str | None = None

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> UnitRecord:
        """From a stored entry. A missing required key raises KeyError, a bad count TypeError or
        ValueError: the reader turns those into damage."""
        size = attrs.get("bytes")
        return cls(
            name=attrs["name"],
            count=int(attrs["count"]),
            start=int(attrs["start"]),
            content_hash=attrs["content_hash"],
            url=attrs.get("url"),
            bytes=None if size is None else int(size),
            stamp=attrs.get("stamp"),
        )

    def to_attrs(self) -> dict[str, Any]:
        """The stored entry: the keys and their order as caches hold them (those not known left
        out)."""
        out: dict[str, Any] = {
            "name": self.name,
            "count": self.count,
            "content_hash": self.content_hash,
            "start": self.start,
        }
        for key in ("bytes", "url", "stamp"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @property
    def located(self) -> bool:
        """Whether the record says where the shard was (what adopting the cache's index needs)."""
        return self.url is not None and self.bytes is not None and self.stamp is not None


def rows_checksum(values: np.ndarray) -> int:
    """crc32c of a unit's rows of one array: its C-order little-endian bytes."""
    data = np.ascontiguousarray(values)
    if data.dtype.byteorder == ">":
        data = data.astype(data.dtype.newbyteorder("<"))
    return google_crc32c.value(data.view(np.uint8).reshape(-1) if data.size else b"")


def index_dtype(num_classes: int) -> str:
    """Class-index dtype: int16 when every class fits, else int32."""
    return "int16" if num_classes <= 32767 else "int32"


def field_dtype(field: Field, num_classes: int) -> np.dtype:
    if field.name == "topk_index":
        return np.dtype(index_dtype(num_classes))
    return np.dtype(field.dtype)


def trailing_shape(field: Field, k: int) -> tuple[int, ...]:
    return tuple(k if d == "k" else int(d) for d in field.trailing)


def slot_size(max_unit_count: int, chunk_rows: int) -> int:
    """Rows owned by each unit: the largest unit, rounded up to whole chunks."""
    return max(1, -(-max_unit_count // chunk_rows)) * chunk_rows


def block_of(epoch: int, epochs_per_block: int, epochs: int) -> range:
    """The epochs of ``epoch``'s block that a cache of ``epochs`` allocated epochs holds (the
    last block may be cut short until the cache is extended)."""
    start = epoch // epochs_per_block * epochs_per_block
    return range(start, min(start + epochs_per_block, epochs))


def default_chunk_rows(max_unit_count: int) -> int:
    """Chunk length along rows: the largest unit rounded up to 64, at most 8192.

    Readers always read whole units, so one chunk per unit costs nothing, and the compressor
    sees more rows at once: ~1 B/row less than 1024-row chunks on ImageNet-shaped rows.
    """
    return min(8192, max(64, -(-max_unit_count // 64) * 64))


# Group attributes that say what a cache *is*. Two precompute runs may only write to the same
# cache when all of these agree; the trainer checks the ones it can know.
IDENTITY_KEYS = (
    "data_fingerprint",
    "teacher_weights_hash",
    "teacher",
    "views",
    "plan_seed",
    "topk",
    "num_classes",
    "teacher_image_size",
    "renderer",
    "teacher_input",
    "avatars",
)
# What a cache written before an attribute existed means by it (read as if it were stored).
LEGACY_ATTRIBUTES = {
    "teacher_input": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "avatars": NO_AVATARS,
}
