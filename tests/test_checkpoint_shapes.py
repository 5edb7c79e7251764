"""A checkpoint's config.json is checked against its weights (their shapes from
lomo_jax.parameters.TABLE) when it is read: an edited config is one line naming both files, for
every command, before anything is written."""

import json
import shutil

import pytest

from lomo_jax.cli import main
from tests.conftest import CONFIGS, data_path, make_hf_dir, random_ids, train_args
from tests.test_train_cli import write_rows

CFG = CONFIGS["gqa"]  # 2 layers, hidden 64, mlp 192, 4 heads, 2 kv heads, vocab 96


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("saved")
    assert main(["import", str(make_hf_dir(d / "hf", CFG)), str(d / "ckpt")]) == 0
    return d / "ckpt", write_rows(d / "rows.jsonl", random_ids(CFG, 4, 16))


EDITS = {
    "intermediate_size": (200, "'layers.mlp.gate_proj.kernel' is [2, 64, 192]"),
    "num_hidden_layers": (3, "'layers.input_layernorm.weight' is [2, 64]"),
    "vocab_size": (100, "'embed.embedding' is [96, 64]"),
    "num_key_value_heads": (4, "'layers.self_attn.k_proj.kernel' is [2, 64, 32]"),
    "tie_word_embeddings": (True, "'lm_head.kernel' is in the weights"),
}


def commands(ckpt, rows, out):
    tok = str(data_path("llama2c", "tok512.model"))
    return {
        "generate": ["generate", str(ckpt), "--tokenizer", tok, "--max-new-tokens", "2"],
        "eval": ["eval", str(ckpt), "--data", str(rows), "--seq-len", "16"],
        "export": ["export", str(ckpt), str(out)],
        "train": train_args(
            ckpt, rows, out, "--steps", "1", "--batch-size", "2", "--seq-len", "16"
        ),
        "plan": ["plan", "--model", str(ckpt), "--seq-len", "16"],
    }


@pytest.mark.parametrize("command", ["generate", "eval", "export", "train", "plan"])
@pytest.mark.parametrize("key", list(EDITS))
def test_a_config_that_disagrees_with_the_weights_is_one_line(
    tmp_path, saved, capsys, command, key
):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved[0], ckpt)
    config = ckpt / "config.json"
    value, found = EDITS[key]
    config.write_text(json.dumps(dict(json.loads(config.read_text()), **{key: value})))
    out = tmp_path / "out"
    assert main(commands(ckpt, saved[1], out)[command]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err), err
    assert err[-1].startswith(f"lomo-jax: error: {config}: does not fit {ckpt / 'params'}: ")
    assert found in err[-1], err[-1]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_refused_train_leaves_nothing_in_the_way_of_the_retry(tmp_path, saved, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved[0], ckpt)
    config = ckpt / "config.json"
    good = config.read_text()
    config.write_text(json.dumps(dict(json.loads(good), intermediate_size=200)))
    argv = commands(ckpt, saved[1], tmp_path / "run")["train"]
    assert main(argv) == 1
    config.write_text(good)
    assert main(argv) == 0
