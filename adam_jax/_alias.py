"""Optimizers: chains of :func:`scale_by_adam` with weight decay and a learning rate.

Positional order follows optax, so ``import adam_jax as optim`` can replace
``optax.adam(...)``-style calls.
"""

from collections.abc import Callable
from typing import Any

import optax
from jax.typing import ArrayLike, DTypeLike

from adam_jax._layout import Layout
from adam_jax._storage import MomentsArg
from adam_jax._transform import (
    ScalarOrSchedule,
    add_decayed_weights,
    scale_by_adam_with_convention,
    scale_by_learning_rate,
)
from adam_jax._validate import check_non_negative

MaskOrFn = Any | Callable[[optax.Params], Any] | None


def _adam_chain(
    learning_rate, weight_decay, mask, *, decays: bool, **adam_kwargs
) -> optax.GradientTransformation:
    """``scale_by_adam``, then (if ``decays``) ``add_decayed_weights``, then ``-lr``."""
    check_non_negative("learning_rate", learning_rate, schedule_ok=True)
    if decays:
        check_non_negative("weight_decay", weight_decay, schedule_ok=True)
    parts = [scale_by_adam_with_convention(**adam_kwargs)]
    if decays:
        parts.append(add_decayed_weights(weight_decay, mask))
    parts.append(scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def adam(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: DTypeLike | None = None,
    *,
    nesterov: bool = False,
    amsgrad: bool = False,
    nu_dtype: DTypeLike | None = None,
    layout: Layout = "per_leaf",
    moments: MomentsArg = None,
) -> optax.GradientTransformation:
    r"""Adam (Kingma & Ba, 2014), with optax's semantics.

    .. math::
      m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
      v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
      \theta_t &= \theta_{t-1} - \alpha_t \,
        \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t) + \epsilon_{root}} + \epsilon}

    .. warning::
      ``eps`` sits outside the square root and is added to the bias-corrected
      :math:`\sqrt{\hat v}`, as in the paper, optax and PyTorch. Keras/TF add it
      to :math:`\sqrt{v}` before bias correction ("epsilon hat"); use
      :func:`adam_jax.compat.keras_adam` for that.

    Args:
      learning_rate: a float or an optax schedule :math:`\alpha_t`.
      b1, b2, eps, eps_root, mu_dtype, nesterov, amsgrad, nu_dtype, layout, moments: see
        :func:`adam_jax.scale_by_adam` (``moments="8bit"`` or ``"4bit"`` quantizes the
        state to about 2 or 1 bytes per param).

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, adam_jax
      >>> params = {"w": jnp.ones(3)}
      >>> tx = adam_jax.adam(1e-3)
      >>> state = tx.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Kingma & Ba, Adam: A Method for Stochastic Optimization, arXiv:1412.6980.
    """
    return _adam_chain(
        learning_rate,
        None,
        None,
        decays=False,
        b1=b1,
        b2=b2,
        eps=eps,
        eps_root=eps_root,
        mu_dtype=mu_dtype,
        nesterov=nesterov,
        amsgrad=amsgrad,
        nu_dtype=nu_dtype,
        layout=layout,
        moments=moments,
    )


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: DTypeLike | None = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: MaskOrFn = None,
    *,
    nesterov: bool = False,
    amsgrad: bool = False,
    nu_dtype: DTypeLike | None = None,
    layout: Layout = "per_leaf",
    moments: MomentsArg = None,
) -> optax.GradientTransformation:
    r"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, 2019).

    .. math::
      \theta_t = \theta_{t-1} - \alpha_t \left(
        \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}
        + \lambda_t \theta_{t-1} \right)

    The decay is multiplied by the learning rate, as in optax and PyTorch.

    Args:
      learning_rate: a float or an optax schedule.
      b1, b2, eps, eps_root, mu_dtype: see :func:`adam_jax.scale_by_adam`.
      weight_decay: :math:`\lambda`, a float or an optax schedule.
      mask: a pytree of bools (or a callable params -> such a tree) selecting
        which leaves decay; typically biases and norms are excluded.
      nesterov, amsgrad, nu_dtype, layout, moments: see :func:`adam_jax.scale_by_adam`.

    Example:
      >>> import adam_jax
      >>> tx = adam_jax.adamw(1e-3, weight_decay=0.05)

    References:
      Loshchilov & Hutter, Decoupled Weight Decay Regularization, arXiv:1711.05101.
    """
    return _adam_chain(
        learning_rate,
        weight_decay,
        mask,
        decays=True,
        b1=b1,
        b2=b2,
        eps=eps,
        eps_root=eps_root,
        mu_dtype=mu_dtype,
        nesterov=nesterov,
        amsgrad=amsgrad,
        nu_dtype=nu_dtype,
        layout=layout,
        moments=moments,
    )


def nadam(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: DTypeLike | None = None,
    *,
    nesterov: bool = True,
    amsgrad: bool = False,
    nu_dtype: DTypeLike | None = None,
    layout: Layout = "per_leaf",
    moments: MomentsArg = None,
) -> optax.GradientTransformation:
    r"""NAdam: Adam with Nesterov momentum (Dozat, 2016), in optax's form.

    .. math::
      \hat m_t = \frac{\beta_1 m_t}{1-\beta_1^{t+1}} + \frac{(1-\beta_1) g_t}{1-\beta_1^t}

    Same as :func:`adam` with ``nesterov=True``.

    Example:
      >>> import adam_jax
      >>> tx = adam_jax.nadam(1e-3)

    References:
      Dozat, Incorporating Nesterov Momentum into Adam, ICLR workshop 2016.
    """
    return adam(
        learning_rate,
        b1,
        b2,
        eps,
        eps_root,
        mu_dtype,
        nesterov=nesterov,
        amsgrad=amsgrad,
        nu_dtype=nu_dtype,
        layout=layout,
        moments=moments,
    )


def nadamw(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: DTypeLike | None = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: MaskOrFn = None,
    *,
    nesterov: bool = True,
    amsgrad: bool = False,
    nu_dtype: DTypeLike | None = None,
    layout: Layout = "per_leaf",
    moments: MomentsArg = None,
) -> optax.GradientTransformation:
    r"""NAdamW: :func:`adamw` with Nesterov momentum (Dozat 2016; Loshchilov & Hutter 2019).

    Example:
      >>> import adam_jax
      >>> tx = adam_jax.nadamw(1e-3, weight_decay=0.01)

    References:
      Dozat, Incorporating Nesterov Momentum into Adam, 2016.
      Loshchilov & Hutter, arXiv:1711.05101.
    """
    return adamw(
        learning_rate,
        b1,
        b2,
        eps,
        eps_root,
        mu_dtype,
        weight_decay,
        mask,
        nesterov=nesterov,
        amsgrad=amsgrad,
        nu_dtype=nu_dtype,
        layout=layout,
        moments=moments,
    )


def amsgrad(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: DTypeLike | None = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    *,
    nu_dtype: DTypeLike | None = None,
    layout: Layout = "per_leaf",
    moments: MomentsArg = None,
) -> optax.GradientTransformation:
    r"""AMSGrad (Reddi et al., 2018) with optax's semantics.

    .. math::
      \hat v^{max}_t = \max(\hat v^{max}_{t-1}, \hat v_t), \quad
      u_t = \hat m_t / (\sqrt{\hat v^{max}_t + \epsilon_{root}} + \epsilon)

    The maximum is taken of the bias-corrected :math:`\hat v_t` (optax).
    PyTorch takes it of the raw :math:`v_t`; see
    :func:`adam_jax.compat.torch_adam`. ``bias_correction_mu=False`` and
    ``bias_correction_nu=False`` give the paper's uncorrected form.

    Example:
      >>> import adam_jax
      >>> tx = adam_jax.amsgrad(1e-3)

    References:
      Reddi, Kale & Kumar, On the Convergence of Adam and Beyond, ICLR 2018.
    """
    return optax.chain(
        scale_by_adam_with_convention(
            b1,
            b2,
            eps,
            eps_root,
            mu_dtype,
            amsgrad=True,
            nu_dtype=nu_dtype,
            layout=layout,
            moments=moments,
            bias_correction_mu=bias_correction_mu,
            bias_correction_nu=bias_correction_nu,
        ),
        scale_by_learning_rate(learning_rate),
    )
