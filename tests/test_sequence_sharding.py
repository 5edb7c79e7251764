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
from tests.conftest import CONFIGS, random_ids
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


STEP_CFG = CONFIGS["gqa"].replace(attention="blockwise", attention_block=8)
# The MLP in blocks of 3 of each device's 16 tokens (model.mlp_tokens), the last overlapping.
TOKEN_BLOCKS = {"token_block_bytes": 4 * STEP_CFG.intermediate_size * 3}
# name: (mesh spec, batch, optimizer options, config changes): the split chosen (B < devices)
# or forced.
STEPS = {
    "fsdp=8": ("fsdp=8", 1, {"weight_decay": 0.01}, {}),
    "fsdp=8-clipped": ("fsdp=8", 1, {"clip_grad_norm": 0.5}, {}),
    "fsdp=8-token-blocks": ("fsdp=8", 1, {"weight_decay": 0.01}, TOKEN_BLOCKS),
    "data=2,fsdp=4,length=fsdp": ("data=2,fsdp=4,length=fsdp", 4, {"weight_decay": 0.01}, {}),
}
STEP_LEN = 128


def _step_batch(batch: int):
    """Packed rows: three documents in the first (positions restart), padding ending the last,
    the padding's labels ignored."""
    from lomo_jax.loss import IGNORE, Batch

    ids = random_ids(STEP_CFG, batch, STEP_LEN, seed=5)
    segs = np.ones_like(ids)
    segs[0, 20:], segs[0, 41:] = 2, 3
    segs[-1, STEP_LEN - 9 :] = 0
    positions = np.zeros_like(ids)
    for b in range(batch):
        starts = np.r_[0, np.flatnonzero(np.diff(segs[b])) + 1]
        for a, e in zip(starts, [*starts[1:], STEP_LEN]):
            positions[b, a:e] = np.arange(e - a)
    labels = np.where(segs > 0, ids, IGNORE).astype(np.int32)
    return Batch(ids, labels, segs, positions)


def _fused_steps(mesh: str | None, batch: int, options: dict, changes: dict) -> dict:
    """Two fused AdaLomo float32 steps of STEP_CFG with `changes` on `mesh` (None: one device):
    the losses, each step's updates and the optimizer state after them."""
    import lomo_jax
    from lomo_jax.sharding import Layout, put
    from lomo_jax.train_step import StepOptions, make_train_step

    layout = Layout.of(mesh) if mesh else Layout.of("fsdp=1", jax.devices()[:1])
    cfg = STEP_CFG.replace(**changes)
    step = make_train_step(StepOptions("adalomo", lr=0.01, **options), cfg, layout)
    params = lomo_jax.init_params(cfg, jax.random.key(1))
    state = layout.on_mesh(step.init(put(params, layout.params(params))))
    b = _step_batch(batch)

    def named(tree) -> dict:
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}

    out = {}
    for n in range(2):
        old = named(state.params)
        state, metrics = step.step(state, layout.put_batch(b))
        out[f"loss{n}"] = np.asarray(metrics["loss"])
        new = named(state.params)
        out |= {f"update{n}/{k}": x - old[k] for k, x in new.items()}
        out |= {f"weights{n}/{k}": x for k, x in new.items()}
    return out | {f"state/{k}": x for k, x in named(state.opt_state).items()}


def _split_steps(results: str) -> None:
    """(Runs on 8 devices.) Every STEPS case, the split it takes checked first."""
    from lomo_jax.sharding import Layout

    out = {}
    for name, (mesh, batch, options, changes) in STEPS.items():
        split = Layout.of(mesh).sequence_split((batch, STEP_LEN))
        assert split is not None and split.shards == (4 if "data" in mesh else 8), name
        steps = _fused_steps(mesh, batch, options, changes)
        out |= {f"{name}/{k}": v for k, v in steps.items()}
    np.savez(results, **out)


@pytest.fixture(scope="module")
def steps_on_8_devices(tmp_path_factory):
    results = str(tmp_path_factory.mktemp("sequence") / "steps.npz")
    script = f"from tests.test_sequence_sharding import _split_steps\n_split_steps({results!r})\n"
    subprocess.run(
        [sys.executable, "-c", script], env=_env(8), check=True, timeout=TIMEOUT, cwd=REPO
    )
    return dict(np.load(results))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(STEPS))
def test_fused_step_with_the_sequence_split_equals_one_device(steps_on_8_devices, case):
    """float32: the loss, the weights, every update and the AdaLomo state within 1e-5 (relative
    to the largest element of each tensor) of the unsplit step on one device. An update is read
    as new weights - old, which float32 resolves only to an ulp of the weight: its bound is at
    least 4 ulps of the largest weight (a norm weight near 1 moving by 0.01: 1.2e-7 an ulp).
    The one-device step runs its MLP whole, also where the split one runs it in blocks of
    tokens."""
    _, batch, options, _ = STEPS[case]
    one = _fused_steps(None, batch, options, {})
    for key, want in one.items():
        got = steps_on_8_devices[f"{case}/{key}"]
        bound = 1e-5 * float(np.max(np.abs(want)))
        if key.startswith("update"):
            weights = one[key.replace("update", "weights", 1)]
            bound = max(bound, 4 * np.finfo(np.float32).eps * float(np.max(np.abs(weights))))
        assert np.max(np.abs(got - want)) <= bound, (key, np.max(np.abs(got - want)), bound)
    moved = [k for k, v in one.items() if k.startswith("update1/") and np.any(v != 0)]
    assert len(moved) == sum(k.startswith("update1/") for k in one), "every tensor must move"


def test_the_split_is_chosen_when_the_batch_does_not_fill_the_mesh():
    from lomo_jax.sharding import Layout, MeshError, parse_length, parse_mesh

    assert parse_mesh("fsdp=8,length=fsdp", 8) == {"data": 1, "fsdp": 8}
    assert [parse_length(s) for s in ("fsdp=8", "length=fsdp", "data=2,length=none")] == [
        None,
        True,
        False,
    ]
    with pytest.raises(MeshError, match="length= takes"):
        parse_length("length=data")
    auto = Layout(AbstractMesh((1, 8), ("data", "fsdp")))
    assert auto.sequence_split((1, 1024)).spec() == jax.sharding.PartitionSpec(None, "fsdp")
    assert auto.sequence_split((4, 1024)) is not None  # 4 rows on 8 devices: split too
    assert auto.sequence_split((8, 1024)) is None  # the batch fills the mesh
    assert auto.sequence_split((1, 1000)) is None  # not 16 equal chunks: left whole
    forced = Layout(AbstractMesh((2, 4), ("data", "fsdp")), sequence=True)
    assert forced.sequence_split((8, 1024)).spec() == jax.sharding.PartitionSpec("data", "fsdp")
    with pytest.raises(MeshError, match="multiple of 8"):
        forced.sequence_split((8, 1020))
    never = Layout(AbstractMesh((1, 8), ("data", "fsdp")), sequence=False)
    assert never.sequence_split((1, 1024)) is None
    assert Layout(AbstractMesh((8, 1), ("data", "fsdp"))).sequence_split((1, 1024)) is None
