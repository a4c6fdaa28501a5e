"""Smoke test of the benchmark harness: tiny shapes, outputs well formed, no timing claims."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
JAX_METHODS = {"adam_jax", "optax", "optax_again", "optax_flatten", "flat_buffer"}
TORCH_METHODS = {"torch_single", "torch_foreach", "torch_fused"}
HAS_TORCH = importlib.util.find_spec("torch") is not None
QUICK = ["--quick", "--repeats", "2", "--min-repeat-ms", "1", "--triad-n", "100000"]


def _run(args: list[str], *, block_torch: bool = False) -> None:
    code = (
        "import sys; sys.modules['torch'] = None; " if block_torch else "import sys; "
    ) + "from benchmarks.adam_bench import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _check_results(out: pathlib.Path, shapes: list[str], methods: set[str]) -> dict:
    results = json.loads((out / "results.json").read_text())
    for key in ("machine", "versions", "triad", "shapes", "methods", "config", "command"):
        assert key in results
    assert results["triad"]["gbps"] > 0
    assert results["triad"]["roofline_mparams_per_s"] > 0
    assert [s["name"] for s in results["shapes"]] == shapes
    for shape in results["shapes"]:
        assert shape["params"] > 0 and shape["leaves"] > 0
        assert set(shape["results"]) == set(results["methods"]), shape["skipped"]
        assert methods <= set(shape["results"])
        for res in shape["results"].values():
            for key in ("ms_per_step", "mparams_per_s", "roofline_fraction", "ratio_vs_optax"):
                assert res[key] > 0, key
            assert len(res["repeat_ms_per_step"]) == 2
            assert all(t > 0 for t in res["repeat_ms_per_step"])
            assert all(v > 0 for v in res["setup"].values())
            paired = res["paired_vs_optax"]
            assert 0 < paired["lo"] <= paired["median"] <= paired["hi"]
        optax_paired = shape["results"]["optax"]["paired_vs_optax"]
        assert optax_paired == {"median": 1.0, "lo": 1.0, "hi": 1.0}
    markdown = (out / "results.md").read_text()
    assert "| shape | leaves | params |" in markdown
    assert "## Paired speed-up vs optax" in markdown
    for name in results["methods"]:
        assert f"`{name}`" in markdown
    return results


def test_quick_run_writes_well_formed_results(tmp_path):
    shapes = ["leaf_1e4", "mnist_cnn"]
    _run([*QUICK, "--shapes", ",".join(shapes), "--out", str(tmp_path)])
    methods = JAX_METHODS | (TORCH_METHODS if HAS_TORCH else set())
    results = _check_results(tmp_path, shapes, methods)
    e2e = results["end_to_end"]["results"]
    assert {"adam_jax", "optax"} <= set(e2e)
    assert all(r["ms_per_step"] > 0 and r["compile_s"] > 0 for r in e2e.values())
    if HAS_TORCH:
        for shape in results["shapes"]:
            assert shape["results"]["torch_fused"]["ratio_vs_torch_fused"] == pytest.approx(1.0)
    assert (tmp_path / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_torch_methods_skipped_cleanly_without_torch(tmp_path):
    _run(
        [*QUICK, "--shapes", "leaf_1e4", "--no-e2e", "--no-plot", "--out", str(tmp_path)],
        block_torch=True,
    )
    results = _check_results(tmp_path, ["leaf_1e4"], JAX_METHODS)
    assert set(results["skipped_methods"]) == TORCH_METHODS
    assert not TORCH_METHODS & set(results["methods"])
    assert results["versions"]["torch"] is None


def test_compile_time_script_writes_rows_for_every_case(tmp_path):
    from benchmarks.studies import compile_time

    compile_time.main(["--leaves", "3,6", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "compile_time.json").read_text())
    methods = {"adam_jax[grouped]", "adam_jax[per_leaf]", "optax", "packed (1 buffer)"}
    assert {(r["leaves"], r["method"]) for r in results["adam"]} == {
        (n, m) for n in (3, 6) for m in methods
    }
    cases = {r["case"]: r for r in results["kernels"]}
    slice_cases = {"static_slices", "runtime_offsets", "opaque_while"}
    assert set(cases) == {"identical", "distinct_constants", *slice_cases}
    for row in [*results["adam"], *results["kernels"]]:
        assert row["compile"] > 0
        assert row["total"] >= row["trace"] + row["lower"] + row["compile"] - 1e-9
    # _run_ms raises unless every slice form returns exactly the slices of the buffer.
    assert all(cases[c]["run_ms"] > 0 for c in slice_cases)
    assert "| 6 | packed (1 buffer) |" in (tmp_path / "compile_time.md").read_text()
    train = {r["method"]: r for r in results["train"]}
    assert set(train) == {"tree, adam_jax[grouped]", "tree, optax", "packed, adam_jax"}
    assert all(r["leaves"] == 6 and r["compile"] > 0 and r["run_ms"] > 0 for r in train.values())
    # The split of XLA's compile time, read from its pass log in a child process.
    split = {r["method"]: r for r in results["pass_split"]}
    assert set(split) == methods - {"packed (1 buffer)"}
    for row in split.values():
        assert 0 < row["hlo_passes"] < row["compile"]
        assert row["rest"] == pytest.approx(row["compile"] - row["hlo_passes"])
        assert row["top_passes"] and all(t > 0 for _, t in row["top_passes"])


def test_paired_ratio_is_the_median_of_per_repeat_ratios():
    from benchmarks.harness import paired_ratio

    # Drift that moves both methods together cancels in the per-repeat ratio.
    ref = [2.0, 4.0, 8.0, 2.2, 4.4]
    faster = [t / 2 for t in ref]
    out = paired_ratio(ref, faster)
    assert out == pytest.approx({"median": 2.0, "lo": 2.0, "hi": 2.0})
    noisy = paired_ratio([1.0, 1.0, 1.0, 1.0], [1.0, 0.5, 2.0, 1.0])
    assert noisy["lo"] < noisy["median"] == 1.0 < noisy["hi"]


def test_round_robin_lets_torch_threads_park_before_the_next_method(monkeypatch):
    from benchmarks import harness

    class Fake:
        def __init__(self, name, family):
            self.name, self.family = name, family

        def run(self, steps):
            order.append(self.name)

    order: list[str] = []
    sleeps: list[tuple[str, float]] = []
    monkeypatch.setattr(harness.time, "sleep", lambda s: sleeps.append((order[-1], s)))
    runners = [Fake("a", "jax"), Fake("t", "torch"), Fake("b", "jax")]
    times = harness.round_robin(runners, {"a": 1, "t": 1, "b": 1}, repeats=3)
    assert all(len(v) == 3 for v in times.values())
    # Every torch repeat, and only those, is followed by the untimed pause.
    assert sleeps == [("t", harness.TORCH_COOLDOWN_S)] * 3
    # Each repeat runs every runner once, in the seeded order of that repeat.
    for rep in range(3):
        want = [runners[i].name for i in harness.repeat_order(3, rep)]
        assert order[3 * rep : 3 * rep + 3] == want


def test_repeat_orders_are_permutations_that_vary_the_successors():
    from benchmarks import harness

    n = 12
    orders = [harness.repeat_order(n, rep) for rep in range(7)]
    assert all(sorted(o) == list(range(n)) for o in orders)
    assert orders == [harness.repeat_order(n, rep) for rep in range(7)]  # seeded
    # Method 0's successor changes across repeats (a cyclic order would fix it).
    successors = {o[(o.index(0) + 1) % n] for o in orders}
    assert len(successors) > 1


def test_eager_script_writes_a_row_per_leaf_count(tmp_path):
    from benchmarks import eager

    eager.main(["--leaves", "3,7", "--repeats", "1", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "eager.json").read_text())
    assert [r["leaves"] for r in results["rows"]] == [3, 7]
    for row in results["rows"]:
        assert set(row["seconds"]) == set(eager.METHODS)
        assert all(t > 0 for t in row["seconds"].values())
    assert "| 7 |" in (tmp_path / "eager.md").read_text()


def test_low_memory_script_writes_every_table(tmp_path):
    """``benchmarks.low_memory`` on a 4096-element leaf (the smallest quantized size):
    speed, bytes, temp bytes, robustness and targets for ours and the non-compiling
    peers (torchao compiles its step: 10-20 s, left to the full run)."""
    from benchmarks import low_memory

    ours = list(low_memory.OURS)
    peers = ["torch_fused", "bnb_8bit", "optimi_kahan"]
    argv = ["--leaves", "4096", "--repeats", "2", "--min-repeat-ms", "1", "--tree", "gpt2_d512"]
    argv += ["--no-tree-temp", "--robust-steps", "3", "--out", str(tmp_path)]
    low_memory.main([*argv, "--methods", ",".join(ours + peers)])
    results = json.loads((tmp_path / "low_memory.json").read_text())
    for key in ("machine", "versions", "command", "loadavg_start", "leaves", "tree", "targets"):
        assert key in results
    (leaf,) = results["leaves"]
    assert leaf["shape"] == [4096]
    ran = set(leaf["results"])
    assert ran | set(leaf["skipped"]) == set(ours + peers)
    assert set(ours) <= ran
    for name, r in leaf["results"].items():
        assert r["ms_per_step"] > 0 and len(r["repeat_ms_per_step"]) == 2
        assert r["state_bytes_per_param"] > 0
        assert r["ratio"] is not None or name not in ours
    assert leaf["results"]["fp32"]["ratio"] == 1.0
    assert leaf["results"]["fp32"]["state_bytes_per_param"] == pytest.approx(8.0, rel=1e-3)
    assert leaf["results"]["8bit"]["state_bytes_per_param"] < 2.1
    assert leaf["results"]["4bit"]["state_bytes_per_param"] < 1.2
    assert all(leaf["results"][n]["temp_bytes"] is not None for n in ours)
    tree = results["tree"]["rows"]
    assert set(tree) == set(ours)
    assert tree["bf16_kahan_8bit"]["total_bytes_per_param"] < 8.0
    robust = results["robustness"]["rows"]
    assert set(ours) <= set(robust)
    assert robust["fp32"]["max_ratio"] == pytest.approx(1.0, abs=1e-3)
    markdown = (tmp_path / "low_memory.md").read_text()
    assert "## Targets" in markdown and "## Robustness" in markdown
    for name in ran:
        assert f"`{name}`" in markdown
