"""Host offload of the fused step's saved layer inputs (`lomo_jax.offload`): the same step, bit
for bit, with the layer inputs waiting in host memory; for a GPU the plan's device peak falls by
what moved to the host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lomo_jax
from lomo_jax.lora import LoraConfig
from lomo_jax.loss import Batch
from lomo_jax.memory import plan
from lomo_jax.train_step import StepOptions, make_train_step
from tests.conftest import CONFIGS, random_ids
from tests.test_gpu_plans import needs_cuda_plugin

CFG = CONFIGS["gqa"].replace(num_hidden_layers=3)


def _steps(offload: bool, dtype, options: dict, cfg=CFG) -> list[np.ndarray]:
    """Two fused steps from the same weights: the losses, then every weight and state tensor."""
    step = make_train_step(StepOptions(offload_activations=offload, **options), cfg)
    params = lomo_jax.init_params(cfg, jax.random.key(0), dtype)
    state = step.init(params)
    ids = random_ids(CFG, 2, 32, seed=1)
    losses = []
    for _ in range(2):
        state, metrics = step.step(state, Batch(ids, ids))
        losses.append(np.asarray(metrics["loss"]))
    return losses + [np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state))]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dtype", "options"),
    [
        (jnp.float32, {"optimizer": "adalomo", "lr": 0.01, "weight_decay": 0.01}),
        (jnp.float32, {"optimizer": "lomo", "lr": 0.05, "clip_grad_norm": 0.5}),
        (jnp.bfloat16, {"optimizer": "adalomo", "lr": 0.01, "rounding": "stochastic"}),
    ],
    ids=["adalomo-f32", "lomo-clipped-f32", "adalomo-bf16-stochastic"],
)
def test_offloaded_step_equals_the_step_bit_for_bit(dtype, options):
    plain, offloaded = _steps(False, dtype, options), _steps(True, dtype, options)
    for a, b in zip(plain, offloaded, strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.slow
def test_offloaded_plain_lora_step_equals_the_step_bit_for_bit():
    """Plain LoRA (the base frozen) offloads its layer inputs too."""
    cfg = CFG.replace(lora=LoraConfig(4, dropout=0.1))
    options = {"optimizer": "none", "lora_lr": 0.01}
    plain, offloaded = (
        _steps(False, jnp.float32, options, cfg),
        _steps(True, jnp.float32, options, cfg),
    )
    for a, b in zip(plain, offloaded, strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_only_fused_steps_offload():
    with pytest.raises(ValueError, match="only the fused step"):
        StepOptions(optimizer="adamw", offload_activations=True)


@pytest.mark.slow
@needs_cuda_plugin
def test_h100_plan_moves_the_layer_inputs_to_the_host():
    """bfloat16 AdaLomo, 1 x 8192 tokens of a 16-layer model: offloaded, the host holds every
    layer's input, and the device peak falls by all of them but a few (the two layers' inputs
    of the double buffer, and the buffers of the copies in flight)."""
    cfg = CFG.replace(
        hidden_size=256, intermediate_size=512, num_attention_heads=4, num_hidden_layers=16
    )
    layer_inputs = 1 * 8192 * cfg.hidden_size * 2  # bytes of one layer's input
    # auto: offloaded only when the step does not fit without (it fits)
    plain = plan(cfg, "fused-adalomo", 1, 8192, jnp.bfloat16, "h100", offload="auto")
    moved = plan(cfg, "fused-adalomo", 1, 8192, jnp.bfloat16, "h100", offload="on")
    assert plain["host_bytes"] == 0 and not plain["offload"] and moved["offload"]
    assert moved["host_bytes"] >= cfg.num_hidden_layers * layer_inputs
    assert plain["peak_bytes"] - moved["peak_bytes"] >= (cfg.num_hidden_layers - 6) * layer_inputs
