"""Hugging Face peft's LoRA adapter directory, in and out: `adapter_config.json` (`LoraConfig`
fields) and `adapter_model.safetensors` (or the older `adapter_model.bin`), keyed
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in] / `lora_B.weight`
[out, r] -- the names, shapes and layout `lomo_jax.parameters.TABLE` gives each factor row.
`PeftModel.from_pretrained(model, DIR)` loads what `write_adapter` writes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from flax.traverse_util import unflatten_dict

from convert import safetensors_file, torch_pickles
from convert.errors import ConversionError
from convert.layout import slot_value, slots
from convert.sources import _read_json
from lomo_jax.config import LlamaConfig
from lomo_jax.lora import FACTORS, LoraConfig, LoraConfigError, delta, factor_rows

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_BIN_FILE = "adapter_model.bin"
ADAPTER_DIR = "adapter"  # where `lomo-jax export --peft` puts the adapter, beside its base


def _node(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def adapter_tensors(cfg: LlamaConfig, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(peft name, torch-layout view) of every factor of every layer in `params`."""
    for p in factor_rows(cfg):
        stack = _node(params, p.path)
        for i in range(cfg.num_hidden_layers):
            yield p.hf_name.format(i=i), np.asarray(stack[i]).T


def merged_tensors(cfg: LlamaConfig, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """`hf_tensors` of the model with its adapter merged, W + (alpha / r) A B, one layer at a
    time; as peft's `merge_and_unload` computes it: the sum in float32, rounded to W's dtype."""
    for s in slots(cfg):
        w = slot_value(params, s)
        module = s.param.path[:-1]
        if s.param.path[-1] == "kernel" and module[-1] in cfg.lora.targets:
            a, b = (_node(params, (*module, f))[s.layer] for f in FACTORS)
            w = (w.astype(np.float32) + np.asarray(delta(cfg, a, b))).astype(w.dtype)
        yield s.hf_name, w.T if s.param.transposed else w


def write_adapter(out: Path, cfg: LlamaConfig, params: dict, base_model: str | None) -> Path:
    """The adapter of `params` (a tree holding `cfg.lora`'s factors) as peft's files in `out`;
    `base_model` is what adapter_config.json names as the base."""
    out.mkdir(parents=True, exist_ok=True)
    safetensors_file.write(out / WEIGHTS_FILE, list(adapter_tensors(cfg, params)), {"format": "pt"})
    config = cfg.lora.to_peft(base_model)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_lora_config(directory: str | Path, layers: int) -> LoraConfig:
    """The LoRA settings of a peft adapter directory, for a model of `layers` layers."""
    f = Path(directory) / CONFIG_FILE
    try:
        return LoraConfig.from_peft(_read_json(f), layers)
    except LoraConfigError as e:
        raise ConversionError(f, str(e)) from None


def _tensors(directory: Path) -> Iterator[tuple[str, str, np.ndarray]]:
    st, pt = directory / WEIGHTS_FILE, directory / _BIN_FILE
    if st.is_file():
        for name, a in safetensors_file.read(st):
            yield str(st), name, a
    elif pt.is_file():
        for name, t in torch_pickles.load(pt).items():
            yield str(pt), name, torch_pickles.to_numpy(t)
    else:
        raise ConversionError(directory, f"no {WEIGHTS_FILE} or {_BIN_FILE}")


def read_adapter(directory: str | Path, cfg: LlamaConfig) -> tuple[LlamaConfig, dict]:
    """(`cfg` with the adapter's LoRA settings, its factors as a float32 numpy tree) of a peft
    adapter for a model of config `cfg`; every tensor checked against the table."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConversionError(directory, "not a directory (expected a peft adapter)")
    cfg = cfg.replace(lora=read_lora_config(directory, cfg.num_hidden_layers))
    rows = factor_rows(cfg)
    slots = {p.hf_name.format(i=i): (p, i) for p in rows for i in range(cfg.num_hidden_layers)}
    tree = {p.path: np.empty(p.shape(cfg), np.float32) for p in rows}
    filled: set[str] = set()
    for file, name, a in _tensors(directory):
        if name not in slots:
            raise ConversionError(file, f"unexpected tensor {name!r} for this model and config")
        p, i = slots[name]
        if tuple(a.shape) != p.hf_shape(cfg):
            raise ConversionError(
                file, f"tensor {name!r} has shape {tuple(a.shape)}, expected {p.hf_shape(cfg)}"
            )
        tree[p.path][i] = a.T
        filled.add(name)
    missing = [n for n in slots if n not in filled]
    if missing:
        raise ConversionError(directory, f"missing tensor {missing[0]!r}")
    return cfg, unflatten_dict(tree)
