"""kdcache: patient and consistent knowledge distillation with a precomputed teacher cache.

``kdcache`` (this package, the ``common/`` folder) holds what both stages share; the stages are
``kdcache.cache`` (precompute) and ``kdcache.train``. Heavy modules load on first use.
"""

from __future__ import annotations

from typing import Any

from kdcache.version import __version__

__all__ = ["__version__", "open_cache"]


def __getattr__(name: str) -> Any:
    if name == "open_cache":  # keeps `import kdcache` (and `kdcache --help`) free of zarr
        from kdcache.store import open_cache

        return open_cache
    raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
