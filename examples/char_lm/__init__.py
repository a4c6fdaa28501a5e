"""Byte-level transformer language model example for adam_jax, on the Python stdlib's sources.

Run ``python examples/char_lm/main.py``; the logic lives in :mod:`train`, the defaults
in :mod:`config`, the corpus in :mod:`data`, the model in :mod:`model`.
"""
