"""Models named without their weights: the presets, and `lomo-jax plan --model` on a directory
holding only config.json, on a Hub id whose config alone is cached, on a preset's Hub id."""

import json
import logging
import shutil

import pytest

from convert.sources import detect
from lomo_jax.cli import main
from lomo_jax.config import LlamaConfig
from lomo_jax.presets import HUB_IDS, PRESETS, find_config
from tests.conftest import CONFIGS, make_hf_dir

# Parameters (billions) as the model cards give them.
PUBLISHED = {
    "llama-7b": 6.74,
    "llama3-8b": 8.03,
    "llama3-70b": 70.6,
    "llama3.1-8b": 8.03,
    "llama3.1-70b": 70.6,
    "qwen2.5-7b": 7.61,
    "qwen2.5-72b": 72.7,
    "qwen3-8b": 8.2,
    "qwen3-32b": 32.8,
    "mistral-7b": 7.25,
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_presets_have_their_models_sizes(name):
    cfg = PRESETS[name]
    assert cfg.num_params / 1e9 == pytest.approx(PUBLISHED[name], rel=5e-3)
    assert LlamaConfig.from_hf_dict(cfg.to_hf_dict()) == cfg  # what an export would write
    assert HUB_IDS[name].count("/") == 1


def test_presets_keep_their_families_traits():
    assert PRESETS["llama3.1-8b"].rope_scaling["rope_type"] == "llama3"
    assert PRESETS["llama3.1-8b"].max_position_embeddings == 131072
    assert PRESETS["qwen2.5-7b"].qkv_bias and not PRESETS["qwen3-8b"].qkv_bias
    assert PRESETS["qwen3-32b"].qk_norm and PRESETS["qwen3-32b"].head_dim == 128
    assert PRESETS["mistral-7b"].sliding_window is None  # v0.3 attends over its whole context


def _config_only(tmp_path, cfg=CONFIGS["gqa"]):
    full = make_hf_dir(tmp_path / "full", cfg)
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(full / "config.json", only / "config.json")
    return full, only


def test_plan_reads_a_directory_with_only_config_json(tmp_path, capsys):
    full, only = _config_only(tmp_path)
    assert find_config(only) == detect(full).config
    assert main(["plan", "--model", str(only), "--seq-len", "32", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["param_bytes"] == 2 * CONFIGS["gqa"].num_params  # bfloat16
    assert (row["seq_len"], row["method"], row["fits"]) == (32, "fused-adalomo", True)


def test_a_bad_config_json_is_one_line_naming_it(tmp_path, capsys):
    _, only = _config_only(tmp_path)
    (only / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_act": "gelu"}))
    assert main(["plan", "--model", str(only)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"lomo-jax: error: {only / 'config.json'}: ")
    assert "gelu" in err


def _cache_with_config_only(tmp_path, repo_id: str, config_file):
    """A Hugging Face cache holding only `repo_id`'s config.json, as `hf download REPO
    config.json` leaves it (a blob, linked from the snapshot refs/main names)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "config-blob").write_bytes(config_file.read_bytes())
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").symlink_to("../../blobs/config-blob")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return tmp_path / "hub"


def test_a_hub_id_whose_config_alone_is_cached(tmp_path, monkeypatch):
    from huggingface_hub import constants

    full, only = _config_only(tmp_path)
    monkeypatch.setattr(
        constants,
        "HF_HUB_CACHE",
        str(_cache_with_config_only(tmp_path, "org/tiny", full / "config.json")),
    )
    assert find_config("org/tiny") == detect(full).config
    # The cache wins over a preset of the same repository.
    llama = json.loads((full / "config.json").read_text())
    (only / "config.json").write_text(json.dumps(llama | {"num_hidden_layers": 3}))
    cache = _cache_with_config_only(tmp_path / "other", HUB_IDS["llama-7b"], only / "config.json")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert find_config(HUB_IDS["llama-7b"]).num_hidden_layers == 3


def test_an_uncached_hub_id_of_a_preset_is_the_preset(caplog):
    with caplog.at_level(logging.INFO, logger="lomo_jax"):
        assert find_config("meta-llama/Llama-3.1-8B") == PRESETS["llama3.1-8b"]
    assert "the preset llama3.1-8b" in caplog.text


def test_an_uncached_unknown_hub_id_is_one_line(capsys):
    assert main(["plan", "--model", "no-such-org/no-such-model"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("lomo-jax: error: no-such-org/no-such-model: ")
    assert "hf download no-such-org/no-such-model config.json" in err
