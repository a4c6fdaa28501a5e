"""Exact reproductions of PyTorch's and Keras's Adam conventions.

Thin constructors over the same transform as :func:`adam_jax.adam`; only the
scalar coefficients, the AMSGrad maximum and the weight-decay placement differ.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adam_jax._layout import Layout
from adam_jax._numerics import (
    Convention,
    SharedScalars,
    arrays_tree,
    compute_dtype,
    evaluate_schedule,
    safe_increment,
    to_scalar,
)
from adam_jax._sharding import zeros_count_like
from adam_jax._storage import MomentsArg
from adam_jax._torch_state import from_torch_state_dict, to_torch_state_dict
from adam_jax._transform import (
    ScalarOrSchedule,
    ScheduleState,
    add_decayed_weights,
    check_params_given,
    negate,
    scale_by_adam_with_convention,
    scale_by_learning_rate,
)
from adam_jax._validate import (
    check_in_unit_interval,
    check_non_negative,
    check_static_bool,
    match_leaves,
)

__all__ = [
    "from_torch_state_dict",
    "keras_adam",
    "to_torch_state_dict",
    "torch_adam",
    "torch_adamw",
]


def _shrink_factor(lr, weight_decay, count, dtype) -> jax.Array:
    """``1 - lr * weight_decay`` in ``dtype``, as torch forms it: in float64 when both
    are numbers."""
    lr_now = evaluate_schedule(lr, count) if callable(lr) else lr
    wd_now = evaluate_schedule(weight_decay, count) if callable(weight_decay) else weight_decay
    if isinstance(lr_now, (int, float)) and isinstance(wd_now, (int, float)):
        return to_scalar(1.0 - lr_now * wd_now, dtype)
    return jnp.ones((), dtype) - to_scalar(lr_now, dtype) * to_scalar(wd_now, dtype)


def _has_decay(weight_decay) -> bool:
    """Whether a decay stage is built: always for a schedule or an array (a value
    ``optax.inject_hyperparams`` may change, or a tracer), else when nonzero."""
    if callable(weight_decay) or isinstance(weight_decay, (jax.Array, np.ndarray)):
        return True
    return weight_decay != 0.0


def _torch_decoupled_decay(lr, weight_decay) -> optax.GradientTransformation:
    """Adds ``p * (1 - lr * wd) - p`` to the (already lr-scaled) updates.

    This is torch's ``param.mul_(1 - lr * weight_decay)`` written as an additive
    update: ``p * c`` is rounded in the param dtype exactly as torch rounds it,
    and ``p * c - p`` is then exact, so ``p + u`` lands where torch's two-stage
    step lands (to float32 rounding of the Adam step itself).
    """
    scheduled = callable(lr) or callable(weight_decay)
    check_non_negative("lr", lr, schedule_ok=True)
    check_non_negative("weight_decay", weight_decay, schedule_ok=True)

    def init_fn(params):
        return ScheduleState(count=zeros_count_like(params)) if scheduled else optax.EmptyState()

    def update_fn(updates, state, params=None):
        updates, params = arrays_tree(updates), arrays_tree(params)
        check_params_given(params, "weight_decay")
        match_leaves(updates, params, name="updates", reference_name="params")
        count = state.count if scheduled else None
        shrink = SharedScalars(lambda dtype: _shrink_factor(lr, weight_decay, count, dtype))

        def leaf(u, p):
            cdt = compute_dtype(u.dtype)
            shrunk = (p * shrink[p.dtype].astype(p.dtype)).astype(p.dtype)
            return (u.astype(cdt) + (shrunk - p).astype(cdt)).astype(u.dtype)

        if scheduled:
            state = ScheduleState(count=safe_increment(state.count))
        return jax.tree.map(leaf, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)


def _betas(betas) -> tuple:
    """``betas`` as a pair ``(b1, b2)``, or a clear ``TypeError``."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}.")
    return tuple(betas)


def torch_adam(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    layout: Layout = "per_leaf",
    moments: MomentsArg = None,
) -> optax.GradientTransformation:
    r"""``torch.optim.Adam``, with its names, defaults and semantics.

    .. math::
      g_t &\leftarrow \pm g_t + \lambda \theta_{t-1} \quad \text{(L2, unless decoupled)} \\
      \theta_t &= \theta_{t-1} - \frac{\alpha}{1-\beta_1^t}
        \frac{m_t}{\sqrt{v^{(max)}_t}/\sqrt{1-\beta_2^t} + \epsilon}

    * ``weight_decay`` is L2: :math:`\lambda\theta` is added to the gradient
      before the moments (unless ``decoupled_weight_decay=True``, which is AdamW).
    * ``amsgrad`` keeps the max of the *raw* :math:`v_t`, then bias-corrects it
      (optax takes the max of the corrected value).
    * ``maximize`` ascends: the gradient is negated first.
    * ``layout``, ``moments`` (adam_jax's own): see :func:`adam_jax.scale_by_adam`;
      ``moments="8bit"`` is the counterpart of ``bitsandbytes.optim.Adam8bit``.

    Example:
      >>> from adam_jax.compat import torch_adam
      >>> tx = torch_adam(lr=1e-3, weight_decay=1e-4)

    References:
      https://pytorch.org/docs/stable/generated/torch.optim.Adam.html
    """
    b1, b2 = _betas(betas)
    check_non_negative("lr", lr, schedule_ok=True)
    check_in_unit_interval("betas[0]", b1)
    check_in_unit_interval("betas[1]", b2)
    check_non_negative("eps", eps)
    check_static_bool("amsgrad", amsgrad)
    check_static_bool("maximize", maximize)
    check_static_bool("decoupled_weight_decay", decoupled_weight_decay)
    check_non_negative("weight_decay", weight_decay, schedule_ok=True)
    parts = []
    if maximize:
        parts.append(negate())
    has_decay = _has_decay(weight_decay)
    if has_decay and not decoupled_weight_decay:
        parts.append(add_decayed_weights(weight_decay))
    parts.append(
        scale_by_adam_with_convention(
            b1,
            b2,
            eps,
            amsgrad=amsgrad,
            convention=Convention.TORCH,
            layout=layout,
            moments=moments,
        )
    )
    parts.append(scale_by_learning_rate(lr))
    if has_decay and decoupled_weight_decay:
        parts.append(_torch_decoupled_decay(lr, weight_decay))
    return optax.chain(*parts)


def torch_adamw(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-2,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
    layout: Layout = "per_leaf",
    moments: MomentsArg = None,
) -> optax.GradientTransformation:
    r"""``torch.optim.AdamW``: decoupled decay :math:`\theta \leftarrow \theta(1-\alpha\lambda)`.

    ``layout`` and ``moments``: see :func:`adam_jax.scale_by_adam`.

    Example:
      >>> from adam_jax.compat import torch_adamw
      >>> tx = torch_adamw(lr=1e-3)

    References:
      Loshchilov & Hutter, arXiv:1711.05101;
      https://pytorch.org/docs/stable/generated/torch.optim.AdamW.html
    """
    return torch_adam(
        lr,
        betas,
        eps,
        weight_decay,
        amsgrad,
        maximize=maximize,
        decoupled_weight_decay=True,
        layout=layout,
        moments=moments,
    )


def keras_adam(
    learning_rate: ScalarOrSchedule = 0.001,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    amsgrad: bool = False,
    weight_decay: ScalarOrSchedule | None = None,
    *,
    layout: Layout = "per_leaf",
    moments: MomentsArg = None,
) -> optax.GradientTransformation:
    r"""``keras.optimizers.Adam`` (Keras 3): the "epsilon hat" form.

    .. math::
      \alpha_t = \alpha \sqrt{1-\beta_2^t}/(1-\beta_1^t), \quad
      \theta_t = \theta_{t-1} - \alpha_t \, m_t / (\sqrt{v_t} + \hat\epsilon)

    ``epsilon`` is added to :math:`\sqrt{v_t}` with no bias correction, so it
    weighs :math:`1/\sqrt{1-\beta_2^t}` times more than optax's ``eps`` early in
    training. AMSGrad keeps the max of the raw :math:`v_t`. ``weight_decay`` is
    decoupled and multiplied by the learning rate, as Keras does.
    ``layout`` and ``moments`` (adam_jax's own): see :func:`adam_jax.scale_by_adam`.

    Example:
      >>> from adam_jax.compat import keras_adam
      >>> tx = keras_adam(learning_rate=1e-3)

    References:
      Kingma & Ba, arXiv:1412.6980, section 2 (the efficient form);
      https://keras.io/api/optimizers/adam/
    """
    check_non_negative("learning_rate", learning_rate, schedule_ok=True)
    check_in_unit_interval("beta_1", beta_1)
    check_in_unit_interval("beta_2", beta_2)
    check_non_negative("epsilon", epsilon)
    check_static_bool("amsgrad", amsgrad)
    if weight_decay is not None:
        check_non_negative("weight_decay", weight_decay, schedule_ok=True)
    parts = [
        scale_by_adam_with_convention(
            beta_1,
            beta_2,
            epsilon,
            amsgrad=amsgrad,
            convention=Convention.KERAS,
            layout=layout,
            moments=moments,
        )
    ]
    # None (Keras's default) is no decay stage; any number, array or schedule
    # builds one, so that an injected weight_decay keeps the state's structure.
    if weight_decay is not None:
        parts.append(add_decayed_weights(weight_decay))
    parts.append(scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
