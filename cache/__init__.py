"""The precompute stage: teacher inference over many epochs of views -> a Zarr cache
(:mod:`kdcache.teacher_pass` does the work; :mod:`kdcache.cache.verify` checks a cache and
repairs it, :mod:`kdcache.cache.inspect` reports on one)."""

from kdcache.cache.precompute import PrecomputeConfig, precompute

__all__ = ["PrecomputeConfig", "precompute"]
