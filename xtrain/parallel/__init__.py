"""Parallel strategies, each a transform applied from outside to a plain model.

``STRATEGIES`` maps ``strategy.name`` to its class.
"""

from xtrain.parallel.base import Single, Strategy
from xtrain.parallel.data import DataParallel, DistributedDataParallel, TensorParallel
from xtrain.parallel.zero import Zero1, Zero2, Zero3

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Single, DataParallel, DistributedDataParallel, TensorParallel, Zero1, Zero2, Zero3)}

__all__ = ["STRATEGIES", "Strategy"]
