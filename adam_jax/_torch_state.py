"""PyTorch ``torch.optim.Adam``/``AdamW`` state dicts to and from adam_jax state. No math.

A torch state dict is ``{"state": {i: {"step", "exp_avg", "exp_avg_sq"[,
"max_exp_avg_sq"]}}, "param_groups": [{"params": [i, ...], "lr", "betas", ...}]}``,
keyed by the integer index of each param in the optimizer's param list.
``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq`` are exactly the ``mu``/``nu``/``nu_max``
of :func:`adam_jax.compat.torch_adam` (raw moments; the AMSGrad maximum of raw
``v``). Tensors may be torch tensors or NumPy arrays, so reading a saved state
dict does not need torch.

Layouts differ between frameworks: a ``torch.nn.Linear`` weight is ``(out, in)``,
a Flax ``Dense``/``nnx.Linear`` kernel ``(in, out)``. Pass ``transform=`` (a
``(path, array) -> array`` hook, applied to every moment of that leaf) to
transpose or reshape; shapes that still differ raise a ``ValueError``.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adam_jax._portable import state_from_tree, state_to_tree
from adam_jax._state import AdamState, AmsgradState, is_moment_state

#: torch's names of the moments, and ours.
_FIELDS = (("exp_avg", "mu"), ("exp_avg_sq", "nu"), ("max_exp_avg_sq", "nu_max"))
#: Group hyperparameters compared with ``hyperparams`` (and written by to_torch_state_dict).
_CHECKED = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
_TORCH_GROUP_DEFAULTS = {
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": None,
}

Transform = Callable[[str, np.ndarray], np.ndarray]


def _to_numpy(x: Any) -> np.ndarray:
    """A torch tensor (any dtype, any device) or array-like as a NumPy array of its own.

    Always a copy: ``Tensor.numpy()`` (and ``np.asarray``) share memory with the source,
    and JAX's CPU backend may alias a NumPy buffer; a torch optimizer that keeps
    stepping in place would otherwise change the imported state under us.
    """
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        return np.array(x.numpy(), copy=True)
    return np.array(x, copy=True)


def _the_moment_state(tree: Any) -> AdamState | AmsgradState:
    nodes = [n for n in jax.tree.leaves(tree, is_leaf=is_moment_state) if is_moment_state(n)]
    if len(nodes) != 1:
        raise ValueError(
            f"Expected exactly one Adam/AMSGrad state in the optimizer state, found {len(nodes)}."
        )
    return nodes[0]


def _ids_and_paths(mu_tree: Any, param_ids: Any) -> list[tuple[str, int]]:
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(mu_tree)[0]]
    if param_ids is None:
        return [(p, i) for i, p in enumerate(paths)]
    ids = jax.tree.structure(mu_tree).flatten_up_to(param_ids)
    out = []
    for path, idx in zip(paths, ids, strict=True):
        if isinstance(idx, bool) or not isinstance(idx, (int, np.integer)):
            raise TypeError(f"param_ids{path} must be an int (a torch param index), got {idx!r}.")
        out.append((path, int(idx)))
    seen: dict[int, str] = {}
    for path, idx in out:
        if idx in seen:
            raise ValueError(f"param_ids{path} and param_ids{seen[idx]} are both {idx}.")
        seen[idx] = path
    return out


def _group_of(state_dict: Mapping, idx: int) -> Mapping:
    for group in state_dict.get("param_groups", []):
        if idx in list(group.get("params", [])):
            return group
    raise ValueError(f"torch param index {idx} is in no param group of the state dict.")


def _check_hyperparams(group: Mapping, idx: int, hyperparams: Mapping | None, amsgrad: bool):
    if "amsgrad" in group and bool(group["amsgrad"]) != amsgrad:
        raise ValueError(
            f"param_groups: amsgrad={group['amsgrad']} for torch param {idx}, but the target "
            f"state {'has' if amsgrad else 'has no'} AMSGrad maximum (nu_max)."
        )
    for key, want in (hyperparams or {}).items():
        if key not in group:
            raise ValueError(f"param_groups: torch param {idx}'s group has no {key!r}.")
        got = group[key]
        same = (
            np.allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=1e-12)
            if key in ("lr", "betas", "eps", "weight_decay")
            else got == want
        )
        if not same:
            raise ValueError(
                f"param_groups: {key}={got!r} for torch param {idx}, but the target optimizer "
                f"has {key}={want!r}."
            )


def from_torch_state_dict(
    state_dict: Mapping,
    like: Any,
    param_ids: Any = None,
    *,
    transform: Transform | None = None,
    hyperparams: Mapping[str, Any] | None = None,
) -> Any:
    """An adam_jax state (shaped like ``like``) continuing a ``torch.optim.Adam``/``AdamW`` run.

    Args:
      state_dict: ``optimizer.state_dict()`` of ``torch.optim.Adam`` or ``AdamW``
        (torch tensors or NumPy arrays).
      like: the state to fill, e.g. ``adam_jax.compat.torch_adamw(...).init(params)``
        (any layout, ``shard_state`` included; or abstract, from
        :func:`adam_jax.restore_target`). It must hold one Adam state; AMSGrad
        in the torch groups must match ``like`` having ``nu_max``.
      param_ids: a tree with the params' structure giving each leaf's index in
        the torch optimizer's param list; default: the leaves in flatten order.
      transform: ``(path, array) -> array`` applied to each moment of a leaf,
        e.g. a transpose for ``Linear`` weights.
      hyperparams: the torch group values the target uses (``lr``, ``betas``,
        ``eps``, ``weight_decay``, ``amsgrad``, ``maximize``); each group that
        holds a param must have the same, else ``ValueError``.

    Returns:
      ``like`` with ``count = step`` (and every schedule count), and the
      moments, in ``like``'s layout, shardings and dtypes. A param with no torch
      state yet (never stepped) gets zero moments; all params must share one
      ``step``.

    Raises:
      ValueError: naming the leaf path and torch index on a missing entry, a
        shape that does not fit, differing steps, or a hyperparameter mismatch.
    """
    tree = jax.eval_shape(state_to_tree, like)
    target = _the_moment_state(tree)
    amsgrad = isinstance(target, AmsgradState)
    torch_state = state_dict.get("state", {})
    pairs = _ids_and_paths(target.mu, param_ids)
    mu_leaves, treedef = jax.tree.flatten(target.mu)
    values: dict[str, list] = {"mu": [], "nu": [], "nu_max": []}
    steps = set()
    for (path, idx), leaf in zip(pairs, mu_leaves, strict=True):
        _check_hyperparams(_group_of(state_dict, idx), idx, hyperparams, amsgrad)
        entry = torch_state.get(idx, torch_state.get(str(idx)))
        for torch_name, ours in _FIELDS:
            if ours == "nu_max" and not amsgrad:
                continue
            if entry is None:
                values[ours].append(np.zeros(leaf.shape, np.float32))
                continue
            if torch_name not in entry:
                raise ValueError(f"torch state of param {idx} ({path}) has no {torch_name!r}.")
            x = _to_numpy(entry[torch_name])
            if transform is not None:
                x = np.asarray(transform(path, x))
            if tuple(x.shape) != tuple(leaf.shape):
                raise ValueError(
                    f"Shape mismatch at {path} (torch param {idx}, {torch_name}): torch has "
                    f"{tuple(x.shape)}, the state has {tuple(leaf.shape)}. A torch Linear "
                    "weight is (out, in) and a Flax kernel (in, out): pass transform= to "
                    "transpose it."
                )
            values[ours].append(x)
        steps.add(0 if entry is None else round(float(_to_numpy(entry["step"]))))
    if len(steps) > 1:
        raise ValueError(f"The torch params have different steps {sorted(steps)}; expected one.")
    count = np.int32(steps.pop() if steps else 0)
    new_node = type(target)(
        count=count,
        **{k: treedef.unflatten(v) for k, v in values.items() if k != "nu_max" or amsgrad},
    )

    def replace(node):
        if is_moment_state(node):
            return new_node
        if hasattr(node, "_fields") and node._fields == ("count",):
            return type(node)(count=count)
        return node

    filled = jax.tree.map(
        replace,
        tree,
        is_leaf=lambda n: is_moment_state(n) or getattr(n, "_fields", ()) == ("count",),
    )
    filled = jax.tree.map(
        lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x, filled
    )
    return state_from_tree(filled, like)


def to_torch_state_dict(
    opt_state: Any,
    param_ids: Any = None,
    *,
    hyperparams: Mapping[str, Any],
    transform: Transform | None = None,
    as_numpy: bool = False,
) -> dict:
    """A state dict that ``torch.optim.Adam``/``AdamW.load_state_dict`` accepts.

    Args:
      opt_state: an adam_jax state with one Adam state (any layout).
      param_ids: a tree with the params' structure giving each leaf's torch
        param index; default: the leaves in flatten order.
      hyperparams: the group's ``lr``, ``betas``, ``eps``, ``weight_decay``
        (required: ``load_state_dict`` replaces the torch optimizer's own with
        them) and optionally ``maximize``, ``foreach``, ...
      transform: ``(path, array) -> array`` applied to each moment (e.g. a
        transpose back to torch's ``(out, in)``).
      as_numpy: write NumPy arrays instead of torch tensors (torch need not be
        installed).

    Returns:
      ``{"state": {...}, "param_groups": [one group with every index]}``.
    """
    missing = [k for k in ("lr", "betas", "eps", "weight_decay") if k not in hyperparams]
    if missing:
        raise ValueError(f"hyperparams needs {missing} (load_state_dict adopts the saved group).")
    node = _the_moment_state(state_to_tree(opt_state))
    amsgrad = isinstance(node, AmsgradState)
    if "amsgrad" in hyperparams and bool(hyperparams["amsgrad"]) != amsgrad:
        raise ValueError(
            f"hyperparams amsgrad={hyperparams['amsgrad']} but the state's is {amsgrad}."
        )
    pairs = _ids_and_paths(node.mu, param_ids)
    if as_numpy:

        def tensor(x):
            return np.array(x)

    else:
        import torch

        def tensor(x):
            return torch.from_numpy(np.array(x))

    step = float(np.asarray(node.count))
    fields = [f for f in _FIELDS if f[1] != "nu_max" or amsgrad]
    leaves = {ours: jax.tree.leaves(getattr(node, ours)) for _, ours in fields}
    state = {}
    for i, (path, idx) in enumerate(pairs):
        entry = {"step": tensor(np.float32(step))}
        for torch_name, ours in fields:
            x = np.asarray(jax.device_get(leaves[ours][i]), np.float32)
            if transform is not None:
                x = np.asarray(transform(path, x))
            entry[torch_name] = tensor(x)
        state[idx] = entry
    group = {**_TORCH_GROUP_DEFAULTS, **dict(hyperparams), "amsgrad": amsgrad}
    group["betas"] = tuple(group["betas"])
    group["params"] = sorted(idx for _, idx in pairs)
    return {"state": state, "param_groups": [group]}


__all__ = ["from_torch_state_dict", "to_torch_state_dict"]
