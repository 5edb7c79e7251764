"""GPU memory plans compiled on this CPU-only machine (deviceless AOT for an H100 / RTX 4090),
and `lomo-jax plan`. `make install` adds JAX's CUDA plugin; without it the GPU plans are
skipped, except in CI, where they must run."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from lomo_jax import attention
from lomo_jax.attention import Mask
from lomo_jax.cli import main
from lomo_jax.memory import device_memory, plan, target_layout
from tests.conftest import CONFIGS, make_hf_dir

needs_cuda_plugin = pytest.mark.skipif(
    importlib.util.find_spec("jax_cuda12_plugin") is None and not os.environ.get("CI"),
    reason="JAX's CUDA plugin is not installed (make install adds it)",
)
REPO = Path(__file__).resolve().parents[1]


def _h100_grad_temp_bytes(impl, T, heads=8, K=64):
    device = target_layout("h100").replicated()
    x = jax.ShapeDtypeStruct((1, T, heads, K), jnp.bfloat16, sharding=device)

    def loss(q, k, v):
        out = attention.attend(q, k, v, Mask(), impl)
        return jnp.sum(out.astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@needs_cuda_plugin
def test_h100_attention_gradient_memory_is_linear_in_length():
    """XLA's GPU pipeline (bfloat16, 8 heads): blockwise temporaries grow 4x from 2048 to 8192
    tokens, not 16x as the [T, T] scores would (tests/test_attention.py shows dense does on
    the CPU)."""
    growth = _h100_grad_temp_bytes("blockwise", 8192) / _h100_grad_temp_bytes("blockwise", 2048)
    assert growth <= 4.5, growth


@pytest.mark.slow
@needs_cuda_plugin
def test_plan_command_says_it_fits_and_prints_nothing_else(tmp_path):
    """A fresh process (the CUDA plugin's notices would show at import), the fused AdaLomo step
    of a small bfloat16 model for an RTX 4090: one JSON line, empty stderr."""
    src = make_hf_dir(tmp_path / "hf", CONFIGS["gqa"])
    cmd = [sys.executable, "-m", "lomo_jax.cli", "plan", "--model", str(src)]
    cmd += ["--target", "rtx4090", "--batch-size", "2", "--seq-len", "2048", "--json"]
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    row = json.loads(done.stdout)
    assert (row["target"], row["method"], row["dtype"]) == ("rtx4090", "fused-adalomo", "bfloat16")
    assert row["device_bytes"] == device_memory("rtx4090")
    assert row["fits"] and row["param_bytes"] < row["peak_bytes"] <= row["device_bytes"]


def test_plan_says_when_it_does_not_fit():
    """A tiny model's forward over 4096 x 65536 tokens: the hidden states alone (64 float32 a
    token) are 68 GB, more than this machine's RAM and an RTX 4090 (the CPU plan compiles fast;
    `fits` compares the same way for every target)."""
    row = plan(CONFIGS["gqa"], "inference", 4096, 65536, jnp.float32, "cpu")
    assert row["peak_bytes"] > 4096 * 65536 * 64 * 4
    assert not row["fits"] and row["peak_bytes"] > device_memory("cpu")


def test_plan_of_an_unknown_model_is_one_line(capsys):
    assert main(["plan", "--model", "no-such-model", "--target", "h100"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lomo-jax: error: no-such-model: neither a preset")
