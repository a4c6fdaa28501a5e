"""Helpers the examples share: devices, checkpoints, progress bars, metrics and plots.

Imported as the top-level package ``common`` (each example's ``main.py`` puts
``examples/`` on ``sys.path``). Nothing here knows about a particular model.
"""
