"""LoRA against Hugging Face peft on transformers' LlamaForCausalLM: the forward, peft's adapter
files both ways, the merged and the peft export, peft's initialisation."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import lomo_jax
from convert import export_hf, safetensors_file
from convert.errors import ConversionError
from convert.peft import WEIGHTS_FILE as WEIGHTS
from convert.peft import read_adapter
from lomo_jax.lora import TARGETS, LoraConfig, init_factors, join, split
from lomo_jax.model import forward
from tests.conftest import CONFIGS, make_hf_dir, needs_torch, random_ids

torch = needs_torch()
peft = pytest.importorskip(
    "peft", reason="needs peft, the LoRA reference: pip install -e '.[reference]'"
)
import transformers  # noqa: E402

CFG = CONFIGS["gqa"]


def hf_model(path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.float().numpy()


def peft_adapter(base_dir, out, seed=0, **lora_kw):
    """A peft adapter on the model in `base_dir`, B drawn too (peft starts it at zero), saved
    with peft's save_pretrained in `out`; -> the PeftModel."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(
        hf_model(base_dir), peft.LoraConfig(task_type="CAUSAL_LM", **lora_kw)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    model.save_pretrained(out)
    return model.eval()


def with_adapter(base_dir, adapter_dir):
    """A lomo-jax model of the base in `base_dir` with the peft adapter in `adapter_dir`."""
    model = lomo_jax.from_pretrained(base_dir)
    cfg, factors = read_adapter(adapter_dir, model.config)
    return lomo_jax.LlamaModel(cfg, join(model.params, jax.tree.map(jnp.asarray, factors)))


LORAS = {
    "q,v": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all-rslora": dict(r=3, lora_alpha=5, target_modules="all-linear", use_rslora=True),
    "mlp-alpha-float": dict(r=2, lora_alpha=2.5, target_modules=["down_proj", "up_proj", "o_proj"]),
}


@pytest.mark.parametrize("lora", list(LORAS))
def test_forward_equals_peft(tmp_path, lora):
    base = make_hf_dir(tmp_path / "base", CFG)
    theirs = peft_adapter(base, tmp_path / "adapter", **LORAS[lora])
    ours = with_adapter(base, tmp_path / "adapter")
    if lora == "all-rslora":
        assert ours.config.lora.targets == TARGETS and ours.config.lora.scale == 5 / 3**0.5
    ids = random_ids(CFG, 2, 20, seed=1)
    np.testing.assert_allclose(np.asarray(ours(ids)), torch_logits(theirs, ids), atol=1e-5)
    # The adapter changes the logits: the comparison sees the LoRA path.
    base_logits = np.asarray(lomo_jax.from_pretrained(base)(ids))
    assert np.abs(base_logits - np.asarray(ours(ids))).max() > 1e-3


def test_a_model_with_factors_saves_and_loads_with_its_adapter_settings(tmp_path):
    base = make_hf_dir(tmp_path / "base", CFG)
    peft_adapter(base, tmp_path / "adapter", **LORAS["all-rslora"])
    model = with_adapter(base, tmp_path / "adapter")
    model.save_pretrained(tmp_path / "ckpt")
    assert not json.loads((tmp_path / "ckpt" / "config.json").read_text()).get("lora")
    back = lomo_jax.from_pretrained(tmp_path / "ckpt")
    assert back.config == model.config
    ids = random_ids(CFG, 1, 12)
    np.testing.assert_array_equal(np.asarray(back(ids)), np.asarray(model(ids)))
    # A bfloat16 load casts the weights; the factors stay float32, as peft keeps them.
    bf16 = lomo_jax.from_pretrained(tmp_path / "ckpt", dtype=jnp.bfloat16)
    base_params, factors = split(bf16.params)
    assert {x.dtype for x in jax.tree.leaves(base_params)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(factors)} == {jnp.dtype(jnp.float32)}


def read_tensors(path) -> dict[str, np.ndarray]:
    return dict(safetensors_file.read(path))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exports_load_in_peft_and_merge_as_peft_does(tmp_path, dtype):
    """`export` writes the model merged, `export --peft` its base and adapter: PeftModel gives
    lomo-jax's logits on the latter, and its merge_and_unload() the former's weights."""
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    base = make_hf_dir(tmp_path / "base", CFG, dtype=np_dtype)
    peft_adapter(base, tmp_path / "adapter", **LORAS["all-rslora"])
    ours = with_adapter(base, tmp_path / "adapter")
    ours.save_pretrained(tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "merged")
    export_hf(tmp_path / "ckpt", tmp_path / "out", peft=True)
    assert not (tmp_path / "merged" / "adapter").exists()

    # The base in OUT is the source's, bit for bit; the adapter is peft's files.
    source = read_tensors(base / "model.safetensors")
    written = read_tensors(tmp_path / "out" / "model.safetensors")
    assert source.keys() == written.keys()
    for k, a in source.items():
        assert a.dtype == written[k].dtype and a.tobytes() == written[k].tobytes(), k
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "out").absolute())

    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    loaded = peft.PeftModel.from_pretrained(
        hf_model(tmp_path / "out", torch_dtype), tmp_path / "out" / "adapter"
    ).eval()
    ids = random_ids(CFG, 2, 16, seed=2)
    if dtype == "float32":
        np.testing.assert_allclose(torch_logits(loaded, ids), np.asarray(ours(ids)), atol=1e-4)
    merged = {k: v.float().numpy() for k, v in loaded.merge_and_unload().state_dict().items()}
    exported = read_tensors(tmp_path / "merged" / "model.safetensors")
    assert exported.keys() == merged.keys()
    for k, a in exported.items():
        a = a.astype(np.float32)
        if dtype == "float32":
            np.testing.assert_allclose(a, merged[k], rtol=1e-6, atol=1e-7, err_msg=k)
        else:  # rounded the same way; a last-bit difference of the float32 sum may move one
            assert np.mean(a != merged[k]) < 1e-3, k
            np.testing.assert_allclose(a, merged[k], rtol=2**-7, err_msg=k)


def test_factors_start_as_peft_does(tmp_path):
    """A is uniform in +-1/sqrt(in) (torch's kaiming_uniform_(a=sqrt(5)), which peft uses), B is
    zero: the model starts as its base. peft's own A, drawn on the same shapes, has the same
    bound and spread."""
    cfg = CFG.replace(lora=LoraConfig(8, targets=TARGETS))
    factors = init_factors(cfg, jax.random.key(0))
    base = make_hf_dir(tmp_path / "base", CFG)
    theirs = peft.get_peft_model(
        hf_model(base), peft.LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    theirs_a = {
        n.split(".")[-4]: p.detach().numpy()
        for n, p in theirs.named_parameters()
        if ".layers.0." in n and "lora_A" in n
    }
    for group in factors["layers"].values():
        for module, leaves in group.items():
            a, b = np.asarray(leaves["lora_a"]), np.asarray(leaves["lora_b"])
            bound = 1 / np.sqrt(a.shape[1])
            assert not b.any()
            assert bound >= np.abs(a).max() > 0.95 * bound
            assert abs(a.std() / (bound / np.sqrt(3)) - 1) < 0.1
            assert np.abs(theirs_a[module]).max() <= bound
            assert abs(theirs_a[module].std() / a[0].std() - 1) < 0.15, module
    # Layers and projections draw different values.
    q = np.asarray(factors["layers"]["self_attn"]["q_proj"]["lora_a"])
    assert not np.array_equal(q[0], q[1])
    ids = random_ids(CFG, 1, 12)
    model = lomo_jax.from_pretrained(base)
    with_factors = forward(cfg, join(model.params, factors), jnp.asarray(ids))
    np.testing.assert_array_equal(np.asarray(with_factors), np.asarray(model(ids)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "use_dora=True is not supported"),
        ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
        ({"bias": "all"}, "bias='all' is not supported"),
        ({"layers_to_transform": [0]}, "layers_to_transform"),
        ({"target_modules": ".*proj"}, "regular expressions are not supported"),
        ({"target_modules": ["q_proj", "lm_head"]}, "'lm_head' is not a projection"),
        ({"peft_type": "IA3"}, "not LORA"),
        ({"r": 0}, "rank must be a positive integer"),
    ],
)
def test_unsupported_adapters_are_refused_naming_the_file(tmp_path, change, message):
    base = make_hf_dir(tmp_path / "base", CFG)
    peft_adapter(base, tmp_path / "adapter", **LORAS["q,v"])
    f = tmp_path / "adapter" / "adapter_config.json"
    f.write_text(json.dumps(json.loads(f.read_text()) | change))
    with pytest.raises(ConversionError, match=message) as e:
        read_adapter(tmp_path / "adapter", CFG)
    assert str(e.value).startswith(str(f))


def test_damaged_adapter_tensors_are_refused(tmp_path):
    base = make_hf_dir(tmp_path / "base", CFG)
    peft_adapter(base, tmp_path / "adapter", **LORAS["q,v"])
    f = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = read_tensors(f)
    name = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    for problem, edit in {
        "missing tensor": lambda t: t.pop(name),
        "has shape": lambda t: t.update({name: t[name][:, :2]}),
        "unexpected tensor": lambda t: t.update({name.replace("v_proj", "k_proj"): t[name]}),
    }.items():
        broken = dict(tensors)
        edit(broken)
        safetensors_file.write(f, list(broken.items()))
        with pytest.raises(ConversionError, match=problem):
            read_adapter(tmp_path / "adapter", CFG)
    with pytest.raises(ConversionError, match="not a directory"):
        read_adapter(tmp_path / "nowhere", CFG)


def test_plain_lora_equals_peft_with_torch_adamw(tmp_path):
    """--optimizer none: three steps of lomo-jax's fused plain LoRA equal peft's LoRA on
    transformers' LlamaForCausalLM trained by torch.optim.AdamW on the same batches."""
    from lomo_jax.loss import Batch
    from lomo_jax.train_step import StepOptions, make_train_step

    base = make_hf_dir(tmp_path / "base", CFG)
    theirs = peft_adapter(base, tmp_path / "adapter", **LORAS["q,v"]).train()
    ours = with_adapter(base, tmp_path / "adapter")
    lr = 1e-2
    trained = [p for p in theirs.parameters() if p.requires_grad]
    assert len(trained) == 2 * 2 * CFG.num_hidden_layers  # A and B of q and v, every layer
    opt = torch.optim.AdamW(trained, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    init, step = make_train_step(StepOptions("none", lora_lr=lr), ours.config)
    state = init(ours.params)
    for k in range(3):
        ids = random_ids(CFG, 2, 20, seed=40 + k)
        state, m = step(state, Batch(jnp.asarray(ids), jnp.asarray(ids)))
        t_ids = torch.from_numpy(ids).long()
        loss = theirs(input_ids=t_ids, labels=t_ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert float(m["loss"]) == pytest.approx(loss.item(), rel=1e-5)
    out = tmp_path / "trained"
    lomo_jax.LlamaModel(ours.config, state.params).save_pretrained(out)
    export_hf(out, tmp_path / "export", peft=True)
    _, factors = read_adapter(tmp_path / "export" / "adapter", CFG)
    theirs_sd = {k: v.detach().numpy() for k, v in theirs.state_dict().items() if "lora_" in k}
    ours_sd = dict(safetensors_file.read(tmp_path / "export" / "adapter" / WEIGHTS))
    assert ours_sd.keys() == {k.replace(".default", "") for k in theirs_sd}
    for k, a in theirs_sd.items():
        b = ours_sd[k.replace(".default", "")]
        assert np.linalg.norm(b - a) <= 1e-4 * np.linalg.norm(a), k
    ids = random_ids(CFG, 2, 16, seed=50)
    theirs.eval()
    np.testing.assert_allclose(
        np.asarray(lomo_jax.from_pretrained(out)(ids)), torch_logits(theirs, ids), atol=1e-4
    )
    # The frozen base is exported bit for bit as it was read.
    source = read_tensors(base / "model.safetensors")
    written = read_tensors(tmp_path / "export" / "model.safetensors")
    assert all(source[k].tobytes() == written[k].tobytes() for k in source)
