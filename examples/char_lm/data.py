"""The corpus: the Python standard library's own ``.py`` sources, as bytes.

Nothing here downloads. By default the corpus is every ``.py`` file under
``sysconfig.get_paths()["stdlib"]``, without ``site-packages`` and without test
folders (``test``, ``tests``, ``idle_test``). Bytes are the tokens (vocabulary 256).

The split is by file and deterministic: a file goes to validation when the SHA-256 of
its relative path (POSIX form), read as a number, is ``< VAL_PERCENT`` modulo 100;
about 90/10. It depends on nothing but the path, so it is the same on every run and
seed, and a file added to the library does not move any other.

``--data PATH`` trains on a text file or a folder instead: a folder is split by file as
above (all its regular files, hidden ones skipped); a single file, or a folder whose
files all hash to one side, is split by position (the first 90 % of the bytes train).
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path
from typing import NamedTuple

import numpy as np

VAL_PERCENT = 10
EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__"})


class DataError(ValueError):
    """The data path is missing, unreadable, empty or too small; the message says which."""


class Corpus(NamedTuple):
    """Train and validation bytes (uint8), the files of each part and a description."""

    train: np.ndarray
    val: np.ndarray
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    description: str


def stdlib_root() -> Path:
    """The directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_val(relative_path: str) -> bool:
    """Whether the file at ``relative_path`` (POSIX form) belongs to the validation part."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < VAL_PERCENT


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The ``.py`` files under ``root`` (the stdlib), without site-packages and test folders."""
    root = stdlib_root() if root is None else root
    return sorted(
        p
        for p in root.rglob("*.py")
        if p.is_file() and not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
    )


def folder_files(root: Path) -> list[Path]:
    """All regular files under ``root``, hidden files and folders skipped, sorted."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"--data {path}: cannot read it ({err.strerror or err})") from err


def split_files(root: Path, files: list[Path]) -> tuple[list[str], list[str]]:
    """(train, val) relative paths of ``files`` under ``root``, split by :func:`is_val`."""
    names = [p.relative_to(root).as_posix() for p in files]
    return [n for n in names if not is_val(n)], [n for n in names if is_val(n)]


def _join(root: Path, names: list[str]) -> np.ndarray:
    return np.frombuffer(b"".join(_read(root / n) for n in names), dtype=np.uint8)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def split_by_file(root: Path, files: list[Path], what: str) -> Corpus:
    """The files' bytes split by file (or by position when one part would be empty)."""
    train_names, val_names = split_files(root, files)
    if not train_names or not val_names:
        return split_by_position(_join(root, train_names + val_names), what, len(files))
    train, val = _join(root, train_names), _join(root, val_names)
    description = (
        f"{what}: {len(files)} files, {_mb(train.size + val.size)}; split by file "
        f"(SHA-256 of the relative path, {VAL_PERCENT}% to validation): "
        f"train {len(train_names)} files {_mb(train.size)}, "
        f"validation {len(val_names)} files {_mb(val.size)}"
    )
    return Corpus(train, val, tuple(train_names), tuple(val_names), description)


def split_by_position(text: np.ndarray, what: str, n_files: int = 1) -> Corpus:
    """The first ``100 - VAL_PERCENT`` % of ``text`` for training, the rest for validation."""
    cut = text.size - text.size * VAL_PERCENT // 100
    description = (
        f"{what}: {n_files} file(s), {_mb(text.size)}; split by position: the first "
        f"{100 - VAL_PERCENT}% ({_mb(cut)}) train, the last {VAL_PERCENT}% "
        f"({_mb(text.size - cut)}) validation"
    )
    return Corpus(text[:cut], text[cut:], (), (), description)


def load_corpus(path: str | Path | None = None) -> Corpus:
    """The stdlib corpus, or the file or folder at ``path``, split into train and validation.

    Raises:
      DataError: ``path`` does not exist, cannot be read, or holds no bytes.
    """
    if path is None:
        root = stdlib_root()
        files = stdlib_files(root)
        if not files:
            raise DataError(f"no .py files found in the standard library at {root}")
        return split_by_file(root, files, f"Python {sysconfig.get_python_version()} stdlib .py")
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"--data {path}: no such file or folder")
    if path.is_dir():
        try:
            files = folder_files(path)
        except OSError as err:
            raise DataError(f"--data {path}: cannot list the folder ({err})") from err
        files = [f for f in files if f.stat().st_size > 0]
        if not files:
            raise DataError(f"--data {path}: the folder holds no non-empty file")
        return split_by_file(path, files, f"--data {path}")
    if not path.is_file():
        raise DataError(f"--data {path}: not a regular file or folder")
    text = np.frombuffer(_read(path), dtype=np.uint8)
    if text.size == 0:
        raise DataError(f"--data {path}: the file is empty")
    return split_by_position(text, f"--data {path}")


def limit(corpus: Corpus, n: int | None) -> Corpus:
    """The first ``n`` bytes of each part (unchanged for ``None``)."""
    if n is None:
        return corpus
    return corpus._replace(
        train=corpus.train[:n],
        val=corpus.val[:n],
        description=f"{corpus.description}; using the first {n:,} bytes of each part",
    )


def check_size(corpus: Corpus, context: int) -> None:
    """Raises DataError if a part is too short for one window of ``context + 1`` bytes."""
    for name, part in (("training", corpus.train), ("validation", corpus.val)):
        if part.size < context + 1:
            raise DataError(
                f"{corpus.description}: the {name} part has {part.size} bytes, fewer than one "
                f"window of {context + 1} (--context {context} + 1): use more data or a "
                "shorter context"
            )


def val_windows(val: np.ndarray, n: int, length: int) -> np.ndarray:
    """``(m, length)`` windows of ``val``, ``m <= n``, at evenly spaced starts (fixed)."""
    last = val.size - length
    m = min(n, last + 1)
    starts = np.linspace(0, last, m).round().astype(np.int64)
    return np.stack([val[s : s + length] for s in starts])
