"""Plain models. No parallel code lives here: strategies transform them from outside."""

from xtrain.model.moe import (
    MoE,
    RouterStats,
    aux_loss,
    router_losses,
    update_router_bias,
    z_loss,
)
from xtrain.model.transformer import ModelConfig, Transformer, build_model

__all__ = [
    "MoE",
    "ModelConfig",
    "RouterStats",
    "Transformer",
    "aux_loss",
    "build_model",
    "router_losses",
    "update_router_bias",
    "z_loss",
]
