"""Every bad input: one line on stderr naming the file and the problem, exit 1, nothing written."""

import json
import sys

import numpy as np
import pytest

from convert.export import write_hf
from convert.synthetic import random_hf_tensors, write_llama2c, write_meta
from lomo_jax.cli import main
from tests.conftest import CONFIGS, data_path, edit_config, make_hf_dir, needs_torch

CFG = CONFIGS["gqa"]


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def hf_missing_shard(tmp):
    d = make_hf_dir(tmp / "src", CFG, max_shard_bytes=40_000)
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    return d, victim.name, "file not found"


def hf_truncated(tmp):
    d = make_hf_dir(tmp / "src", CFG)
    truncate(d / "model.safetensors")
    return d, "model.safetensors", "truncated or corrupt"


def hf_unknown_tensor(tmp):
    tensors = list(random_hf_tensors(CFG)) + [
        ("model.layers.0.mystery.weight", np.ones(3, np.float32))
    ]
    return (
        write_hf(tmp / "src", CFG, iter(tensors)),
        "model.safetensors",
        "unknown tensor name 'model.layers.0.mystery.weight'",
    )


def hf_missing_tensor(tmp):
    tensors = [
        (n, a) for n, a in random_hf_tensors(CFG) if n != "model.layers.1.mlp.up_proj.weight"
    ]
    return (
        write_hf(tmp / "src", CFG, iter(tensors)),
        "src",
        "missing tensor 'model.layers.1.mlp.up_proj.weight'",
    )


def hf_wrong_shape(tmp):
    d = make_hf_dir(tmp / "src", CFG)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 200
    (d / "config.json").write_text(json.dumps(cfg))
    return d, "model.safetensors", "the config says (64, 200)"


def hf_unsupported_family(tmp):
    d = edit_config(make_hf_dir(tmp / "src", CFG), model_type="gemma2")
    return d, "config.json", "model_type 'gemma2' is not supported"


def hf_qwen_sliding_layers(tmp):
    d = edit_config(make_hf_dir(tmp / "src", CFG), model_type="qwen2", use_sliding_window=True)
    return d, "config.json", "use_sliding_window=True is not supported"


def hf_unsupported_rope(tmp):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    d = edit_config(make_hf_dir(tmp / "src", CFG), rope_scaling=yarn)
    return d, "config.json", "unsupported rope_scaling type 'yarn'"


def hf_unsupported_activation(tmp):
    """transformers would run this model with GELU; ours computes SiLU: refuse, not import."""
    d = edit_config(make_hf_dir(tmp / "src", CFG), hidden_act="gelu")
    return d, "config.json", "hidden_act 'gelu' is not supported"


def hf_config(**changes):
    """An HF checkpoint whose config.json has CHANGES (null: derived, as if absent)."""

    def case(tmp):
        return (
            edit_config(make_hf_dir(tmp / "src", CFG), **changes),
            "config.json",
            "invalid config: ",
        )

    case.__name__ = "hf_config_" + "_".join(f"{k}={v}" for k, v in changes.items())
    return case


def hf_config_not_an_object(tmp):
    d = make_hf_dir(tmp / "src", CFG)
    (d / "config.json").write_text("[64, 4]")
    return d, "config.json", "expected a JSON object of settings, got list"


def hf_bad_json(tmp):
    d = make_hf_dir(tmp / "src", CFG)
    (d / "config.json").write_text("{not json")
    return d, "config.json", "invalid JSON"


def meta_truncated_shard(tmp):
    needs_torch()
    d = write_meta(tmp / "src", CFG, random_hf_tensors(CFG), n_shards=2, multiple_of=32)
    truncate(d / "consolidated.01.pth")
    return d, "consolidated.01.pth", "cannot read PyTorch checkpoint"


def llama2c_truncated(tmp):
    f = tmp / "model.bin"
    header = np.array([64, 192, 2, 4, 2, 96, 32], np.int32).tobytes()
    f.write_bytes(header + np.zeros(1000, np.float32).tobytes())
    return f, "model.bin", "truncated"


def llama2c_v1_truncated(tmp):
    """A version-1 export cut short: the message gives its size and the one its header implies."""
    f = write_llama2c(tmp / "model.bin", CFG, random_hf_tensors(CFG), version=1)
    full = f.stat().st_size
    truncate(f, keep=0.75)
    return (
        f,
        "model.bin",
        f"is {f.stat().st_size} bytes, its llama2.c version 1 header implies {full}",
    )


def llama2c_v2_trailing_data(tmp):
    f = write_llama2c(tmp / "model.bin", CFG, random_hf_tensors(CFG), version=2, group_size=32)
    full = f.stat().st_size
    f.write_bytes(f.read_bytes() + bytes(8))
    return f, "model.bin", f"is {full + 8} bytes, its llama2.c version 2 header implies {full}"


def llama2c_unknown_version(tmp):
    f = write_llama2c(tmp / "model.bin", CFG, random_hf_tensors(CFG), version=1)
    data = bytearray(f.read_bytes())
    data[4:8] = np.int32(3).tobytes()
    f.write_bytes(bytes(data))
    return f, "model.bin", "llama2.c export version 3 is not supported"


def missing_source(tmp):
    return tmp / "nowhere", "nowhere", "no such file or directory"


CONFIG_CASES = [
    (hf_config(num_attention_heads=0), "num_attention_heads must be a positive integer, got 0"),
    (hf_config(hidden_size="64"), "hidden_size must be a positive integer, got '64'"),
    (hf_config(num_hidden_layers=2.5), "num_hidden_layers must be a positive integer, got 2.5"),
    (hf_config(vocab_size=-3), "vocab_size must be a positive integer, got -3"),
    (hf_config(num_key_value_heads=0), "num_key_value_heads must be a positive integer, got 0"),
    (
        hf_config(num_attention_heads=6, num_key_value_heads=2, head_dim=None),
        "hidden_size=64 is not a multiple of num_attention_heads=6",
    ),
    (hf_config(rms_norm_eps="small"), "rms_norm_eps must be a positive number, got 'small'"),
    (hf_config(rope_scaling=[8.0]), "rope_scaling must be an object, got [8.0]"),
    (hf_config(tie_word_embeddings="no"), "tie_word_embeddings must be true or false, got 'no'"),
    (hf_config(eos_token_id="</s>"), "eos_token_id must be a token id (an integer >= 0), got '<"),
    (hf_config(head_dim=15), "head_dim must be even (RoPE turns pairs), got 15"),
    (
        hf_config(rope_scaling={"rope_type": "linear"}),
        "rope_scaling factor must be a positive number, got None",
    ),
    (
        hf_config(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 4.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        ),
        "rope_scaling high_freq_factor must be above low_freq_factor",
    ),
]

CASES = [
    hf_missing_shard,
    hf_truncated,
    hf_unknown_tensor,
    hf_missing_tensor,
    hf_wrong_shape,
    hf_unsupported_family,
    hf_unsupported_activation,
    hf_qwen_sliding_layers,
    hf_unsupported_rope,
    hf_bad_json,
    meta_truncated_shard,
    llama2c_truncated,
    llama2c_v1_truncated,
    llama2c_v2_trailing_data,
    llama2c_unknown_version,
    missing_source,
    hf_config_not_an_object,
    *(make for make, _ in CONFIG_CASES),
]
PROBLEMS = {make.__name__: problem for make, problem in CONFIG_CASES}


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_import_is_one_line_and_leaves_nothing(tmp_path, capsys, case):
    src, file_part, problem = case(tmp_path)
    problem += PROBLEMS.get(case.__name__, "")
    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    assert main(["import", str(src), str(out_parent / "ckpt")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("lomo-jax: error: ") and file_part in err and problem in err, err
    assert list(out_parent.iterdir()) == [], "a partial output was left behind"


def test_existing_output_is_never_touched(tmp_path, capsys):
    src = make_hf_dir(tmp_path / "src", CFG)
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["import", str(src), str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me" and len(list(tmp_path.iterdir())) == 2


def test_a_pickle_without_torch_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    """torch is optional: a safetensors model never needs it, a .bin / .pth says what does."""
    src = make_hf_dir(tmp_path / "src", CFG)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    assert main(["import", str(src), str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr().err.strip()
    pickle = src / "pytorch_model.bin"
    assert (
        err
        == f"lomo-jax: error: {pickle}: a PyTorch pickle needs torch: pip install 'lomo-jax[torch]'"
    )
    assert not (tmp_path / "ckpt").exists()


def test_export_of_a_non_checkpoint_fails_cleanly(tmp_path, capsys):
    src = make_hf_dir(tmp_path / "src", CFG)
    assert main(["export", str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "not a lomo-jax checkpoint" in err and str(src) in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["tok.model", "notes.txt"])
def test_bad_tokenizer_fails_cleanly(tmp_path, capsys, name):
    src = make_hf_dir(tmp_path / "src", CFG)
    bogus = tmp_path / name
    bogus.write_bytes(b"not a sentencepiece model")
    # Refused by the import, not only later by generate.
    assert main(["import", str(src), str(tmp_path / "ckpt"), "--tokenizer", str(bogus)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lomo-jax: error: {bogus}: not a SentencePiece model"), err
    assert "\n" not in err and not (tmp_path / "ckpt").exists()


def test_damaged_checkpoint_config_fails_cleanly(tmp_path, capsys):
    src = make_hf_dir(tmp_path / "src", CFG)
    assert main(["import", str(src), str(tmp_path / "ckpt")]) == 0
    config = tmp_path / "ckpt" / "config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), num_attention_heads=0)))
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"lomo-jax: error: {config}: invalid config: "
        "num_attention_heads must be a positive integer, got 0"
    )
    assert not (tmp_path / "out").exists()


def test_damaged_tiktoken_tokenizer_fails_cleanly(tmp_path, capsys):
    src = make_hf_dir(tmp_path / "src", CFG)
    bogus = tmp_path / "tokenizer.model"
    bogus.write_bytes(b"IQ== 0\nIg== 1\nIw== two\n")  # Llama 3's tiktoken format, line 3 damaged
    # Refused by the import, not only later by generate.
    assert main(["import", str(src), str(tmp_path / "ckpt"), "--tokenizer", str(bogus)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "tokenizer.model: line 3 is not a tiktoken" in err, err
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("command", ["import", "export"])
def test_output_under_a_file_fails_cleanly(tmp_path, capsys, command):
    src = make_hf_dir(tmp_path / "src", CFG)
    if command == "export":
        assert main(["import", str(src), str(tmp_path / "ckpt")]) == 0
        src = tmp_path / "ckpt"
    (tmp_path / "notes.txt").write_text("x")
    out = tmp_path / "notes.txt" / "out"
    assert main([command, str(src), str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"lomo-jax: error: {out}: cannot be created, {tmp_path / 'notes.txt'} is a file"


@pytest.mark.parametrize(
    "flags, problem",
    [
        (["--temperature", "-1"], "temperature must be at least 0 (0 = greedy), got -1.0"),
        (["--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
        (["--max-new-tokens", "-3"], "max_new_tokens must be at least 0, got -3"),
    ],
)
def test_bad_sampling_options_fail_cleanly(tmp_path, capsys, flags, problem):
    src = make_hf_dir(tmp_path / "src", CFG)
    tok = data_path("llama2c", "tok512.model")
    assert main(["generate", str(src), "--tokenizer", str(tok), *flags]) == 1
    assert capsys.readouterr().err.strip() == f"lomo-jax: error: {problem}"


@pytest.mark.parametrize(
    "checksums, problem",
    [
        (True, "leaves.json: 17 bytes, 729 when saved (cut short?)"),
        (False, "leaves.json: not a lomo-jax parameter index"),  # saved before checksums were
    ],
)
def test_damaged_checkpoint_index_fails_cleanly(tmp_path, capsys, checksums, problem):
    src = make_hf_dir(tmp_path / "src", CFG)
    assert main(["import", str(src), str(tmp_path / "ckpt")]) == 0
    (tmp_path / "ckpt" / "params" / "leaves.json").write_text('["old", "format"]')
    if not checksums:
        (tmp_path / "ckpt" / "params" / "checksums.json").unlink()
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert problem in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, problem",
    [
        (
            ["eval", "m", "--data", "d", "--batch-size", "0"],
            "--batch-size: must be at least 1, got 0",
        ),
        (["eval", "m", "--data", "d", "--seq-len", "1"], "--seq-len: must be at least 2, got 1"),
        (
            ["export", "m", "o", "--max-shard-size", "-1"],
            "--max-shard-size: must be positive and at most 1048576 (1 TiB), got -1.0",
        ),
    ],
)
def test_bad_flag_values_are_refused_by_the_parser(capsys, argv, problem):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("lomo-jax: error: ") and problem in err, err
