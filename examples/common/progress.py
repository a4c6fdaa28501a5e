"""Console output: lines on stdout, a tqdm bar on stderr with a running loss and a rate."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm


def log(line: str) -> None:
    """Prints a line to stdout at once (tqdm bars go to stderr)."""
    print(line, flush=True)


class Progress:
    """A tqdm bar over steps showing the running loss and items (tokens, images) per second.

    Losses are device arrays: :meth:`step` keeps them without waiting for the device and
    reads the last ``every`` of them only when the bar is refreshed, so the host does not
    stall the dispatch of the next steps.
    """

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        desc: str = "train",
        unit: str = "tok",
        every: int = 10,
        enabled: bool = True,
    ) -> None:
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled)
        self.unit, self.every = unit, every
        self.pending: list[Any] = []
        self.items = 0
        self.t0 = time.perf_counter()

    def step(self, loss: Any, items: int) -> None:
        """Records one step's loss (a device scalar) and the number of items it consumed."""
        self.pending.append(loss)
        self.items += items
        self.bar.update(1)
        if len(self.pending) >= self.every:
            losses = np.asarray(jax.device_get(self.pending), dtype=np.float64)
            rate = self.items / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"loss={losses.mean():.4f} {self.unit}/s={rate:,.0f}")
            self.pending.clear()
            self.items, self.t0 = 0, time.perf_counter()

    def pause(self) -> None:
        """Restarts the rate's clock (call after an evaluation or a checkpoint)."""
        self.items, self.t0 = 0, time.perf_counter()

    def write(self, line: str) -> None:
        """Prints ``line`` on stdout without breaking the bar."""
        self.bar.clear()
        log(line)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
