"""``kdcache precompute``: the stage's entry, over the core's teacher pass.

The work itself, rendering views, running the teacher and committing units, lives in the core
(:mod:`kdcache.teacher_pass`): the training stage makes the fixed teacher's center-view cache
with the same code, and the stages never import each other.
"""

from kdcache.teacher_pass import PrecomputeConfig, cache_identity, precompute

__all__ = ["PrecomputeConfig", "cache_identity", "precompute"]
