"""xtrain: a distributed-training sandbox for LLMs.

Data flows one way: config -> mesh -> plain model -> strategy transforms ->
training step (which calls comm through the strategy) -> metrics.
"""

__version__ = "0.1.0"
