"""Per-worker access to units: their samples (encoded) and decoded images, with a small LRU.

Both stages read data the same way: a work item names a unit and some of its rows; the worker
loads the unit's tar once (kept while later items of the same unit arrive), decodes the rows it
needs and their mixing partners, and renders. Objects here are created inside DataLoader workers
(they hold open files and decoded images, which should not be pickled).
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping

import numpy as np
from PIL import Image

from kdcache import schema
from kdcache.data.index import DatasetIndex
from kdcache.data.webdataset import Sample, read_unit
from kdcache.errors import KdcacheError
from kdcache.render import PILLOW, Renderer, SourceImage

log = logging.getLogger(__name__)


class UnitReader:
    """Reads units of ``index`` on demand; keeps the last ``capacity`` units' samples and,
    within a byte budget, the decoded images (a mixup partner is usually decoded already).
    ``strict``: a shard without its tar end blocks is an error, not a warning."""

    def __init__(
        self,
        index: DatasetIndex,
        capacity: int = 4,
        image_budget: int = 256 << 20,
        strict: bool = False,
        max_pixels: int | None = None,
        renderer: Renderer = PILLOW,
    ):
        """max_pixels: images with more pixels are marked too large, undecoded (None:
        Pillow's limit, ``PIL.Image.MAX_IMAGE_PIXELS``). renderer: whose decoder turns the
        bytes into images (Pillow's, or FFCV's libjpeg-turbo call)."""
        self.index = index
        self.renderer = renderer
        self.strict = strict
        self.max_pixels = max_pixels
        self.capacity = capacity
        self.image_budget = image_budget
        self._units: OrderedDict[int, list[Sample]] = OrderedDict()
        self._images: OrderedDict[int, Image.Image] = OrderedDict()
        self._image_bytes = 0

    def samples(self, unit: int) -> list[Sample]:
        if unit in self._units:
            self._units.move_to_end(unit)
            return self._units[unit]
        url = self.index.units[unit].url
        samples = read_unit(url, strict=self.strict)
        expected = self.index.units[unit].count
        if len(samples) != expected:
            raise KdcacheError(
                f"shard {url} now holds {len(samples)} samples but its index says {expected}, "
                "so it changed after it was indexed: re-index it with `kdcache index DATA`"
            )
        self._units[unit] = samples
        while len(self._units) > self.capacity:
            self._units.popitem(last=False)
        return samples

    def _remember(self, i: int, image: SourceImage) -> None:
        self._images[i] = image
        self._image_bytes += _bytes(image)
        while self._image_bytes > self.image_budget and self._images:
            _, old = self._images.popitem(last=False)
            self._image_bytes -= _bytes(old)

    def decode(self, indices: Iterable[int]) -> tuple[dict[int, Image.Image], dict[int, int]]:
        """Decode global ``indices`` -> ({index: RGB image}, {index that failed: why}), the
        reason a row status (:data:`schema.NO_IMAGE`, :data:`schema.UNDECODABLE`, or
        :data:`schema.TOO_LARGE` over Pillow's pixel limit, ``Image.MAX_IMAGE_PIXELS``: above it,
        not only above twice it where Pillow refuses)."""
        if self.max_pixels is None:
            with warnings.catch_warnings():  # Pillow's warning between 1x and 2x: too large
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                return self._decode(indices)
        # Our own limit, from the index's header sizes; Pillow's own is lifted meanwhile (it
        # would refuse, above twice its default, what a user allowed).
        pillow = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return self._decode(indices)
        finally:
            Image.MAX_IMAGE_PIXELS = pillow

    def _decode(self, indices: Iterable[int]) -> tuple[dict[int, Image.Image], dict[int, int]]:
        images: dict[int, Image.Image] = {}
        failed: dict[int, int] = {}
        for i in sorted(set(int(i) for i in indices)):
            if i in self._images:
                self._images.move_to_end(i)
                images[i] = self._images[i]
                continue
            unit = self.index.unit_index_of(i)
            sample = self.samples(unit)[i - self.index.units[unit].start]
            if not sample.data:
                failed[i] = schema.NO_IMAGE
                continue
            height, width = (int(v) for v in self.index.size[i])
            if self.max_pixels is not None and height * width > self.max_pixels:
                log.warning(
                    "sample %s (%s) is %dx%d, over the limit of %d pixels "
                    "(--max-image-pixels); marked too large",
                    sample.key,
                    i,
                    width,
                    height,
                    self.max_pixels,
                )
                failed[i] = schema.TOO_LARGE
                continue
            try:
                images[i] = self.renderer.decode(sample.data, height, width)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                height, width = (int(v) for v in self.index.size[i])
                log.warning(
                    "sample %s (%s) is %dx%d, over Pillow's limit of %s pixels "
                    "(PIL.Image.MAX_IMAGE_PIXELS); marked too large",
                    sample.key,
                    i,
                    width,
                    height,
                    Image.MAX_IMAGE_PIXELS,
                )
                failed[i] = schema.TOO_LARGE
                continue
            except (OSError, ValueError, SyntaxError) as e:
                log.warning("cannot decode sample %s (%s): %s", sample.key, i, e)
                failed[i] = schema.UNDECODABLE
                continue
            self._remember(i, images[i])
        return images, failed


def _bytes(image: SourceImage) -> int:
    return image.nbytes if isinstance(image, np.ndarray) else image.width * image.height * 3


def row_status(
    rows: np.ndarray, partner: np.ndarray, box: np.ndarray, failed: Mapping[int, int]
) -> np.ndarray:
    """Whether each row's view can be rendered, once its images were decoded: the one rule
    precompute writes into the cache and training applies to fresh views.

    rows, partner: (n,) global indices (partner -1: not mixed); box: (n, 4) the own crop (an
    empty box: the image's size was unreadable); failed: :meth:`UnitReader.decode`'s reasons.
    -> (n,) uint8 status: OK, the row's own reason, or PARTNER_UNUSABLE. Labels play no part.
    """
    status = np.array(
        [
            failed.get(
                int(r), schema.PARTNER_UNUSABLE if p >= 0 and int(p) in failed else schema.OK
            )
            for r, p in zip(rows, partner, strict=True)
        ],
        dtype=np.uint8,
    ).reshape(-1)
    status[(np.asarray(box).reshape(-1, 4)[:, 2] == 0) & (status == schema.OK)] = schema.UNDECODABLE
    return status


def needed_images(rows: np.ndarray, partner: np.ndarray) -> np.ndarray:
    """Global indices to decode for ``rows`` and their partners (-1 = none)."""
    return np.union1d(rows, partner[partner >= 0])
