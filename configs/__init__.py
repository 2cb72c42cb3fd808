# Makes configs/ importable as the package `xtrain.configs` (see pyproject), so
# Hydra can find it through `pkg://xtrain.configs` from an installed wheel.
