"""Tests for examples/char_lm: a 20-step smoke run with the loss falling, the deterministic
and disjoint file split, clear errors for bad ``--data``, bitwise resume (also with 8-bit
moments, bfloat16 params and gradient accumulation), and
deterministic generation.

Offline and CPU-only, on a tiny model and a slice of the corpus. Multi-device runs
(``--devices 8 --zero1``) are in tests/multidevice/test_char_lm_devices.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

_ROOT = Path(__file__).resolve().parents[1]
_EXAMPLES = _ROOT / "examples"
# The example is imported as the package ``char_lm``; adam_jax from the checkout if not installed.
for _path in (str(_ROOT), str(_EXAMPLES)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from char_lm import config, data, train  # noqa: E402

TINY = {
    "steps": 20,
    "batch_size": 8,
    "context": 32,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 2,
    "d_mlp": 64,
    "lr": 1e-2,
    "warmup_steps": 2,
    "eval_every": 10,
    "eval_windows": 16,
    "eval_batch_size": 8,
    "sample_bytes": 24,
    "data_limit": 200_000,
    "progress": False,
    "quick_compile": True,  # compilation is most of a tiny run's time
}


def tiny_config(out: Path, **overrides) -> config.Config:
    """A run of a few seconds: a tiny model on the first 200 kB of each part."""
    return config.Config(**{**TINY, "out": str(out), **overrides})


@pytest.fixture(scope="module")
def corpus() -> data.Corpus:
    return data.load_corpus()


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus) -> train.Result:
    """The uninterrupted tiny run (seed 0)."""
    return train.train_and_evaluate(tiny_config(tmp_path_factory.mktemp("straight")), corpus)


# ----------------------------------------------------------------------------- data


def test_stdlib_split_is_deterministic_disjoint_and_about_ninety_ten(corpus) -> None:
    again = data.load_corpus()
    assert again.train_files == corpus.train_files and again.val_files == corpus.val_files
    np.testing.assert_array_equal(again.val, corpus.val)
    train_files, val_files = set(corpus.train_files), set(corpus.val_files)
    assert not train_files & val_files
    every = {p.relative_to(data.stdlib_root()).as_posix() for p in data.stdlib_files()}
    assert train_files | val_files == every
    assert 0.05 < len(val_files) / len(every) < 0.15
    assert 0.05 < corpus.val.size / (corpus.train.size + corpus.val.size) < 0.15
    for name in every:
        parts = name.split("/")[:-1]
        assert not {"site-packages", "test", "tests", "idle_test"} & set(parts), name
        assert name.endswith(".py")
    # The split depends on the path only: a file's side is its hash's, whatever else exists.
    assert all(data.is_val(n) for n in val_files) and not any(map(data.is_val, train_files))
    # The bytes are the files' bytes, in order.
    root = data.stdlib_root()
    first = (root / corpus.val_files[0]).read_bytes()
    assert corpus.val[: len(first)].tobytes() == first
    assert "split by file (SHA-256 of the relative path" in corpus.description


def test_folder_is_split_by_file_and_a_single_file_by_position(tmp_path: Path) -> None:
    folder = tmp_path / "text"
    folder.mkdir()
    for i in range(40):
        (folder / f"f{i:02d}.txt").write_bytes(bytes([65 + i % 26]) * 100)
    (folder / ".hidden").write_bytes(b"x" * 100)
    (folder / "empty.txt").write_bytes(b"")
    got = data.load_corpus(folder)
    assert got.train_files and got.val_files and not set(got.train_files) & set(got.val_files)
    assert len(got.train_files) + len(got.val_files) == 40  # hidden and empty files skipped
    assert got.train.size == 100 * len(got.train_files)
    assert data.load_corpus(folder).val_files == got.val_files
    single = tmp_path / "one.txt"
    single.write_bytes(bytes(range(256)) * 4)
    by_position = data.load_corpus(single)
    assert by_position.train.size == 922 and by_position.val.size == 102
    assert by_position.val.tobytes() == single.read_bytes()[922:]
    assert "split by position" in by_position.description


def bad_paths(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    empty_file = tmp_path / "empty.txt"
    empty_file.write_bytes(b"")
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    (empty_dir / "zero.py").write_bytes(b"")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    return {
        "missing": (tmp_path / "nope.txt", "no such file or folder"),
        "empty file": (empty_file, "the file is empty"),
        "empty folder": (empty_dir, "holds no non-empty file"),
        "not a file": (fifo, "not a regular file or folder"),
    }


def test_bad_data_gives_a_clear_error(tmp_path: Path) -> None:
    for name, (path, message) in bad_paths(tmp_path).items():
        with pytest.raises(data.DataError, match=message) as info:
            data.load_corpus(path)
        assert str(path) in str(info.value), name
    small = tmp_path / "small.txt"
    small.write_bytes(b"print('hi')\n" * 10)
    with pytest.raises(data.DataError, match="fewer than one window of 65"):
        data.check_size(data.load_corpus(small), 64)


def load_main():
    spec = importlib.util.spec_from_file_location("char_lm_main", _EXAMPLES / "char_lm/main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_main_reports_bad_data_in_one_line(tmp_path: Path, capsys) -> None:
    main = load_main().main
    for path, message in bad_paths(tmp_path).values():
        status = main(["--data", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
        err = capsys.readouterr().err
        assert status == 1
        assert err.startswith("error: --data ") and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--kahan"], "add --param-dtype bfloat16"),
        (["--optimizer", "optax", "--moments", "8bit"], "adam_jax options"),
        (["--zero1"], "use devices > 1"),
        (["--stop-after", "0"], "stop_after must be in 1..steps"),
    ],
)
def test_bad_options_exit_with_usage(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        load_main().parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- training


def test_smoke_run_loss_falls_and_writes_outputs(straight, tmp_path_factory) -> None:
    train_curve = np.asarray(straight.history["train"])
    assert list(train_curve[:, 0]) == [10, 20]
    val = straight.history["val"]
    assert [s for s, _ in val] == [10, 20]
    # Uniform over bytes is log(256) = 5.55 nats; 20 steps learn the byte frequencies
    # (measured, seed 0: train 4.45 then 3.22, validation 3.44 then 3.36).
    assert val[0][1] < 3.6 and val[1][1] < val[0][1], val
    assert train_curve[1, 1] < train_curve[0, 1] - 0.5
    assert straight.val_loss == val[-1][1]
    assert straight.sample.startswith(b"def ") and len(straight.sample) == 4 + 24


def test_main_prints_val_loss_last_and_writes_metrics(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["--out", str(out), "--no-progress", "--steps", "20", "--warmup-steps", "2"]
    argv += ["--eval-every", "10", "--context", "32", "--batch-size", "8", "--lr", "1e-2"]
    main = load_main()
    cfg = main.parse_args(argv)
    assert cfg.d_model == config.Config().d_model and cfg.steps == 20  # the preset's model
    # The default model is slow to compile for a test: main runs the tiny one (the settings
    # of the smoke run, so the compiled steps are shared).
    original = main.preset
    main.preset = lambda name, **kw: original(name, **{**kw, **TINY, "progress": False})
    try:
        assert main.main(argv) == 0
    finally:
        main.preset = original
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("val_loss=") and math.isfinite(float(lines[-1].split("=")[1]))
    assert any(line.startswith("step    10/20  train_loss=") for line in lines)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and metrics["val_loss"] == pytest.approx(float(lines[-1][9:]), 1e-3)
    assert metrics["opt_state_bytes"] / metrics["params"] == pytest.approx(8.0, abs=0.01)
    assert metrics["sample"].startswith("def ")
    assert (out / "curves.png").stat().st_size > 10_000
    assert (out / "checkpoints" / "20").is_dir()
    assert main.main(argv) == 1  # a second fresh run refuses to replace the first
    assert "--overwrite" in capsys.readouterr().err


def params_equal(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_resume_is_bitwise(tmp_path: Path, corpus, straight) -> None:
    cfg = tiny_config(tmp_path)
    first = train.train_and_evaluate(dataclasses.replace(cfg, stop_after=10), corpus)
    assert first.history["val"] == straight.history["val"][:1]
    resumed = train.train_and_evaluate(dataclasses.replace(cfg, resume=True), corpus)
    params_equal(resumed.params, straight.params)
    assert resumed.history["train"] == straight.history["train"]
    assert resumed.history["val"] == straight.history["val"]
    assert resumed.sample == straight.sample
    with pytest.raises(train.ResumeError, match=r"lr: checkpoint 0\.01, now 0\.02"):
        train.train_and_evaluate(dataclasses.replace(cfg, resume=True, lr=2e-2), corpus)


def test_resume_is_bitwise_with_low_memory_options(tmp_path: Path, corpus) -> None:
    """8-bit moments, bfloat16 params, 2 micro-batches per step (optax.MultiSteps).

    (Stochastic rounding and Kahan summation would add 5-10 s of compilation here; their
    state is a key and a count, or a bfloat16 buffer, which the checkpoint holds as is.)
    """
    options = {
        "moments": "8bit",
        "param_dtype": "bfloat16",
        "accum": 2,
        "steps": 8,
        "eval_every": 4,
        "sample_bytes": 0,
    }
    cfg = tiny_config(tmp_path / "a", **options)
    want = train.train_and_evaluate(cfg, corpus)
    assert jax.tree.leaves(want.params)[0].dtype == np.dtype("bfloat16")
    cfg = tiny_config(tmp_path / "b", **options)
    train.train_and_evaluate(dataclasses.replace(cfg, stop_after=4), corpus)
    got = train.train_and_evaluate(dataclasses.replace(cfg, resume=True), corpus)
    params_equal(got.params, want.params)
    assert got.history["val"] == want.history["val"]


def test_generation_is_deterministic_for_a_seed(tmp_path: Path, corpus, straight) -> None:
    cfg = tiny_config(tmp_path, sample_bytes=64)
    setup = train.build(cfg)
    key = jax.random.key(7)
    one = train.sample_text(setup, cfg, straight.params, key)
    assert one == train.sample_text(setup, cfg, straight.params, key)
    assert one != train.sample_text(setup, cfg, straight.params, jax.random.key(8))
    assert one.startswith(b"def ") and len(one) == 4 + 64
    # The run's own sample is reproduced from its seed's key.
    run_key = jax.random.split(jax.random.key(cfg.seed), 3)[2]
    short = dataclasses.replace(cfg, sample_bytes=24)
    assert train.sample_text(setup, short, straight.params, run_key) == straight.sample


def test_packed_params_and_grouped_moments_train_as_the_plain_run(tmp_path, corpus, straight):
    """``--packed --layout grouped``: the same AdamW on flat buffers, the same run."""
    cfg = tiny_config(tmp_path, packed=True, layout="grouped", sample_bytes=0)
    run = train.build(cfg)
    assert len(jax.tree.leaves(run.init(jax.random.key(0)).params)) == 2  # decay / no decay
    result = train.train_and_evaluate(cfg, corpus)
    # Unpacking inside the loss changes XLA's fusions, so gradients differ by float32
    # rounding; Adam divides by sqrt(v), which turns that into up to ~lr for elements whose
    # gradient is near zero (a few biases), while the params as a whole stay together.
    # Measured (seed 0): largest difference 1.3e-5, relative norm 1.8e-6.
    leaves = jax.tree.leaves(result.params), jax.tree.leaves(straight.params)
    pairs = list(zip(*leaves, strict=True))
    largest = max(float(np.max(np.abs(x - y))) for x, y in pairs)
    diff = np.sqrt(sum(float(np.sum(np.square(x - y, dtype=np.float64))) for x, y in pairs))
    norm = np.sqrt(sum(float(np.sum(np.square(y, dtype=np.float64))) for _, y in pairs))
    print(f"packed + grouped vs plain: largest {largest:.3g}, relative norm {diff / norm:.3g}")
    assert largest < cfg.lr and diff / norm < 1e-4
    np.testing.assert_allclose(
        np.asarray(result.history["val"])[:, 1], np.asarray(straight.history["val"])[:, 1], 1e-5
    )
