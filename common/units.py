"""Per-worker access to units: their samples (encoded) and decoded images, with a small LRU.

Both stages read data the same way: a work item names a unit and some of its rows; the worker
loads the unit's tar once (kept while later items of the same unit arrive), decodes the rows it
needs and their mixing partners, and renders. Objects here are created inside DataLoader workers
(they hold open files and decoded images, which should not be pickled).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
import torch

from kdcache.data.index import DatasetIndex
from kdcache.data.webdataset import Sample, read_unit
from kdcache.errors import KdcacheError
from kdcache.render import decode_image

log = logging.getLogger(__name__)


class UnitReader:
    """Reads units of ``index`` on demand; keeps the last ``capacity`` units' samples."""

    def __init__(self, index: DatasetIndex, capacity: int = 4):
        self.index = index
        self.capacity = capacity
        self._units: OrderedDict[int, list[Sample]] = OrderedDict()

    def samples(self, unit: int) -> list[Sample]:
        if unit in self._units:
            self._units.move_to_end(unit)
            return self._units[unit]
        samples = read_unit(self.index.units[unit].url)
        expected = self.index.units[unit].count
        if len(samples) != expected:
            raise KdcacheError(
                f"shard {self.index.units[unit].url} now holds {len(samples)} samples, the index "
                f"says {expected}; the data changed since it was indexed: run `kdcache index`"
            )
        self._units[unit] = samples
        while len(self._units) > self.capacity:
            self._units.popitem(last=False)
        return samples

    def decode(self, indices: Iterable[int]) -> tuple[dict[int, torch.Tensor], set[int]]:
        """Decode global ``indices`` -> ({index: (3, H, W) uint8}, {indices that failed})."""
        images: dict[int, torch.Tensor] = {}
        failed: set[int] = set()
        for i in sorted(set(int(i) for i in indices)):
            unit = self.index.unit_index_of(i)
            sample = self.samples(unit)[i - self.index.units[unit].start]
            if sample.data is None:
                failed.add(i)
                continue
            try:
                images[i] = decode_image(sample.data)
            except (OSError, ValueError, SyntaxError) as e:
                log.warning("cannot decode sample %s (%s): %s", sample.key, i, e)
                failed.add(i)
        return images, failed


def needed_images(rows: np.ndarray, partner: np.ndarray) -> np.ndarray:
    """Global indices to decode for ``rows`` and their partners (-1 = none)."""
    return np.union1d(rows, partner[partner >= 0])
