"""The precompute stage: teacher inference over many epochs of views -> a Zarr cache."""

from kdcache.cache.precompute import PrecomputeConfig, precompute

__all__ = ["PrecomputeConfig", "precompute"]
