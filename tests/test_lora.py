"""LoRA's settings, adapter files and AdamW rule, without a PyTorch reference (those against
peft: tests/test_lora_peft.py; the fused step with LoRA: tests/test_lora_engine.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lomo_jax
from convert import export as export_module
from convert import export_hf
from convert.errors import ConversionError
from convert.peft import read_adapter, write_adapter
from lomo_jax.checkpoint import CheckpointError
from lomo_jax.cli import main
from lomo_jax.generation_config import GenerationConfig
from lomo_jax.lora import LoraConfig, LoraConfigError, init_factors, join
from lomo_jax.optim import AdamW, StepScalars
from tests.conftest import CONFIGS, make_hf_dir
from tests.test_outputs import during, in_use

CFG = CONFIGS["gqa"]


def test_export_peft_needs_an_adapter(tmp_path):
    lomo_jax.from_pretrained(make_hf_dir(tmp_path / "base", CFG)).save_pretrained(tmp_path / "m")
    with pytest.raises(ConversionError, match="has no LoRA adapter"):
        export_hf(tmp_path / "m", tmp_path / "out", peft=True)
    assert not (tmp_path / "out").exists()


def test_export_peft_claims_its_out_and_keeps_the_generation_config_and_template(
    tmp_path, monkeypatch, capsys
):
    """`export --peft` is an export: a second writer of its OUT is refused with one line, and the
    base directory keeps the model's generation_config.json and chat template."""
    cfg = CFG.replace(lora=LoraConfig(2))
    base = lomo_jax.from_pretrained(make_hf_dir(tmp_path / "base", CFG))
    gen = GenerationConfig.from_values({"eos_token_id": [1, 2], "do_sample": True, "top_k": 5})
    factors = init_factors(cfg, jax.random.key(0))
    model = lomo_jax.LlamaModel(cfg, join(base.params, factors), generation_config=gen)
    model.save_pretrained(tmp_path / "m")
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    (tmp_path / "m" / "chat_template.jinja").write_text(template)
    out = tmp_path / "out"
    argv = ["export", str(tmp_path / "m"), str(out), "--peft"]
    second = during(monkeypatch, export_module, "write_hf", argv)
    assert main(argv) == 0
    assert second == [1]
    assert in_use(out, "export") in capsys.readouterr().err.splitlines()
    assert (out / "generation_config.json").read_text() == gen.text
    assert (out / "chat_template.jinja").read_text() == template
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 2


def test_adamw_rule_equals_optax_adamw():
    """Three steps on a tree, with weight decay and a changing learning rate."""
    rule = AdamW(weight_decay=0.1)
    key = jax.random.key(3)
    params = {"a": jax.random.normal(key, (3, 5)), "b": jax.random.normal(key, (4,))}
    schedule = optax.linear_schedule(1e-2, 1e-3, 3)
    tx = optax.adamw(schedule, weight_decay=0.1)
    ref, ref_state = params, tx.init(params)
    ours, state = params, jax.tree.map(rule.init, params)
    for t in range(3):
        grads = jax.tree.map(lambda p, t=t: jnp.sin(p * (t + 1)), ref)
        updates, ref_state = tx.update(grads, ref_state, ref)
        ref = optax.apply_updates(ref, updates)
        sc = StepScalars(schedule(t), jnp.int32(t + 1), jnp.float32(1.0), jnp.float32(1.0))
        grads = jax.tree.map(lambda p, t=t: jnp.sin(p * (t + 1)), ours)
        out = {k: rule.update(ours[k], grads[k], state[k], sc) for k in ours}
        ours, state = {k: o[0] for k, o in out.items()}, {k: o[1] for k, o in out.items()}
    for k in params:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-6)


def test_a_model_with_a_bad_adapter_config_is_a_checkpoint_error(tmp_path):
    cfg = CFG.replace(lora=LoraConfig(2))
    model = lomo_jax.from_pretrained(make_hf_dir(tmp_path / "base", CFG))
    factors = init_factors(cfg, jax.random.key(0))
    lomo_jax.LlamaModel(cfg, join(model.params, factors)).save_pretrained(tmp_path / "m")
    f = tmp_path / "m" / "adapter_config.json"
    f.write_text(json.dumps(json.loads(f.read_text()) | {"use_dora": True}))
    with pytest.raises(CheckpointError, match="adapter_config.json: use_dora"):
        lomo_jax.from_pretrained(tmp_path / "m")


def test_lora_config_checks_its_values():
    assert LoraConfig(4).alpha == 8 and LoraConfig(4).scale == 2.0
    assert LoraConfig(2, targets=("v_proj", "q_proj")).targets == ("q_proj", "v_proj")
    for bad in (dict(rank=0), dict(rank=2, dropout=1.0), dict(rank=2, targets=())):
        with pytest.raises(LoraConfigError):
            LoraConfig(**bad)


def test_written_adapter_reads_back(tmp_path):
    cfg = CFG.replace(lora=LoraConfig(3, alpha=4, targets=("k_proj", "gate_proj"), dropout=0.1))
    factors = init_factors(cfg, jax.random.key(1))
    factors = jax.tree.map(lambda x: x + 0.5, factors)
    write_adapter(tmp_path / "a", cfg, factors, "somewhere")
    back_cfg, back = read_adapter(tmp_path / "a", CFG)
    assert back_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, factors))
