"""The README's Python snippets run as written (issue 14: "define MyModel and loss_fn")."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def python_blocks_under(heading: str) -> list[str]:
    section = README.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.parametrize(
    "heading", ["Quickstart with optax", "Quickstart with Flax NNX", "Multiple devices and hosts"]
)
def test_readme_snippet_runs(heading):
    blocks = python_blocks_under(heading)
    assert len(blocks) == 1, heading
    code = blocks[0]
    # One process, one host: the cluster call is the one line the README says to omit.
    code = code.replace("jax.distributed.initialize()", "pass")
    namespace: dict = {}
    exec(compile(code, f"README: {heading}", "exec"), namespace)
    if heading == "Multiple devices and hosts":
        import jax.numpy as jnp

        with namespace["jax"].set_mesh(namespace["mesh"]):
            batch = (jnp.ones((8, 16)), jnp.ones((8, 4)))
            params, _ = namespace["step"](namespace["params"], namespace["opt_state"], batch)
        assert params["w"].shape == (16, 4)
