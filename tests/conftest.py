"""Shared fixtures: tiny LLaMA configs covering the layouts, random checkpoints, the real data."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LOMO_JAX_CACHE", tempfile.mkdtemp(prefix="lomo_jax_cache_"))

import lomo_jax  # noqa: E402
from lomo_jax import cuda_plugin  # noqa: E402

lomo_jax.configure()  # as the CLI: the memory tests' plans are the CLI's
cuda_plugin.import_jax()  # the CUDA plugin `make install` adds, on a machine without a GPU

from convert.export import write_hf  # noqa: E402
from convert.synthetic import random_hf_tensors  # noqa: E402
from lomo_jax.config import LlamaConfig  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)
CONFIGS = {
    "gqa": LlamaConfig(**TINY, num_key_value_heads=2),
    "mha-tied": LlamaConfig(**TINY, tie_word_embeddings=True),
    "llama3-rope": LlamaConfig(
        **TINY,
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "head-dim-bias-linear": LlamaConfig(
        **TINY,
        num_key_value_heads=1,
        head_dim=24,
        attention_bias=True,
        mlp_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
}


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers",
        "slow: whole training runs, several processes, LLaMA-7B-sized plans; "
        '`pytest -m "not slow"` leaves them out (make test runs everything)',
    )


def data_path(*parts: str) -> Path:
    p = DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"reference data {p} is absent (expected ../shared/data beside the repo)")
    return p


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def any_config(request) -> LlamaConfig:
    return CONFIGS[request.param]


def make_hf_dir(path: Path, cfg: LlamaConfig, seed: int = 0, dtype=np.float32, **kw) -> Path:
    return write_hf(path, cfg, random_hf_tensors(cfg, seed, dtype), **kw)


def edit_config(model_dir: Path, **changes) -> Path:
    """`model_dir` with `changes` merged into its config.json."""
    f = model_dir / "config.json"
    f.write_text(json.dumps(json.loads(f.read_text()) | changes))
    return model_dir


def random_ids(cfg: LlamaConfig, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length), dtype=np.int32)


def train_args(src, data, out, *flags: str) -> list[str]:
    """`lomo-jax train` arguments for model SRC, data file DATA and run directory OUT."""
    return ["train", "--model", str(src), "--data", str(data), "--out", str(out), *flags]


def needs_torch():
    """torch, or a skip saying which extra installs it: the PyTorch references (transformers'
    models, lomo-optim) and pickled checkpoints need it; everything else runs without."""
    return pytest.importorskip(
        "torch", reason="needs torch, the PyTorch reference: pip install -e '.[reference]'"
    )
