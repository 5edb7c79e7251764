"""Converters: HF round trip bit for bit, Meta model-parallel shards, the real llama2.c model."""

import json

import ml_dtypes
import numpy as np
import pytest
import transformers
from safetensors import safe_open

import lomo_jax
from convert import export_hf, import_checkpoint
from convert.layout import hf_to_meta_rows, meta_to_hf_rows
from convert.synthetic import random_hf_tensors, write_meta
from lomo_jax.cli import main
from tests.conftest import CONFIGS, data_path, make_hf_dir, needs_torch, random_ids


def read_safetensors_dir(d):
    """{name: (dtype, array)} through the safetensors package (an independent reader)."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, framework="numpy") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                out[k] = (t.dtype, t)
    return out


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["single", "sharded", "pytorch_bin"])
def test_hf_import_export_roundtrip_is_bit_exact(tmp_path, dtype, layout):
    if layout == "pytorch_bin":
        needs_torch()
    cfg = CONFIGS["gqa"]
    kw = {"sharded": dict(max_shard_bytes=40_000), "pytorch_bin": dict(fmt="bin")}.get(layout, {})
    src = make_hf_dir(tmp_path / "hf", cfg, dtype=dtype, **kw)
    import_checkpoint(src, tmp_path / "ckpt")
    export_hf(
        tmp_path / "ckpt",
        tmp_path / "out",
        max_shard_bytes=40_000 if layout == "sharded" else 2**30,
    )
    if layout == "sharded":
        assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    theirs = dict(random_hf_tensors(cfg, 0, dtype))
    ours = read_safetensors_dir(tmp_path / "out")
    assert set(ours) == set(theirs)
    for name, a in theirs.items():
        t_dtype, t_bytes = ours[name]
        assert t_bytes.tobytes() == np.ascontiguousarray(a).tobytes(), name
    exported_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert lomo_jax.LlamaConfig.from_hf_dict(exported_cfg) == cfg


def test_export_loads_in_transformers_with_same_logits(tmp_path):
    torch = needs_torch()
    cfg = CONFIGS["mha-tied"]
    model = lomo_jax.from_pretrained(make_hf_dir(tmp_path / "hf", cfg))
    model.save_pretrained(tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "out")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = random_ids(cfg, 1, 12)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), theirs, atol=1e-4, rtol=0)


def test_rope_row_permutation_is_invertible_and_matches_transformers():
    """meta_to_hf_rows is transformers' convert_llama_weights_to_hf `permute`."""
    torch = needs_torch()
    w = np.arange(8 * 2 * 3, dtype=np.float32).reshape(16, 3)
    n_heads, dim1, dim2 = 2, 16, 3
    ref = torch.from_numpy(w).view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2)
    np.testing.assert_array_equal(meta_to_hf_rows(w, n_heads), ref.reshape(dim1, dim2).numpy())
    np.testing.assert_array_equal(hf_to_meta_rows(meta_to_hf_rows(w, n_heads), n_heads), w)


def test_meta_checkpoint_split_over_two_files_imports_to_same_logits(tmp_path):
    # dim 64, multiple_of 32 -> Meta's FFN size rule gives 192, the config's intermediate size.
    needs_torch()
    cfg = CONFIGS["gqa"]
    hf = lomo_jax.from_pretrained(make_hf_dir(tmp_path / "hf", cfg, seed=5))
    meta = write_meta(tmp_path / "meta", cfg, random_hf_tensors(cfg, 5), n_shards=2, multiple_of=32)
    assert len(list(meta.glob("consolidated.*.pth"))) == 2
    import_checkpoint(meta, tmp_path / "ckpt")
    ours = lomo_jax.from_pretrained(tmp_path / "ckpt")
    assert ours.config.intermediate_size == cfg.intermediate_size
    ids = random_ids(cfg, 2, 16)
    np.testing.assert_allclose(np.asarray(ours(ids)), np.asarray(hf(ids)), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    """The real stories260K model, imported through the CLI."""
    out = tmp_path_factory.mktemp("stories") / "ckpt"
    rc = main(
        [
            "import",
            str(data_path("llama2c", "stories260K.bin")),
            str(out),
            "--tokenizer",
            str(data_path("llama2c", "tok512.model")),
        ]
    )
    assert rc == 0
    return out


def test_stories260k_greedy_generation_is_byte_exact(stories, capsys):
    expected = data_path("llama2c", "stories260K_greedy200_expected.txt").read_text()
    assert main(["generate", str(stories), "--max-new-tokens", "200"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_stories260k_exported_to_hf_generates_the_same_text(stories, tmp_path):
    torch = needs_torch()
    expected = data_path("llama2c", "stories260K_greedy200_expected.txt").read_text()
    assert main(["export", str(stories), str(tmp_path / "hf")]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    tok = lomo_jax.load_tokenizer(tmp_path / "hf" / "tokenizer.model")
    with torch.no_grad():
        out = hf.generate(torch.tensor([[tok.bos_id]]), max_new_tokens=200, do_sample=False)
    assert tok.decode(out[0, 1:].tolist()) == expected
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.decode(out[0, 1:].tolist(), skip_special_tokens=True) == expected
