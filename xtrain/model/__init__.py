"""Plain models. No parallel code lives here: strategies transform them from outside."""

from xtrain.model.transformer import ModelConfig, Transformer, build_model

__all__ = ["ModelConfig", "Transformer", "build_model"]
