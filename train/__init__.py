"""The training stage: streaming replay, the student loop, evaluation, teacher modes."""

from kdcache.train.config import TrainConfig
from kdcache.train.fit import fit

__all__ = ["TrainConfig", "fit"]
