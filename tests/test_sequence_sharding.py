"""One sequence split over 8 devices (context parallelism): the split order balances the causal
blocks, split attention equals dense attention on the whole sequence (values and gradients), and
the fused step with the length split over fsdp=8 equals the step on one device. The 8-device runs
happen in one subprocess (the device count is fixed when JAX starts)."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from lomo_jax import attention
from lomo_jax.attention import Mask
from lomo_jax.sequence_sharding import SequenceSplit
from tests.test_scale_out import REPO, TIMEOUT, _env

# name: (batch, length, heads, kv heads, packed segments, window, split the batch over data=2)
CASES = {
    "gqa-causal": (1, 128, 4, 2, False, None, False),
    "mqa-window": (1, 128, 4, 1, False, 20, False),
    "packed-padded": (2, 128, 4, 2, True, None, False),
    "batch-over-data": (2, 64, 4, 2, True, 24, True),
}
BLOCK = 8


def _inputs(case, seed=0):
    B, T, H, KVH, packed, _, _ = CASES[case]
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, H, 8)).astype(np.float32)
    k, v = (rng.normal(size=(B, T, KVH, 8)).astype(np.float32) for _ in "kv")
    cotangent = rng.normal(size=q.shape).astype(np.float32)
    segs = None
    if packed:  # row 0: three documents; the last row ends in padding
        segs = np.ones((B, T), np.int32)
        segs[0, T // 3 :], segs[0, T // 2 :] = 2, 3
        segs[-1, T - 11 :] = 0
    return q, k, v, cotangent, segs


def _split(mesh, case) -> SequenceSplit:
    return SequenceSplit(mesh, "data" if CASES[case][-1] else None)


def _split_attention(results: str) -> None:
    """(Runs on 8 devices.) Each case's split attention and its gradients, in sequence order."""
    np.savez(results, **{k: v for case in CASES for k, v in _split_case(case).items()})


def _split_case(case: str) -> dict:
    from jax.sharding import NamedSharding

    from lomo_jax.sharding import make_mesh

    window, over_data = CASES[case][5:]
    mesh = make_mesh("data=2,fsdp=4" if over_data else "fsdp=8")
    split = _split(mesh, case)
    q, k, v, cotangent, segs = _inputs(case)
    order = split.token_order(q.shape[1])

    def put(x):
        return None if x is None else jax.device_put(x[:, order], NamedSharding(mesh, split.spec()))

    def loss(q, k, v, segs):
        o = attention.attend(q, k, v, Mask(segs, split=split), "blockwise", window, BLOCK, BLOCK)
        return jnp.sum(o * cotangent[:, order])

    value, grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(put(q), put(k), put(v), put(segs))
    back = np.argsort(order)
    return {f"{case}/loss": np.asarray(value)} | {
        f"{case}/d{name}": np.asarray(g)[:, back] for name, g in zip("qkv", grads)
    }


@pytest.fixture(scope="module")
def on_8_devices(tmp_path_factory):
    results = str(tmp_path_factory.mktemp("sequence") / "split.npz")
    script = (
        f"from tests.test_sequence_sharding import _split_attention\n"
        f"_split_attention({results!r})\n"
    )
    subprocess.run(
        [sys.executable, "-c", script], env=_env(8), check=True, timeout=TIMEOUT, cwd=REPO
    )
    return dict(np.load(results))


@pytest.mark.parametrize("case", list(CASES))
def test_split_attention_equals_dense_on_the_whole_sequence(on_8_devices, case):
    window = CASES[case][5]
    q, k, v, cotangent, segs = _inputs(case)

    def loss(q, k, v):
        return jnp.sum(attention.dense(q, k, v, Mask(segs), window) * cotangent)

    value, grads = jax.value_and_grad(loss, (0, 1, 2))(q, k, v)
    np.testing.assert_allclose(on_8_devices[f"{case}/loss"], value, rtol=1e-5)
    for name, g in zip("qkv", grads):
        np.testing.assert_allclose(on_8_devices[f"{case}/d{name}"], g, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("shards", [2, 4, 8])
def test_split_order_gives_every_device_the_same_causal_blocks(shards):
    """Device d holds chunks d and 2n - 1 - d; the (query block, key block) pairs the causal mask
    leaves, counted with the kernel's own ranges, are the same on every device and sum to one
    device's."""
    split = SequenceSplit(AbstractMesh((1, shards), ("data", "fsdp")))
    T, bq = 64 * shards, 16
    order = split.token_order(T)
    assert sorted(order) == list(range(T))
    chunk = T // (2 * shards)
    for d in range(shards):
        mine = order[2 * d * chunk : (2 * d + 2) * chunk] // chunk
        assert set(mine) == {d, 2 * shards - 1 - d}

    def pairs(offset, queries):
        g = attention._Blocks(None, jnp.int32(offset), None, bq, bq)
        return sum(int(np.subtract(*g.key_range(i, T // bq)[::-1])) for i in range(queries // bq))

    per_device = [
        pairs(d * chunk, chunk) + pairs((2 * shards - 1 - d) * chunk, chunk) for d in range(shards)
    ]
    assert len(set(per_device)) == 1
    assert sum(per_device) == pairs(0, T)
