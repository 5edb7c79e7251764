"""LoRA in the fused step against plain references: `jax.grad` over the base weights and the
factors, then SGD / the unfused AdaLomo on the base and `optax.adamw` on the factors (the
hybrid); `jax.grad` over the factors alone with the base frozen (plain LoRA)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lomo_jax
from lomo_jax.lora import TARGETS, LoraConfig, join, split
from lomo_jax.loss import Batch, batch_inputs, cross_entropy
from lomo_jax.model import decoder_layers, embed, head
from lomo_jax.optim import AdaLomo, StepScalars, apply_updates, clip_coefficient, init_state
from lomo_jax.schedule import Schedule
from lomo_jax.train_step import StepOptions, make_train_step
from tests.conftest import CONFIGS, random_ids
from tests.test_engine import assert_trees_close, in_token_blocks

LORA = LoraConfig(4, alpha=8, targets=("q_proj", "v_proj"))
STEPS = 2  # the factors' AdamW at a second step (its moments no longer zero)
LR, LORA_LR = 0.05, 1e-2


def lora_config(name: str, dropout: float):
    """CONFIGS[name] with rank-4 factors on q and v; "gqa-token-blocks": every projection
    adapted and the MLP run in blocks of 5 tokens (model.mlp_tokens), each with its own dropout
    key."""
    if name == "gqa-token-blocks":
        cfg = in_token_blocks(CONFIGS["gqa"], 5)
        return cfg.replace(lora=LoraConfig(4, alpha=8, dropout=dropout, targets=TARGETS))
    return CONFIGS[name].replace(lora=LoraConfig(4, alpha=8, dropout=dropout))


def lora_params(cfg, seed=0):
    """Weights with factors, B drawn too (peft starts it at zero: A would get no gradient)."""
    params = lomo_jax.init_params(cfg, jax.random.key(seed))
    base, factors = split(params)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    factors = jax.tree.map(lambda f: f + 0.05 * jax.random.normal(next(keys), f.shape), factors)
    return join(base, factors)


def loss_with_dropout(cfg, params, ids, key):
    """The model's loss, its LoRA dropout drawn from `key` (None: none)."""
    batch = Batch(ids, ids)
    positions, mask = batch_inputs(batch)
    h = embed(cfg, params["embed"], ids)
    h, _ = decoder_layers(cfg, params["layers"], h, positions, mask, dropout_key=key)
    return cross_entropy(head(cfg, params, h), ids)


def run_step(options, cfg, params, ids_list):
    init, step = make_train_step(options, cfg)
    state = init(jax.tree.map(jnp.array, params))
    metrics = []
    for ids in ids_list:
        state, m = step(state, Batch(jnp.asarray(ids), jnp.asarray(ids)))
        metrics.append(m)
    return state, metrics


def reference(cfg, params, ids_list, optimizer, clip=None, frozen=False, seed=0):
    """jax.grad over (base, factors) (the factors alone when `frozen`), then SGD or the unfused
    AdaLomo on the base (its gradients clipped by their own global norm) and optax.adamw on the
    factors (not clipped)."""
    tx = optax.adamw(LORA_LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    base, factors = split(params)
    f_state = tx.init(factors)
    rule = AdaLomo(clip_grad_norm=clip)
    b_state = init_state(rule, base)
    dropout = cfg.lora.dropout > 0
    for t, ids in enumerate(ids_list):
        key = lomo_jax.lora.dropout_key(seed, jnp.int32(t)) if dropout else None

        def loss(b, f, ids=ids, key=key):
            return loss_with_dropout(cfg, join(b, f), jnp.asarray(ids), key)

        g_base, g_factors = jax.grad(loss, argnums=(0, 1))(base, factors)
        updates, f_state = tx.update(g_factors, f_state, factors)
        new_factors = optax.apply_updates(factors, updates)
        if not frozen:
            norm = optax.global_norm(g_base)
            coef = jnp.float32(1.0) if clip is None else jnp.minimum(1.0, clip / (norm + 1e-6))
            if optimizer == "lomo":
                base = jax.tree.map(lambda w, g, c=coef: w - LR * (g * c), base, g_base)
            else:
                sc = StepScalars(jnp.float32(LR), jnp.int32(t + 1), coef, jnp.float32(1.0))
                base, b_state = apply_updates(rule, base, g_base, b_state, sc)
        factors = new_factors
    return join(base, factors)


@pytest.mark.parametrize(
    ("optimizer", "clip", "dropout", "cfg_name"),
    [
        ("lomo", 0.5, 0.0, "mha-tied"),
        ("adalomo", None, 0.0, "gqa"),
        # clipping, dropout, every projection adapted, the MLP in blocks of tokens
        pytest.param("adalomo", 0.5, 0.1, "gqa-token-blocks", marks=pytest.mark.slow),
    ],
)
def test_hybrid_equals_jax_grad_then_rule_and_adamw(optimizer, clip, dropout, cfg_name):
    """One fused backward updates the base (LOMO / AdaLomo) and hands the factors' gradients to
    AdamW after the scan: two steps equal the plain reference, float32."""
    cfg = lora_config(cfg_name, dropout)
    params = lora_params(cfg)
    ids_list = [random_ids(cfg, 2, 24, seed=10 + k) for k in range(STEPS)]
    options = StepOptions(optimizer, lr=LR, clip_grad_norm=clip, lora_lr=LORA_LR)
    state, metrics = run_step(options, cfg, params, ids_list)
    ref = reference(cfg, params, ids_list, optimizer, clip)
    assert_trees_close(state.params, ref, rtol=1e-6)
    # Both parts moved: the comparison sees the base's update and the factors'.
    for ours, before in zip(split(state.params), split(params)):
        pairs = zip(jax.tree.leaves(ours), jax.tree.leaves(before), strict=True)
        assert all(not np.array_equal(a, b) for a, b in pairs)
    assert float(metrics[0]["lora_lr"]) == pytest.approx(LORA_LR)


@pytest.mark.parametrize(
    ("dropout", "cfg_name"),
    [(0.0, "gqa"), pytest.param(0.2, "gqa-token-blocks", marks=pytest.mark.slow)],
)
def test_plain_lora_equals_jax_grad_of_the_factors(dropout, cfg_name):
    """--optimizer none: the factors train by AdamW; every base weight stays bit for bit."""
    cfg = lora_config(cfg_name, dropout)
    params = lora_params(cfg, seed=3)
    ids_list = [random_ids(cfg, 2, 24, seed=20 + k) for k in range(STEPS)]
    state, _ = run_step(StepOptions("none", lora_lr=LORA_LR), cfg, params, ids_list)
    ref = reference(cfg, params, ids_list, "none", frozen=True)
    assert_trees_close(state.params, ref, rtol=1e-6)
    ours, base = split(state.params)[0], split(params)[0]
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_plain_lora_clips_the_factors_gradients():
    """With the base frozen, norm clipping covers what trains: the factors' global norm."""
    cfg = CONFIGS["gqa"].replace(lora=LORA)
    params = lora_params(cfg, seed=4)
    ids = random_ids(cfg, 2, 24, seed=30)
    state, metrics = run_step(
        StepOptions("none", lora_lr=LORA_LR, clip_grad_norm=1e-3), cfg, params, [ids]
    )
    base, factors = split(params)
    g = jax.grad(lambda f: loss_with_dropout(cfg, join(base, f), jnp.asarray(ids), None))(factors)
    norm = optax.global_norm(g)
    assert float(metrics[0]["lora_grad_norm"]) == pytest.approx(float(norm), rel=1e-5)
    coef = clip_coefficient(lomo_jax.optim.AdamW(clip_grad_norm=1e-3), norm)
    assert float(coef) < 0.1  # the clip acts
    tx = optax.adamw(LORA_LR, weight_decay=0.0)
    g = jax.tree.map(lambda x: x * coef, g)
    updates, _ = tx.update(g, tx.init(factors), factors)
    assert_trees_close(split(state.params)[1], optax.apply_updates(factors, updates), rtol=1e-6)


def _dot_output_shapes(step, *args) -> set[tuple[int, ...]]:
    """The result shapes of every matmul of the lowered step (scan bodies included)."""
    text = step.lower(*args).as_text()
    found = re.findall(r"stablehlo.dot_general.*-> tensor<([0-9x]+)x(?:f32|bf16)>", text)
    return {tuple(int(d) for d in shape.split("x")) for shape in found}


def test_plain_lora_computes_no_base_gradient():
    """No matmul of the plain-LoRA step yields a base weight's shape (a weight gradient); the
    hybrid's does, so the check can fail."""
    cfg = CONFIGS["gqa"].replace(lora=LORA, intermediate_size=72, vocab_size=97)
    params = lora_params(cfg)
    base_shapes = {
        tuple(x.shape[1:]) if x.ndim == 3 else tuple(x.shape)
        for x in jax.tree.leaves(split(params)[0])
        if x.ndim >= 2
    }
    ids = jnp.asarray(random_ids(cfg, 2, 16, seed=1))

    def shapes(optimizer):
        init, step = make_train_step(StepOptions(optimizer), cfg)
        return _dot_output_shapes(step, init(params), Batch(ids, ids)) & base_shapes

    assert shapes("none") == set()
    assert shapes("lomo")  # the hybrid computes the base's gradients


@pytest.mark.parametrize(
    ("optimizer", "model_lora", "message"),
    [
        ("none", False, "LoRA rank"),
        ("adamw", True, "not adamw"),
    ],
)
def test_lora_options_that_cannot_work_are_refused(optimizer, model_lora, message):
    cfg = CONFIGS["gqa"].replace(lora=LORA if model_lora else None)
    with pytest.raises(ValueError, match=message):
        make_train_step(StepOptions(optimizer), cfg)


@pytest.mark.slow
def test_hybrid_schedule_is_its_own():
    """--lora-lr with its own schedule and warmup: the factors' learning rate per step."""
    cfg = CONFIGS["gqa"].replace(lora=LORA)
    options = StepOptions(
        "lomo", lr=1e-2, total_steps=4, lora_lr=1e-3, lora_schedule="linear", lora_warmup_steps=2
    )
    ids_list = [random_ids(cfg, 2, 16, seed=k) for k in range(3)]
    _, metrics = run_step(options, cfg, lora_params(cfg), ids_list)
    want = Schedule(1e-3, "linear", 2, 4)
    for t, m in enumerate(metrics):
        assert float(m["lora_lr"]) == pytest.approx(float(want(t)))
        assert float(m["lr"]) == pytest.approx(1e-2)


@pytest.mark.parametrize(
    "method", ["fused-lomo", pytest.param("fused-adalomo", marks=pytest.mark.slow), "lora"]
)
def test_lora_steps_copy_no_stacked_weight(method):
    """The hybrid carries the base stacks as the fused step does and reads the factors as they
    were; plain LoRA writes no stack at all: no instruction copies a stacked weight."""
    from lomo_jax.memory import lower
    from tests.test_engine_memory import B, T, config, stack_copies

    rank = 4  # no weight has an axis of 4: a factor stack [8, in, 4] / [8, 4, out] is told apart
    cfg = config(8, kv_heads=2).replace(lora=LoraConfig(rank, targets=("q_proj", "v_proj")))
    compiled = lower(cfg, method, B, T)[0].compile()
    factor = re.compile(rf"f32\[8,({rank},\d+|\d+,{rank})\]")
    assert [c for c in stack_copies(compiled, 8) if not factor.search(c)] == []
