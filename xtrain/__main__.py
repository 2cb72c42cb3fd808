"""``python -m xtrain``: the same as the ``xtrain`` command (xtrain/launcher.py)."""

from xtrain.launcher import main

main()
