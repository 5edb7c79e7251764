"""Parameters and AdaLomo state round-trip through the orbax checkpoint exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lomo_jax
from lomo_jax.checkpoint import read_params, write_params
from lomo_jax.engine import init_train_state, make_fused_step
from lomo_jax.loss import Batch
from lomo_jax.optim import AdaLomo
from lomo_jax.schedule import Schedule
from tests.conftest import CONFIGS, random_ids


@pytest.mark.slow
def test_adalomo_state_and_bfloat16_params_round_trip(tmp_path):
    cfg = CONFIGS["gqa"]
    rule = AdaLomo()
    state = init_train_state(rule, lomo_jax.init_params(cfg, jax.random.key(0), jnp.bfloat16))
    ids = jnp.asarray(random_ids(cfg, 2, 8))
    state, _ = make_fused_step(cfg, rule, Schedule(1e-3))(state, Batch(ids, ids))
    for name, tree in (("params", state.params), ("opt", state.opt_state)):
        write_params(tmp_path / name, tree)
        back = read_params(tmp_path / name)
        assert jax.tree.structure(back) == jax.tree.structure(tree)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
            assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert float(jnp.abs(state.opt_state["layers"]["mlp"]["up_proj"]["kernel"]["row"]).sum()) > 0


def test_large_stacked_leaves_are_written_in_layer_pieces(tmp_path):
    params = lomo_jax.init_params(CONFIGS["gqa"], jax.random.key(3), jnp.bfloat16)
    write_params(tmp_path / "p", params, piece_bytes=10_000)  # every stacked matrix is larger
    assert (tmp_path / "p" / "layers.mlp.up_proj.kernel@1").is_dir()
    back = read_params(tmp_path / "p")
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_a_step_updates_restored_arrays_in_place(tmp_path):
    # On CPU an array orbax restores can share tensorstore's numpy buffer, which XLA cannot
    # donate: the step would write such a leaf to a new buffer and hold both copies.
    cfg = CONFIGS["gqa"]
    rule = AdaLomo()
    step = make_fused_step(cfg, rule, Schedule(1e-3))
    ids = jnp.asarray(random_ids(cfg, 2, 8))
    state = init_train_state(rule, lomo_jax.init_params(cfg, jax.random.key(0), jnp.bfloat16))
    state, _ = step(state, Batch(ids, ids))
    for name, tree in (("params", state.params), ("opt", state.opt_state)):
        write_params(tmp_path / name, tree)
    restored = state._replace(
        params=read_params(tmp_path / "params"), opt_state=read_params(tmp_path / "opt")
    )
    before = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(restored[:2])]
    after, _ = step(restored, Batch(ids, ids))
    moved = [
        jax.tree_util.keystr(path)
        for (path, x), p in zip(jax.tree_util.tree_leaves_with_path(after[:2]), before)
        if x.unsafe_buffer_pointer() != p
    ]
    assert moved == []
