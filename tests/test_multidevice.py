"""Runs ``tests/multidevice`` on 8 virtual CPU devices, in a subprocess.

``--xla_force_host_platform_device_count`` only acts before jax is imported,
and this process has already imported it with one device.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MULTIDEVICE_ENV

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600


MODULES = sorted(p.name for p in (ROOT / "tests" / "multidevice").glob("test_*.py"))


@pytest.mark.parametrize("module", MODULES)
def test_multidevice_module_on_eight_virtual_devices(module):
    """One subprocess per module, so that ``pytest -n`` spreads them over its workers."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env[MULTIDEVICE_ENV] = "1"
    cmd = [
        sys.executable,
        *("-m", "pytest", "-q", "-p", "no:cacheprovider"),
        f"tests/multidevice/{module}",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert " passed" in output and "skipped" not in output, output[-2000:]


def test_every_multidevice_module_is_run():
    assert len(MODULES) >= 5 and "test_sharding.py" in MODULES, MODULES
