"""Two processes on 127.0.0.1 train with ``jax.distributed``, data parallelism and ZeRO-1.

The params they reach must equal a single-process run. The test ends by itself:
each worker has a deadline, and when one fails or the deadline passes every
worker is killed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

import adam_jax
from tests import multiprocess_worker as worker
from tests.distributed_model import make_batches, make_params, train

ROOT = Path(__file__).resolve().parents[1]
NUM_PROCESSES = 2
LOCAL_DEVICES = 2
DEADLINE_S = 240
TOLERANCE = 1e-5  # float32 rounding: the gradient is all-reduced in another order


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(out_dir: Path) -> list[int]:
    """Starts the workers and waits; kills them all on a failure or at the deadline."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
    env["JAX_PLATFORMS"] = "cpu"
    port = free_port()
    procs = []
    for pid in range(NUM_PROCESSES):
        log = open(out_dir / f"worker_{pid}.log", "w")  # closed in the finally below
        cmd = [sys.executable, "-m", "tests.multiprocess_worker"]
        cmd += [str(pid), str(NUM_PROCESSES), str(port), str(out_dir)]
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log), log))
    deadline = time.monotonic() + DEADLINE_S
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p, _ in procs]
            if any(c not in (None, 0) for c in codes) or all(c == 0 for c in codes):
                break
            time.sleep(0.2)
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            log.close()
    return [p.returncode for p, _ in procs]


def test_two_processes_data_parallel_zero1_equal_single_process(tmp_path):
    codes = run_workers(tmp_path)
    logs = "\n".join(
        f"--- worker {i}:\n" + (tmp_path / f"worker_{i}.log").read_text()[-3000:]
        for i in range(NUM_PROCESSES)
    )
    assert codes == [0] * NUM_PROCESSES, f"exit codes {codes}\n{logs}"

    tx = adam_jax.adamw(worker.LR, weight_decay=worker.WEIGHT_DECAY)
    want, _, want_losses = train(tx, make_params(), make_batches(worker.STEPS))
    want_flat = {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(want)[0]
    }
    results = [dict(np.load(tmp_path / f"params_{i}.npz")) for i in range(NUM_PROCESSES)]
    for got in results:
        assert got.keys() == want_flat.keys()
        diff = max(float(np.max(np.abs(got[k] - want_flat[k]))) for k in got)
        assert diff < TOLERANCE, diff
    for key in want_flat:  # the replicas agree bitwise
        np.testing.assert_array_equal(results[0][key], results[1][key])
    summary = json.loads((tmp_path / "summary_0.json").read_text())
    assert summary["devices"] == NUM_PROCESSES * LOCAL_DEVICES
    np.testing.assert_allclose(summary["losses"], want_losses, rtol=1e-5)
