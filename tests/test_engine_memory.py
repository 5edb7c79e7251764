"""The fused step keeps one layer's gradients alive, never a copy of the stacked weights.

Compiled on abstract shapes for two depths (8 and 16 layers: between 4 and 8 the heap packing of
XLA's buffer assignment still moves by a few hundred KB): the temporaries may grow only by the
extra saved layer inputs, and no instruction may copy a stacked weight (the known XLA trap: a
read of layer i that is not an ancestor of the in-place write makes XLA copy the whole stack
every iteration).
"""

import re

import jax.numpy as jnp
import pytest

from lomo_jax.config import LlamaConfig
from lomo_jax.memory import lower

B, T = 2, 64


def config(layers, tied=False, kv_heads=4) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
    )


def compile_step(method, layers, tied=False, kv_heads=4, layout=None):
    cfg = config(layers, tied, kv_heads)
    lowered, params = lower(cfg, method, B, T, jnp.float32, layout)
    return cfg, lowered.compile()


def stack_copies(compiled, layers, matrices_only=False) -> list[str]:
    """HLO copy instructions whose result has the leading layer axis of a stacked weight (of a
    stacked matrix only, with `matrices_only`)."""
    tail = r",\d+" if matrices_only else r"(?:,\d+)?"
    pat = re.compile(rf"= f32\[{layers},\d+{tail}\]\S* copy\(")
    return [line.strip()[:120] for line in compiled.as_text().splitlines() if pat.search(line)]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fused-lomo", "fused-adalomo"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_temporaries_grow_only_by_saved_layer_inputs(method, tied):
    _, c8 = compile_step(method, 8, tied)
    cfg, c16 = compile_step(method, 16, tied)
    extra_inputs = 8 * B * T * cfg.hidden_size * 4  # eight more saved [B, T, D] float32 inputs
    extra_inputs += 64  # and the scan's int32 layer indices, [16] against [8] (64-byte aligned)
    growth = c16.memory_analysis().temp_size_in_bytes - c8.memory_analysis().temp_size_in_bytes
    stacked_matrix = 16 * cfg.hidden_size * cfg.intermediate_size * 4
    assert growth <= extra_inputs, (growth, extra_inputs)
    assert c16.memory_analysis().temp_size_in_bytes < stacked_matrix
    assert stack_copies(c16, 16) == []


@pytest.mark.parametrize("method", ["fused-lomo", "fused-adalomo"])
def test_no_stack_copy_with_grouped_query_attention(method):
    _, c8 = compile_step(method, 8, kv_heads=2)
    assert stack_copies(c8, 8) == []


def test_the_check_sees_a_stack_copy():
    """The detector itself: the unfused SGD step holds gradients as big as the stacks."""
    _, c8 = compile_step("sgd", 8)
    cfg, c16 = compile_step("sgd", 16)
    growth = c16.memory_analysis().temp_size_in_bytes - c8.memory_analysis().temp_size_in_bytes
    assert growth > 8 * B * T * cfg.hidden_size * 4 * 2


@pytest.mark.slow
@pytest.mark.parametrize(("batch", "seq", "ratio"), [(8, 512, 1.16), (1, 1024, 1.08)])
def test_llama_7b_fused_adalomo_fits_the_papers_ratio(batch, seq, ratio):
    """Issue 3's bound on the compiled plan (nothing allocated): peak <= ratio x parameters,
    the paper's 14.58 GB over 12.55 GB of parameters at 8 x 512."""
    from lomo_jax.memory import analyze
    from lomo_jax.presets import preset

    row = analyze(preset("llama-7b"), "fused-adalomo", batch, seq)
    assert row["peak_bytes"] <= ratio * row["param_bytes"], row["peak_over_params"]


def _bf16_compiled(kind: str):
    """A small bfloat16 model's compiled fused step, evaluation forward or generation step."""
    import jax

    from lomo_jax.generate import KVCache, Sampling, _next_token
    from lomo_jax.model import param_shapes

    cfg = config(8)
    if kind in ("fused-adalomo", "inference"):
        return cfg, lower(cfg, kind, B, T, jnp.bfloat16)[0].compile()
    params = param_shapes(cfg, jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((8, B, T, 4, 64), jnp.bfloat16)
    args = (params, jax.ShapeDtypeStruct((B, 1), jnp.int32), KVCache(kv, kv))
    scalars = (
        jax.ShapeDtypeStruct((), jnp.int32),  # the cache index
        jax.ShapeDtypeStruct((), jnp.int32),  # the token whose logits are sampled
        jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
    )
    return cfg, _next_token.lower(cfg, *args, Sampling(), *scalars).compile()


@pytest.mark.parametrize("kind", ["fused-adalomo", "inference", "generate"])
def test_bfloat16_weights_stay_bfloat16_on_cpu(kind):
    """XLA:CPU computes bfloat16 in float32; the convert of a stacked weight must stay inside
    the layer loop, one slice at a time (it was hoisted: a float32 copy of every stack)."""
    cfg, compiled = _bf16_compiled(kind)
    f32_stack = cfg.num_hidden_layers * cfg.hidden_size * cfg.intermediate_size * 4
    assert compiled.memory_analysis().temp_size_in_bytes < f32_stack
    entry = compiled.as_text().split("\nENTRY ")[1]
    pat = re.compile(rf"= f32\[{cfg.num_hidden_layers},\d+,\d+\]")
    assert not [line for line in entry.splitlines() if pat.search(line)]


def test_the_finiteness_check_makes_no_leaf_sized_buffer():
    """A checkpoint checks the weights for inf/NaN first; on a bfloat16 stack the check holds no
    buffer near the stack's size (`all(isfinite(x))` held a bool per element: 1.4 GB at 7B)."""
    import jax

    from lomo_jax.state import all_finite

    stack = jax.ShapeDtypeStruct((8, 512, 1024), jnp.bfloat16)
    compiled = jax.jit(all_finite).lower({"w": stack, "b": stack}).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 0.01 * stack.size
