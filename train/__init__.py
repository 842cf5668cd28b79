"""The training stage: streaming replay, the student loop, evaluation, teacher modes.

``fit`` and ``TrainConfig`` load on first use, so ``kdcache --help`` stays free of torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainConfig", "fit"]


def __getattr__(name: str) -> Any:
    if name == "fit":
        from kdcache.train.trainer import fit

        return fit
    if name == "TrainConfig":
        from kdcache.train.config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'kdcache.train' has no attribute {name!r}")
