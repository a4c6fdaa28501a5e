"""Errors an example reports as one line (``error: ...``) instead of a traceback."""

from __future__ import annotations


class RunError(Exception):
    """A run cannot start or go on for a reason the user can fix; ``main`` prints one line."""


class SetupError(RunError, ValueError):
    """``--out``, the data or the devices do not fit the settings; nothing was trained."""


class ResumeError(RunError, ValueError):
    """``--resume`` cannot continue: no checkpoint, or one from a different configuration."""


class DivergedError(RunError, ArithmeticError):
    """A training loss was NaN or infinite; that part of the run was not checkpointed."""
