"""adam_jax: the Adam optimizer family for JAX, as optax GradientTransformations.

Exact to Kingma & Ba (arXiv:1412.6980), optax, PyTorch and Keras; float32
scalar math whatever the param dtype; clear errors on bad input.
"""

from adam_jax import compat
from adam_jax._alias import adam, adamw, amsgrad, nadam, nadamw
from adam_jax._layout import GroupedMoments, moments_as_tree
from adam_jax._packing import ParamPacker
from adam_jax._portable import (
    from_optax_state,
    restore_target,
    state_from_tree,
    state_to_tree,
    to_optax_state,
)
from adam_jax._precision import kahan_summation, stochastic_rounding
from adam_jax._sharding import ShardedState, shard_state, state_shardings
from adam_jax._state import AdamState, AmsgradState
from adam_jax._storage import QuantizedArray, QuantizedMoments
from adam_jax._transform import (
    add_decayed_weights,
    scale_by_adam,
    scale_by_learning_rate,
)

__version__ = "0.1.0"

__all__ = [
    "AdamState",
    "AmsgradState",
    "GroupedMoments",
    "ParamPacker",
    "QuantizedArray",
    "QuantizedMoments",
    "ShardedState",
    "adam",
    "adamw",
    "add_decayed_weights",
    "amsgrad",
    "compat",
    "from_optax_state",
    "kahan_summation",
    "moments_as_tree",
    "nadam",
    "nadamw",
    "restore_target",
    "scale_by_adam",
    "scale_by_learning_rate",
    "shard_state",
    "state_from_tree",
    "state_shardings",
    "state_to_tree",
    "stochastic_rounding",
    "to_optax_state",
]
