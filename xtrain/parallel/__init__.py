"""Parallel strategies, each a transform applied from outside to a plain model.

``STRATEGIES`` maps ``strategy.name`` to its class.
"""

from xtrain.parallel.base import Single, Strategy
from xtrain.parallel.data import DataParallel

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Single, DataParallel)}

__all__ = ["STRATEGIES", "Strategy"]
