"""The Meta and llama2.c readers against the tools that write and read those files: each Meta
release as transformers' convert_llama_weights_to_hf.py converts it, Llama 3's tiktoken
tokenizer as tiktoken encodes it, llama2.c's export.py versions as llama2.c writes them."""

import hashlib
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import lomo_jax
from convert import load
from convert.layout import hf_tensors
from convert.synthetic import random_hf_tensors, write_llama2c, write_meta, write_tiktoken_bpe
from lomo_jax.cli import main
from lomo_jax.model import forward
from tests.conftest import CONFIGS, data_path, edit_config, make_hf_dir, needs_torch, random_ids


def hf_logits(model_dir, ids):
    torch = needs_torch()
    hf = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return hf(torch.from_numpy(ids).long()).logits.numpy()


@pytest.mark.parametrize("act", ["silu", "swish"])
def test_hf_silu_and_swish_import_as_transformers_computes_them(tmp_path, act):
    """The names transformers maps to SiLU import; any other activation is refused (bad input)."""
    needs_torch()
    cfg = CONFIGS["gqa"]
    src = edit_config(make_hf_dir(tmp_path / "hf", cfg), hidden_act=act)
    ids = random_ids(cfg, 1, 8)
    ours = lomo_jax.from_pretrained(src)
    np.testing.assert_allclose(np.asarray(ours(ids)), hf_logits(src, ids), atol=1e-4, rtol=0)


# ---- Meta Llama 1 / 2: rope.freqs, context length -------------------------------------------
@pytest.mark.parametrize(
    "norm_eps, rope_theta, n_shards, context",
    [(1e-6, 10000.0, 1, 2048), (1e-5, 10000.0, 2, 4096), (1e-5, 1e6, 2, 16384)],
    ids=["llama1", "llama2", "codellama"],
)
def test_meta_llama1_2_with_rope_freqs_import_to_transformers_logits(
    tmp_path, norm_eps, rope_theta, n_shards, context
):
    """Real Llama 1/2 shards carry a `rope.freqs` buffer, which transformers' converter skips.
    The context is the one that converter writes for --llama_version 1 / 2 (16384 for a larger
    rope_theta: Code Llama); Llama 2 is told from LLaMA-1 by its norm_eps (1e-5, not 1e-6)."""
    torch = needs_torch()
    cfg = CONFIGS["gqa"].replace(rms_norm_eps=norm_eps, rope_theta=rope_theta)
    meta = write_meta(tmp_path / "meta", cfg, random_hf_tensors(cfg, 3), n_shards, multiple_of=32)
    assert "rope.freqs" in torch.load(meta / "consolidated.00.pth", weights_only=True)
    ours = lomo_jax.from_pretrained(meta)
    assert ours.config.max_position_embeddings == context
    ids = random_ids(cfg, 2, 12)
    theirs = hf_logits(make_hf_dir(tmp_path / "hf", cfg, seed=3), ids)
    np.testing.assert_allclose(np.asarray(ours(ids)), theirs, atol=1e-4, rtol=0)


# ---- Meta Llama 3.x: RoPE scaling, context, eos ids, tied embeddings -------------------------
# What transformers' convert_llama_weights_to_hf.py writes per --llama_version (with --instruct,
# whose eos list is every id Meta's Llama 3 generation stops at).
CONTEXT_LENGTH_FOR_VERSION = {"3": 8192, "3.1": 131072, "3.2": 131072}
LLAMA3_EOS = [128001, 128008, 128009]


def llama3_config(version: str) -> lomo_jax.LlamaConfig:
    """A tiny model in a Llama 3.x release's shape: 128256 tokens, rope_theta 500000, 3.1+ scaled
    RoPE (the factor here is only the writer's flag), 3.2 tied."""
    return CONFIGS["gqa"].replace(
        vocab_size=128256,
        rope_theta=500000.0,
        rope_scaling=CONFIGS["llama3-rope"].rope_scaling if version != "3" else None,
        tie_word_embeddings=version == "3.2",
    )


def transformers_conversion(meta, version: str) -> transformers.LlamaForCausalLM:
    """transformers' converter (write_model) on a one-file Meta checkpoint, stated with
    transformers' own classes: its config for `version`, its `permute` of q/k rows."""
    torch = needs_torch()
    p = json.loads((meta / "params.json").read_text())
    loaded = torch.load(meta / "consolidated.00.pth", weights_only=True)
    dim, n_heads, n_kv, mult = p["dim"], p["n_heads"], p["n_kv_heads"], p["multiple_of"]

    def permute(w, n):
        return w.view(n, w.shape[0] // n // 2, 2, dim).transpose(1, 2).reshape(w.shape[0], dim)

    config = transformers.LlamaConfig(
        hidden_size=dim,
        intermediate_size=mult
        * ((int(p.get("ffn_dim_multiplier", 1) * int(8 * dim / 3)) + mult - 1) // mult),
        num_attention_heads=n_heads,
        num_hidden_layers=p["n_layers"],
        rms_norm_eps=p["norm_eps"],
        num_key_value_heads=n_kv,
        vocab_size=p["vocab_size"],
        rope_theta=p["rope_theta"],
        rope_scaling=None
        if version == "3"
        else {
            "factor": 32.0 if version == "3.2" else 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        max_position_embeddings=CONTEXT_LENGTH_FOR_VERSION[version],
        bos_token_id=128000,
        eos_token_id=LLAMA3_EOS,
        tie_word_embeddings=version == "3.2",
    )
    state = {
        "model.embed_tokens.weight": loaded["tok_embeddings.weight"],
        "model.norm.weight": loaded["norm.weight"],
        "lm_head.weight": loaded["output.weight"],
    }
    for i in range(p["n_layers"]):
        w = lambda k, i=i: loaded[f"layers.{i}.{k}.weight"]  # noqa: E731
        state |= {
            f"model.layers.{i}.self_attn.q_proj.weight": permute(w("attention.wq"), n_heads),
            f"model.layers.{i}.self_attn.k_proj.weight": permute(w("attention.wk"), n_kv),
            f"model.layers.{i}.self_attn.v_proj.weight": w("attention.wv"),
            f"model.layers.{i}.self_attn.o_proj.weight": w("attention.wo"),
            f"model.layers.{i}.mlp.gate_proj.weight": w("feed_forward.w1"),
            f"model.layers.{i}.mlp.down_proj.weight": w("feed_forward.w2"),
            f"model.layers.{i}.mlp.up_proj.weight": w("feed_forward.w3"),
            f"model.layers.{i}.input_layernorm.weight": w("attention_norm"),
            f"model.layers.{i}.post_attention_layernorm.weight": w("ffn_norm"),
        }
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("version", ["3", "3.1", "3.2"])
def test_meta_llama3_matches_transformers_conversion_at_position_4096(tmp_path, version):
    torch = needs_torch()
    cfg = llama3_config(version)
    # Weights large enough for attention to depend on RoPE (at std 0.02 it is nearly uniform, and
    # RoPE factor 8 instead of 32 moves these logits by 2e-6 only; at 0.3 by 3.5e-2).
    tensors = random_hf_tensors(cfg, 7, std=0.3)
    meta = write_meta(tmp_path / "meta", cfg, tensors, multiple_of=32)
    ours = lomo_jax.from_pretrained(meta)
    theirs = transformers_conversion(meta, version)
    ref = theirs.config
    assert ours.config.rope_scaling == (
        None
        if version == "3"
        else {k: v for k, v in ref.rope_parameters.items() if k != "rope_theta"}
    )
    assert ours.config.max_position_embeddings == ref.max_position_embeddings
    assert list(ours.config.eos_ids) == ref.eos_token_id and ours.config.bos_token_id == 128000
    assert ours.config.tie_word_embeddings == ref.tie_word_embeddings
    ids = random_ids(cfg, 1, 16)
    positions = 4090 + np.arange(16, dtype=np.int32)[None]
    logits = forward(
        ours.config, ours.params, jnp.asarray(ids), positions_BT=jnp.asarray(positions)
    )
    with torch.no_grad():
        expected = theirs(
            torch.from_numpy(ids).long(), position_ids=torch.from_numpy(positions).long()
        ).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)


# ---- Llama 3's tiktoken tokenizer.model -------------------------------------------------------
# Meta's llama3/tokenizer.py pre-tokenizer pattern.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEXTS = [
    "the cat sat on the mat, and then it ran away!",
    "  several   spaces\n\nnew lines\ttabs ",
    "numbers 1234567 and 3.14159; don't you'll WE'VE",
    "unicode: héllo wörld 日本語 🙂",
]


@pytest.fixture(scope="module")
def llama3_tokenizer(tmp_path_factory):
    """Llama 3's tiktoken tokenizer.model (128000 ranks)."""
    path = tmp_path_factory.mktemp("llama3_tokenizer") / "tokenizer.model"
    write_tiktoken_bpe(path)
    return path


@pytest.fixture(scope="module")
def llama3_meta(tmp_path_factory, llama3_tokenizer):
    """A Llama 3.1 Meta directory with its tiktoken tokenizer.model."""
    needs_torch()
    cfg = llama3_config("3.1")
    meta = write_meta(
        tmp_path_factory.mktemp("llama3") / "meta", cfg, random_hf_tensors(cfg, 1), multiple_of=32
    )
    shutil.copy(llama3_tokenizer, meta / "tokenizer.model")
    return meta


@pytest.fixture(scope="module")
def tiktoken_ref(llama3_tokenizer):
    """Meta's Llama 3 tokenizer: tiktoken over the same ranks and pattern."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(llama3_tokenizer))
    specials = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001}
    return tiktoken.Encoding(
        "llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )


def test_tiktoken_tokenizer_model_encodes_as_tiktoken(llama3_tokenizer, tiktoken_ref):
    tok = lomo_jax.load_tokenizer(llama3_tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (128000, 128001, 128256)
    for text in TEXTS:
        ids = tiktoken_ref.encode(text)
        assert tok.encode(text) == [128000] + ids, text
        assert tok.decode(ids) == tiktoken_ref.decode(ids) == text


@pytest.mark.slow
def test_meta_llama3_imports_generates_and_exports_its_tokenizer(
    llama3_meta, tiktoken_ref, tmp_path, capsys
):
    torch = needs_torch()
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    assert main(["import", str(llama3_meta), str(ckpt)]) == 0
    prompt = "the cat sat"
    assert main(["generate", str(ckpt), "--prompt", prompt, "--max-new-tokens", "8"]) == 0
    ours = capsys.readouterr().out
    assert main(["export", str(ckpt), str(out)]) == 0
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == (
        "PreTrainedTokenizerFast"
    )
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == LLAMA3_EOS
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    names = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
    ]
    assert hf_tok.convert_tokens_to_ids(names) == [128000, 128001, 128006, 128008, 128009]
    ids = hf_tok.encode(prompt)  # BOS first, as transformers' converter sets it up
    assert ids == [128000] + tiktoken_ref.encode(prompt)
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        gen = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert ours == hf_tok.decode(gen[0, len(ids) :], skip_special_tokens=True) + "\n"


# ---- llama2.c export.py versions 1 and 2 --------------------------------------------------------
# sha256 of llama2.c's own `export.py --version 1` / `--version 2` output for stories260K (llama2.c
# commit 350e04f, run on the weights of stories260K.bin, whose legacy export it reproduces byte for
# byte); write_llama2c must write the same files.
LLAMA2C_EXPORT_SHA256 = {
    1: "9ab1bf3d0c9900ce357fb38b0f42c3252e0ad478400bf7093efa133c8fa60723",
    2: "4767083d20669c34b654cd94b60501da98b5e795dab7717e0f1b4f003c02117c",
}


@pytest.fixture(scope="module")
def stories_exports(tmp_path_factory):
    legacy = data_path("llama2c", "stories260K.bin")
    cfg, params, _ = load(legacy)
    d = tmp_path_factory.mktemp("llama2c")
    return legacy, {
        v: write_llama2c(d / f"v{v}.bin", cfg, hf_tensors(cfg, params), version=v) for v in (1, 2)
    }


def test_llama2c_writer_reproduces_llama2c_export(stories_exports):
    _, files = stories_exports
    for v, f in files.items():
        assert hashlib.sha256(f.read_bytes()).hexdigest() == LLAMA2C_EXPORT_SHA256[v], v


def test_llama2c_version1_export_generates_the_expected_text(stories_exports):
    _, files = stories_exports
    expected = data_path("llama2c", "stories260K_greedy200_expected.txt").read_text()
    model = lomo_jax.from_pretrained(files[1], data_path("llama2c", "tok512.model"))
    assert model.generate_text("", 200) == expected


def test_llama2c_version2_dequantizes_within_half_a_step(stories_exports):
    """Q8_0 stores each group of a matrix as int8 * (max |w| / 127), the norms as float32."""
    legacy, files = stories_exports
    cfg, want, _ = load(legacy)
    cfg2, got, _ = load(files[2])
    assert cfg2 == cfg
    for (name, w), (_, q) in zip(hf_tensors(cfg, want), hf_tensors(cfg, got)):
        if name.endswith("norm.weight"):
            np.testing.assert_array_equal(q, w, err_msg=name)
        else:
            half_step = np.abs(w).max() / 127 / 2
            assert np.abs(q - w).max() <= half_step * (1 + 1e-5), name
            assert np.abs(q - w).max() > 0, name  # really quantized
