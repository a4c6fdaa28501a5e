"""MNIST CNN example for adam_jax: a Flax NNX CNN trained with ``adam_jax.adamw``.

Run ``python examples/mnist_cnn/main.py``; the logic lives in :mod:`train`,
the defaults in :mod:`config`, the data loaders in :mod:`data`.
"""
