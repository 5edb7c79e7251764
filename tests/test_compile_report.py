"""benchmarks/compile_report.py reads what a compiled step does from XLA's HLO text: GEMM FLOPs
times the trip counts of the loops around them, and copies of stacked-weight layers in a layer
loop. Checked on small programs whose answers are known."""

import importlib.util
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from lomo_jax.memory import target_layout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compile_report  # noqa: E402

L, M, K = 5, 64, 128
needs_cuda_plugin = pytest.mark.skipif(
    importlib.util.find_spec("jax_cuda12_plugin") is None and not os.environ.get("CI"),
    reason="JAX's CUDA plugin is not installed (make install adds it)",
)


def layers_then_repeats(h, ws):
    """A scan over L stacked [K, K] weights, each applied 3 times by an inner scan."""

    def layer(h, w):
        def repeat(h, _):
            return jnp.tanh(h @ w), None

        return jax.lax.scan(repeat, h, None, length=3)[0], None

    return jax.lax.scan(layer, h, ws)[0]


def compiled_text(target: str) -> str:
    place = {} if target == "cpu" else {"sharding": target_layout(target).replicated()}
    h = jax.ShapeDtypeStruct((M, K), jnp.bfloat16, **place)
    ws = jax.ShapeDtypeStruct((L, K, K), jnp.bfloat16, **place)
    return jax.jit(layers_then_repeats).lower(h, ws).compile().as_text()


def test_gemm_flops_count_every_trip_of_nested_loops():
    r = compile_report.report(compiled_text("cpu"), L)
    assert r["gemm_flops"] == L * 3 * 2 * M * K * K


@needs_cuda_plugin
def test_a_weight_layer_fed_to_a_gpu_gemm_is_seen_as_a_copy():
    """XLA's GPU pipeline copies the dynamic slice of a stack that feeds a GEMM into a buffer of
    its own (the README's compile report counts these in the 7B step)."""
    r = compile_report.report(compiled_text("h100"), L)
    assert r["gemm_flops"] == L * 3 * 2 * M * K * K
    slices = [s for c in r["layer_loop_copies"] for s in c["slices"]]
    assert [s.split("{")[0] for s in slices] == [f"bf16[1,{K},{K}]"]
