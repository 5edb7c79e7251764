"""The fused step against independent references: jax.grad + optax, and the paper authors'
PyTorch `lomo-optim` on transformers' LlamaForCausalLM."""

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers

import lomo_jax
from convert.layout import hf_tensors
from lomo_jax.baseline import unfused_step
from lomo_jax.engine import init_train_state, make_fused_step
from lomo_jax.loss import Batch, loss_fn
from lomo_jax.loss_scale import DynamicLossScale, ScaleState
from lomo_jax.optim import AdaLomo, Lomo
from lomo_jax.schedule import Schedule
from tests.conftest import CONFIGS, make_hf_dir, needs_torch, random_ids

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from torch_reference import make_optimizer  # noqa: E402

CFG = CONFIGS["gqa"]


def batches(cfg, n, batch=2, length=24, seed=0):
    return [random_ids(cfg, batch, length, seed + k) for k in range(n)]


def run_fused(cfg, params, rule, ids_list, lr=1e-2, **kw):
    step = make_fused_step(cfg, rule, Schedule(lr), **kw)
    state = init_train_state(
        rule,
        jax.tree.map(jnp.array, params),
        **({"float16": True, "loss_scale": kw["loss_scale"]} if "loss_scale" in kw else {}),
    )
    metrics = []
    for ids in ids_list:
        ids = jnp.asarray(ids)
        state, m = step(state, Batch(ids, ids))
        metrics.append(m)
    return state, metrics


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def assert_trees_close(ours, ref, rtol):
    for path, a in jax.tree_util.tree_leaves_with_path(ours):
        b = ref
        for k in path:
            b = b[k.key]
        assert rel_err(a, b) <= rtol, (jax.tree_util.keystr(path), rel_err(a, b))


def in_token_blocks(cfg, tokens: int, batch: int = 2):
    """`cfg` whose MLP runs at most `tokens` tokens of `batch` rows at a time (model.mlp_tokens;
    the batches here, 24 tokens in blocks of 5, end in a block that overlaps the one before)."""
    return cfg.replace(token_block_bytes=4 * batch * cfg.intermediate_size * tokens)


@pytest.mark.parametrize(
    ("clip", "cfg"),
    [
        pytest.param(None, CONFIGS["gqa"], id="no-clip-gqa", marks=pytest.mark.slow),
        pytest.param(0.5, CONFIGS["gqa"], id="norm-clip-gqa"),
        pytest.param(0.5, in_token_blocks(CONFIGS["gqa"], 5), id="norm-clip-gqa-token-blocks"),
        pytest.param(None, CONFIGS["mha-tied"], id="no-clip-mha-tied", marks=pytest.mark.slow),
        pytest.param(0.5, CONFIGS["mha-tied"], id="norm-clip-mha-tied", marks=pytest.mark.slow),
    ],
)
def test_fused_lomo_equals_jax_grad_sgd(clip, cfg):
    params = lomo_jax.init_params(cfg, jax.random.key(0))
    ids_list = batches(cfg, 3)
    state, _ = run_fused(cfg, params, Lomo(clip_grad_norm=clip), ids_list, lr=0.05)

    tx = optax.sgd(0.05)
    ref, opt_state = params, tx.init(params)
    for ids in ids_list:
        batch = Batch(jnp.asarray(ids), jnp.asarray(ids))
        grads = jax.grad(loss_fn, argnums=1)(cfg, ref, batch)
        if clip is not None:  # the paper's coefficient: min(1, max_norm / (norm + 1e-6))
            coef = jnp.minimum(1.0, clip / (optax.global_norm(grads) + 1e-6))
            grads = jax.tree.map(lambda g, c=coef: g * c, grads)
        updates, opt_state = tx.update(grads, opt_state, ref)
        ref = optax.apply_updates(ref, updates)
    assert_trees_close(state.params, ref, rtol=1e-6)


@pytest.mark.parametrize(
    "cfg",
    [CONFIGS["mha-tied"], in_token_blocks(CONFIGS["mha-tied"], 5)],
    ids=["mha-tied", "mha-tied-token-blocks"],
)
def test_fused_step_equals_the_same_rule_driven_by_jax_grad(cfg):
    """optim.apply_updates on a full jax.grad tree (vmapped over the layer axis) is the fused
    step's reference for AdaLomo with weight decay and norm clipping; also with the MLP in
    blocks of tokens (its gradients summed over the blocks)."""
    params = lomo_jax.init_params(cfg, jax.random.key(5))
    rule = AdaLomo(weight_decay=0.1, clip_grad_norm=0.5)
    ids_list = batches(cfg, 3, seed=30)
    fused, _ = run_fused(cfg, params, rule, ids_list, lr=1e-2)
    step = jax.jit(functools.partial(unfused_step, cfg, rule, Schedule(1e-2)))
    state = init_train_state(rule, params)
    for ids in ids_list:
        state, _ = step(state, Batch(jnp.asarray(ids), jnp.asarray(ids)))
    assert_trees_close(fused.params, state.params, rtol=1e-5)
    assert_trees_close(fused.opt_state, state.opt_state, rtol=1e-5)


def differing(a, b) -> float:
    """The share of elements that differ between two trees."""
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    return sum(int(np.sum(np.asarray(x) != np.asarray(y))) for x, y in pairs) / sum(
        x.size for x, _ in pairs
    )


@pytest.mark.slow
def test_fused_equals_unfused_with_stochastic_rounding():
    """bfloat16: the fused step and apply_updates draw the same bits for each tensor and layer.
    Their bfloat16 gradients differ in the last bits (as they do rounded to nearest), which
    moves a few AdaLomo roundings: 4% of the weights after a step. With other bits (another
    seed) 33% differ."""
    cfg = CONFIGS["mha-tied"]
    params = jax.tree.map(
        lambda x: x.astype(jnp.bfloat16), lomo_jax.init_params(cfg, jax.random.key(5))
    )
    rule = AdaLomo(weight_decay=0.1, clip_grad_norm=0.5)
    ids = jnp.asarray(batches(cfg, 1, seed=30)[0])
    fused, _ = run_fused(cfg, params, rule, [ids], lr=1e-2, seed=7)
    step = jax.jit(functools.partial(unfused_step, cfg, rule, Schedule(1e-2), seed=7))
    unfused, _ = step(init_train_state(rule, params), Batch(ids, ids))
    assert jax.tree.leaves(fused.params)[0].dtype == jnp.bfloat16
    assert differing(fused.params, params) > 0.8  # AdaLomo moves nearly every weight
    assert differing(fused.params, unfused.params) < 0.1


def _unstack(params):
    L = jax.tree.leaves(params["layers"])[0].shape[0]
    out = {k: v for k, v in params.items() if k != "layers"}
    out["layers"] = [jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(L)]
    return out


def _restack(p):
    return {
        **{k: v for k, v in p.items() if k != "layers"},
        "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *p["layers"]),
    }


@pytest.mark.parametrize(
    "block_bytes",
    [
        pytest.param(None, id="whole", marks=pytest.mark.slow),
        pytest.param(4 * 48 * 20, id="ragged-blocks"),
    ],
)
def test_fused_adalomo_equals_optax_adafactor(block_bytes):
    """AdaLomo (arXiv 2310.10195) without weight decay is this Adafactor configuration. With
    small blocks, the head's vocabulary pieces, AdaLomo's column blocks and the embedding
    gradient's blocks all loop, the last block of each overlapping the one before."""
    cfg, rule = CONFIGS["mha-tied"], AdaLomo()
    if block_bytes:
        cfg, rule = cfg.replace(block_bytes=block_bytes), AdaLomo(block_bytes=block_bytes)
    params = lomo_jax.init_params(cfg, jax.random.key(1))
    ids_list = batches(cfg, 4, seed=10)
    state, _ = run_fused(cfg, params, rule, ids_list, lr=1e-2)

    tx = optax.adafactor(
        learning_rate=1e-2,
        min_dim_size_to_factor=1,
        decay_rate=0.8,
        decay_offset=0,
        multiply_by_parameter_scale=True,
        clipping_threshold=1.0,
        momentum=None,
        eps=1e-30,
    )
    ref = _unstack(params)  # optax must see each layer's matrices on their own
    opt_state = tx.init(ref)
    for ids in ids_list:
        batch = Batch(jnp.asarray(ids), jnp.asarray(ids))
        grads = jax.grad(lambda p, b: loss_fn(cfg, _restack(p), b))(ref, batch)
        updates, opt_state = tx.update(grads, opt_state, ref)
        ref = optax.apply_updates(ref, updates)
    assert_trees_close(state.params, _restack(ref), rtol=1e-5)


# ---- against the paper authors' PyTorch implementation ---------------------------------------
def run_reference(hf_dir, which, ids_list, lr, kw):
    torch = needs_torch()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.train()
    opt = make_optimizer(model, which, lr, **kw)
    clip_norm = kw["clip_grad_norm"]
    for ids in ids_list:
        t = torch.from_numpy(ids).long()
        loss = model(input_ids=t, labels=t).loss
        if clip_norm is not None:
            opt.grad_norm(loss)
        opt.fused_backward(loss, lr)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("which", ["lomo", "adalomo"])
def test_matches_lomo_optim_reference(tmp_path, which):
    needs_torch()
    cfg = CONFIGS["mha-tied"] if which == "lomo" else CFG
    hf_dir = make_hf_dir(tmp_path / "hf", cfg, seed=3)
    ids_list = batches(cfg, 3, seed=20)
    if which == "lomo":
        lr, kw = 0.05, dict(clip_grad_norm=1.0, clip_grad_value=0.01, weight_decay=0.1)
        rule = Lomo(**kw)
    else:
        lr, kw = 1e-2, dict(clip_grad_norm=1.0, weight_decay=0.1)
        rule = AdaLomo(**kw)
    theirs = run_reference(hf_dir, which, ids_list, lr, kw)
    model = lomo_jax.from_pretrained(hf_dir)
    before = dict(hf_tensors(cfg, jax.tree.map(np.asarray, model.params)))
    state, _ = run_fused(cfg, model.params, rule, ids_list, lr=lr)
    after = dict(hf_tensors(cfg, jax.tree.map(np.asarray, state.params)))
    for name, new in after.items():
        ours_delta = new - before[name]
        ref_delta = theirs[name] - before[name]
        assert np.linalg.norm(ref_delta) > 0, name
        assert rel_err(ours_delta, ref_delta) <= 1e-3, (name, rel_err(ours_delta, ref_delta))


# ---- float16 with dynamic loss scaling --------------------------------------------------------
def test_float16_overflow_skips_step_and_scale_grows_back():
    params = lomo_jax.init_params(CFG, jax.random.key(2), jnp.float16)
    scaler = DynamicLossScale(init_scale=2.0**40, window=3)  # 2^40 overflows float16 gradients
    rule = Lomo()
    step = make_fused_step(CFG, rule, Schedule(1e-2), loss_scale=scaler)
    state = init_train_state(rule, jax.tree.map(jnp.array, params), True, scaler)
    ids = jnp.asarray(batches(CFG, 1)[0])
    state, m = step(state, Batch(ids, ids))
    assert bool(m["overflow"]) and float(state.scale.scale) == 2.0**39
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()

    state = state._replace(scale=ScaleState(jnp.float32(2.0**4), jnp.int32(0)))
    for _ in range(3):
        before = jax.tree.map(np.asarray, state.params)
        state, m = step(state, Batch(ids, ids))
        assert not bool(m["overflow"])
        assert any(
            (np.asarray(a) != b).any()
            for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before))
        )
    assert float(state.scale.scale) == 2.0**5  # doubled after a window of 3 clean steps


@pytest.mark.slow
def test_bfloat16_step_stays_close_to_float32():
    params = lomo_jax.init_params(CFG, jax.random.key(4))
    ids_list = batches(CFG, 2)
    s32, m32 = run_fused(CFG, params, AdaLomo(), ids_list)
    s16, m16 = run_fused(
        CFG, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), AdaLomo(), ids_list
    )
    assert jax.tree.leaves(s16.params)[0].dtype == jnp.bfloat16
    assert abs(float(m16[-1]["loss"]) - float(m32[-1]["loss"])) < 0.05
