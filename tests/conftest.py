"""Test-suite configuration.

``tests/multidevice`` needs 8 virtual CPU devices, which must be requested before
jax is imported; ``tests/test_multidevice.py`` runs it in a subprocess with the
flag set, so the main run skips collecting it.
"""

import os

MULTIDEVICE_ENV = "ADAM_JAX_MULTIDEVICE"

collect_ignore = [] if os.environ.get(MULTIDEVICE_ENV) else ["multidevice"]
