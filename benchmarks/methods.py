"""The optimizers under test, each behind the same small ``Runner`` interface.

A runner owns its params and optimizer state; the gradients are fixed and
shared by all runners of one shape (:class:`Inputs`). One "step" is the full
Adam step: for JAX, ``tx.update`` plus ``optax.apply_updates`` in one jitted
function with params and state donated; for torch, ``opt.step()``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
import typing
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adam_jax

LEARNING_RATE = 1e-3

try:  # torch is optional: its methods are skipped when it is absent.
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None


def _jax_device(device: str) -> jax.Device:
    return jax.devices("cpu" if device == "cpu" else None)[0]


class Inputs:
    """One shape's NumPy source data and the gradients built from it, made once and shared."""

    def __init__(self, np_params: Any, np_grads: Any, device: str):
        self.np_params = np_params
        self.np_grads = np_grads
        self.device = device
        self.tree_bytes = sum(a.nbytes for a in jax.tree.leaves(np_params))
        self._cache: dict[str, Any] = {}

    def _cached(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def jax_grads(self) -> Any:
        # Not donated, so on CPU device_put may alias the NumPy buffers (no copy).
        return self._cached(
            "jax_grads", lambda: jax.device_put(self.np_grads, _jax_device(self.device))
        )

    def flat_params_np(self) -> np.ndarray:
        return np.concatenate([a.reshape(-1) for a in jax.tree.leaves(self.np_params)])

    def flat_grads(self) -> jax.Array:
        def make():
            flat = np.concatenate([a.reshape(-1) for a in jax.tree.leaves(self.np_grads)])
            return jax.device_put(flat, _jax_device(self.device))

        return self._cached("flat_grads", make)

    def torch_grads(self) -> list[Any]:
        def make():
            dev = "cuda" if self.device == "gpu" else "cpu"
            # On CPU from_numpy aliases the NumPy grads; Adam only reads them.
            return [torch.from_numpy(a).to(dev) for a in jax.tree.leaves(self.np_grads)]

        return self._cached("torch_grads", make)

    def drop_source_params(self) -> None:
        """Frees the NumPy params once every runner has its own copy."""
        self.np_params = None

    def close(self) -> None:
        _delete_jax(list(self._cache.values()))
        self._cache.clear()
        self.np_params = self.np_grads = None


def _delete_jax(tree: Any) -> None:
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            leaf.delete()


class Runner:
    """Interface: ``setup`` (returns compile/first-call timings), ``run(steps)``, ``close``."""

    name: str
    family: str  # "jax" or "torch"
    description: str

    def setup(self, inputs: Inputs) -> dict[str, float]:
        raise NotImplementedError

    def run(self, steps: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def bytes_needed(self, tree_bytes: int) -> int:
        """Rough resident bytes while running, for planning which methods fit together."""
        return 3 * tree_bytes  # params, mu, nu


class JaxRunner(Runner):
    """A jitted ``params, state = step(params, state, grads)`` with params and state donated."""

    family = "jax"

    def __init__(
        self,
        name: str,
        make_tx: Callable[[], optax.GradientTransformation],
        description: str,
        *,
        flat: bool = False,
        transient_trees: int = 0,
    ):
        self.name, self.make_tx, self.description = name, make_tx, description
        self.flat = flat
        self.transient_trees = transient_trees
        self.params = self.state = self.grads = self.compiled = None

    def bytes_needed(self, tree_bytes: int) -> int:
        return (3 + self.transient_trees) * tree_bytes

    def setup(self, inputs: Inputs) -> dict[str, float]:
        tx = self.make_tx()
        dev = _jax_device(inputs.device)
        # jnp.array copies: donated params must never alias a NumPy buffer.
        if self.flat:
            self.params = jnp.array(inputs.flat_params_np(), device=dev)
            self.grads = inputs.flat_grads()
        else:
            self.params = jax.tree.map(lambda a: jnp.array(a, device=dev), inputs.np_params)
            self.grads = inputs.jax_grads()
        self.state = tx.init(self.params)

        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        t0 = time.perf_counter()
        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(self.params, self.state, self.grads)
        t1 = time.perf_counter()
        self.compiled = lowered.compile()
        t2 = time.perf_counter()
        return {"trace_lower_s": t1 - t0, "compile_s": t2 - t1, "lower_compile_s": t2 - t0}

    def run(self, steps: int) -> None:
        params, state, grads, fn = self.params, self.state, self.grads, self.compiled
        for _ in range(steps):
            params, state = fn(params, state, grads)
        self.params, self.state = jax.block_until_ready((params, state))

    def close(self) -> None:
        _delete_jax((self.params, self.state))
        self.params = self.state = self.grads = self.compiled = None


class TorchRunner(Runner):
    """``torch.optim.Adam`` on preallocated params with fixed, preallocated grads."""

    family = "torch"

    def __init__(self, name: str, description: str, **adam_kwargs: Any):
        self.name, self.description, self.adam_kwargs = name, description, adam_kwargs
        self.opt = self.params = None
        self.sync: Callable[[], None] = lambda: None

    def setup(self, inputs: Inputs) -> dict[str, float]:
        dev = "cuda" if inputs.device == "gpu" else "cpu"
        if dev == "cuda":
            self.sync = torch.cuda.synchronize
        grads = inputs.torch_grads()
        self.params = []
        for a, g in zip(jax.tree.leaves(inputs.np_params), grads, strict=True):
            p = torch.nn.Parameter(torch.from_numpy(a).to(dev, copy=True))
            p.grad = g
            self.params.append(p)
        self.opt = torch.optim.Adam(self.params, lr=LEARNING_RATE, **self.adam_kwargs)
        # The first step allocates the moments; it is reported, not timed with the rest.
        self.sync()
        t0 = time.perf_counter()
        self.opt.step()
        self.sync()
        return {"first_step_s": time.perf_counter() - t0}

    def run(self, steps: int) -> None:
        step = self.opt.step
        for _ in range(steps):
            step()
        self.sync()

    def close(self) -> None:
        if self.params is not None:
            for p in self.params:
                p.grad = None
        self.opt = self.params = None


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    description: str
    make: Callable[[], Runner]


def _literal_values(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    values: list[Any] = []
    for arg in typing.get_args(annotation):  # Optional[Literal[...]], unions
        values += _literal_values(arg)
    return values


def adam_jax_layouts(explicit: list[str] | None = None) -> list[Any]:
    """The non-default values of ``adam_jax.adam``'s ``layout`` keyword, if it has one.

    Taken from ``explicit`` if given, else from a ``Literal`` annotation, else
    from an ``adam_jax.LAYOUTS`` constant. Empty when there is no such keyword.
    """
    param = inspect.signature(adam_jax.adam).parameters.get("layout")
    if param is None:
        return []
    if explicit:
        values: list[Any] = list(explicit)
    else:
        try:
            values = _literal_values(typing.get_type_hints(adam_jax.adam).get("layout"))
        except Exception:
            values = []
        if not values:
            values = list(getattr(adam_jax, "LAYOUTS", ()))
    return [v for v in values if v != param.default]


def all_methods(layouts: list[str] | None = None) -> tuple[list[Method], dict[str, str]]:
    """Returns the methods that can run here, and ``{name: reason}`` for those that cannot."""
    adam = lambda **kw: lambda: adam_jax.adam(LEARNING_RATE, **kw)
    layout_param = inspect.signature(adam_jax.adam).parameters.get("layout")
    default = (
        "per-leaf (no layout keyword)"
        if layout_param is None
        else f"default layout={layout_param.default!r}"
    )
    methods = [
        Method(
            "adam_jax",
            f"adam_jax.adam, {default}",
            lambda: JaxRunner("adam_jax", adam(), "adam_jax.adam"),
        )
    ]
    for value in adam_jax_layouts(layouts):
        name = f"adam_jax[layout={value}]"
        methods.append(
            Method(
                name,
                f"adam_jax.adam(layout={value!r})",
                lambda name=name, value=value: JaxRunner(name, adam(layout=value), name),
            )
        )
    methods += [
        Method(
            "optax",
            "optax.adam",
            lambda: JaxRunner("optax", lambda: optax.adam(LEARNING_RATE), "optax.adam"),
        ),
        Method(
            "optax_again",
            "a second, independent optax.adam runner (the same compiled program as "
            "optax): its ratio to optax is the timing noise of this run (A/A control)",
            lambda: JaxRunner("optax_again", lambda: optax.adam(LEARNING_RATE), "optax.adam"),
        ),
        Method(
            "optax_flatten",
            "optax.flatten(optax.adam): state is one flat buffer; grads and params "
            "are concatenated every step",
            lambda: JaxRunner(
                "optax_flatten",
                lambda: optax.flatten(optax.adam(LEARNING_RATE)),
                "optax.flatten(optax.adam)",
                transient_trees=3,
            ),
        ),
        Method(
            "flat_buffer",
            "one flat buffer: the whole tree as a single concatenated float32 array, "
            "updated by adam_jax.adam (the ideal case)",
            lambda: JaxRunner("flat_buffer", adam(), "adam_jax.adam on one buffer", flat=True),
        ),
    ]
    torch_methods = [
        ("torch_single", "torch.optim.Adam(foreach=False)", {"foreach": False}),
        ("torch_foreach", "torch.optim.Adam(foreach=True)", {"foreach": True}),
        ("torch_fused", "torch.optim.Adam(fused=True)", {"fused": True}),
    ]
    skipped: dict[str, str] = {}
    for name, desc, kwargs in torch_methods:
        if torch is None:
            skipped[name] = "torch is not importable"
            continue
        methods.append(Method(name, desc, lambda n=name, d=desc, k=kwargs: TorchRunner(n, d, **k)))
    return methods, skipped


def torch_version() -> str | None:
    return None if torch is None else torch.__version__


def set_torch_threads(n: int) -> None:
    if torch is not None:
        torch.set_num_threads(n)


def median(xs: list[float]) -> float:
    return float(np.median(np.asarray(xs)))


def ceil_div_time(target_s: float, per_call_s: float) -> int:
    return max(1, math.ceil(target_s / max(per_call_s, 1e-9)))
