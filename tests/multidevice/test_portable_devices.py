"""Portable state across device counts and placements (issue 14), on 8 virtual CPU devices.

* A checkpoint of the default ``adam_jax.adamw`` state written by a 1-device process
  restores on 8 devices (target from ``tx.init``) and continues the run.
* A forced ``grouped`` + ``shard_state`` state on 4 devices, saved layout-free,
  restores into ``grouped`` + ``shard_state`` on 8.
* ``init`` on mesh-placed params puts every state leaf, the count included, on the
  params' devices, and a restored (committed) state feeds the jitted step.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adam_jax
from tests.distributed_model import make_batches, make_params, make_step, max_abs_diff, train

ROOT = Path(__file__).resolve().parents[2]
# The data-parallel reduction sums the batch in another order on a mesh; Adam
# turns that float32 rounding into a few ulps of lr per step.
TOLERANCE = 1e-5


def _mesh(n: int, axis_type=AxisType.Explicit):
    return jax.make_mesh((n,), ("data",), axis_types=(axis_type,), devices=jax.devices()[:n])


def _replicated(tree, mesh):
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), tree)


def _batch_placer(mesh):
    sharding = NamedSharding(mesh, P("data"))
    return lambda batch: tuple(jax.device_put(b, sharding) for b in batch)


def _continue(tx, params, state, batches, place=lambda b: b):
    step = make_step(tx)
    for batch in batches:
        params, state, _ = step(params, state, *place(batch))
    return params, state


WRITER = textwrap.dedent(
    """
    import sys
    import jax, numpy as np, orbax.checkpoint as ocp
    import adam_jax
    from tests.distributed_model import make_batches, make_params, train
    assert jax.device_count() == 1, jax.device_count()
    tx = adam_jax.adamw(1e-2, weight_decay=0.1)
    params, state, _ = train(tx, make_params(), make_batches(3))
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(sys.argv[1], {"params": params, "opt_state": state})
    ckpt.wait_until_finished()
    """
)


def test_one_device_checkpoint_restores_on_eight_devices(tmp_path):
    """Issue 14: "tree structures do not match" when layout='auto' grouped on 1 device."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    path = tmp_path / "ckpt"
    proc = subprocess.run(
        [sys.executable, "-c", WRITER, str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    tx = adam_jax.adamw(1e-2, weight_decay=0.1)
    mesh = _mesh(8)
    with jax.set_mesh(mesh):
        params8 = _replicated(make_params(), mesh)
        target = {"params": params8, "opt_state": adam_jax.restore_target(tx, params8)}
        target["params"] = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params8
        )
        restored = ocp.StandardCheckpointer().restore(path, target)
        for leaf in jax.tree.leaves(restored["opt_state"]):
            assert leaf.sharding.device_set == set(jax.devices())
        p8, _ = _continue(
            tx, restored["params"], restored["opt_state"], make_batches(5)[3:], _batch_placer(mesh)
        )
    want, _, _ = train(tx, make_params(), make_batches(5))
    assert max_abs_diff(p8, want) < TOLERANCE


def test_grouped_shard_state_moves_from_four_to_eight_devices(tmp_path):
    batches = make_batches(6)

    def make_tx(mesh):
        return adam_jax.shard_state(adam_jax.adamw(1e-2, layout="grouped"), mesh, "data")

    mesh4, mesh8 = _mesh(4), _mesh(8)
    with jax.set_mesh(mesh4):
        tx4 = make_tx(mesh4)
        params4 = _replicated(make_params(), mesh4)
        p4, s4 = _continue(tx4, params4, tx4.init(params4), batches[:3], _batch_placer(mesh4))
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(tmp_path / "state", {"params": p4, "opt_state": adam_jax.state_to_tree(s4)})
        ckpt.wait_until_finished()
        want, _ = _continue(tx4, p4, s4, batches[3:], _batch_placer(mesh4))
    with jax.set_mesh(mesh8):
        tx8 = make_tx(mesh8)
        params8 = _replicated(make_params(), mesh8)
        target = {
            "params": jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params8
            ),
            "opt_state": adam_jax.restore_target(tx8, params8, layout_free=True),
        }
        restored = ocp.StandardCheckpointer().restore(tmp_path / "state", target)
        state8 = adam_jax.state_from_tree(
            restored["opt_state"], like=adam_jax.restore_target(tx8, params8)
        )
        assert isinstance(state8, adam_jax.ShardedState)
        assert isinstance(state8.inner[0].mu, adam_jax.GroupedMoments)
        got, _ = _continue(tx8, restored["params"], state8, batches[3:], _batch_placer(mesh8))
    assert max_abs_diff(got, want) < TOLERANCE


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_init_places_every_state_leaf_with_the_params(axis_type, amsgrad, tmp_path):
    mesh = _mesh(8, axis_type)
    tx = adam_jax.adamw(1e-2, amsgrad=amsgrad)
    with jax.set_mesh(mesh):
        params = _replicated(make_params(), mesh)
        state = tx.init(params)
        for leaf in jax.tree.leaves(state):
            assert leaf.sharding.device_set == set(jax.devices()), leaf.sharding
        # A restored (committed) state feeds the jitted step directly.
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(tmp_path / "s", state)
        ckpt.wait_until_finished()
        restored = ckpt.restore(tmp_path / "s", adam_jax.restore_target(tx, params))
        p, s = _continue(tx, params, restored, make_batches(2), _batch_placer(mesh))
    assert int(np.asarray(adam_jax.state_to_tree(s)[0].count)) == 2
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(p))
