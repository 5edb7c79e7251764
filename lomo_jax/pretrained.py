"""The user-facing model object: a config, a parameter tree and (optionally) a tokenizer."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from lomo_jax import checkpoint, hub
from lomo_jax.compiler import jit
from lomo_jax.config import LlamaConfig
from lomo_jax.generate import GenerateError, generate
from lomo_jax.generation_config import GenerationConfig
from lomo_jax.lock import claim
from lomo_jax.model import cast, forward, param_shapes
from lomo_jax.sharding import Layout, abstract, put
from lomo_jax.tokenizer import Tokenizer, TokenizerError, tokenizer_from


@functools.partial(jit, static_argnums=0)
def _logits(cfg, params, ids_BT, segment_ids_BT):
    return forward(cfg, params, ids_BT, segment_ids_BT=segment_ids_BT)


@dataclasses.dataclass
class LlamaModel:
    config: LlamaConfig
    params: Any
    tokenizer: Tokenizer | None = None
    # End ids and sampling defaults; None: the ones `config` implies.
    generation_config: GenerationConfig | None = None

    def __post_init__(self):
        if self.generation_config is None:
            self.generation_config = GenerationConfig.derived(self.config)

    def __call__(self, ids_BT, segment_ids_BT=None) -> jax.Array:
        """int32 token ids [batch, seq] -> float32 logits [batch, seq, vocab]."""
        ids_BT = jnp.asarray(ids_BT, jnp.int32)
        return _logits(self.config, self.params, ids_BT, segment_ids_BT)

    @property
    def end_ids(self) -> tuple[int, ...]:
        """The ids generation stops at: the generation config's and the config's."""
        return self.generation_config.end_ids(self.config)

    def generate(
        self,
        prompt_ids,
        max_new_tokens: int | None = None,
        *,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int = 0,
    ) -> list[list[int]]:
        """New tokens for each prompt, each cut after its first end id. What is not given comes
        from the generation config (see `GenerationConfig.sampling`, `.max_new_tokens`)."""
        g = self.generation_config
        sampling = g.sampling(temperature, top_p, top_k)
        n = g.max_new_tokens(max_new_tokens)
        return generate(self.config, self.params, prompt_ids, n, sampling, seed, self.end_ids)

    def generate_text(
        self,
        prompt: str,
        max_new_tokens: int | None = None,
        *,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int = 0,
    ) -> str:
        """Decoded continuation of BOS + prompt (an empty prompt means BOS alone)."""
        tok = self.require_tokenizer()
        if not prompt and self.config.bos_token_id is None:
            raise TokenizerError("this model has no BOS token to start from; give a --prompt")
        ids = tok.encode(prompt, bos=True) if prompt else [self.config.bos_token_id]
        out = self.generate(
            [ids], max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
        )
        return self.reply_text(out[0])

    def chat(
        self,
        messages: list[dict],
        max_new_tokens: int | None = None,
        *,
        template: str | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int = 0,
    ) -> str:
        """The assistant's reply to `messages` (role / content dicts), rendered with the chat
        template (the tokenizer's, or `template`) and its generation prompt."""
        ids = self.require_tokenizer().encode_chat(
            messages, add_generation_prompt=True, template=template
        )
        out = self.generate(
            [ids], max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
        )
        return self.reply_text(out[0])

    def reply_text(self, tokens: list[int]) -> str:
        """Generated tokens as text, without the end id that stopped them."""
        if tokens and tokens[-1] in self.end_ids:
            tokens = tokens[:-1]
        return self.require_tokenizer().decode(tokens)

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise GenerateError("this checkpoint has no tokenizer; pass --tokenizer when importing")
        return self.tokenizer

    def save_pretrained(self, out: str | Path, overwrite: bool = False) -> Path:
        files = self.tokenizer.files if self.tokenizer else ()
        with claim(out, "save_pretrained"):
            return checkpoint.save_pretrained(
                out, self.config, self.params, files, overwrite, self.generation_config
            )


def _model_info(path: Path, tokenizer: str | Path | None) -> tuple[LlamaConfig, list[Path]]:
    if checkpoint.is_checkpoint(path):
        return checkpoint.read_model_info(path)
    from convert.sources import detect

    src = detect(path, tokenizer)
    src.check_size()
    return src.config, src.tokenizer_files


def from_pretrained(
    path: str | Path,
    tokenizer: str | Path | None = None,
    dtype: Any = None,
    layout: Layout | None = None,
    weights: bool = True,
) -> LlamaModel:
    """Loads a lomo-jax checkpoint, a Hugging Face directory or Hub id (`org/name`, from the
    local Hugging Face cache), a Meta original directory or a llama2.c `.bin`; weights from other
    formats are converted in memory.

    With a `layout` each device receives only its shards: a checkpoint is read shard by shard,
    a converted model goes from host memory straight into the shards. With `weights=False` only
    the config and tokenizer are read and `params` are `jax.ShapeDtypeStruct`s of `dtype` (laid
    out on `layout`): for a resumed run, whose weights come from its own checkpoint."""
    path = hub.resolve(path)
    if weights:
        cfg, params, files = _read(path, tokenizer, dtype, layout)
    else:
        if dtype is None:
            raise ValueError("from_pretrained(weights=False) needs the dtype of the weights")
        cfg, files = _model_info(path, tokenizer)
        params = param_shapes(cfg, dtype)
        if layout is not None:
            params = abstract(params, layout.params(params))
    if tokenizer is not None:
        files = [Path(tokenizer)]
    return LlamaModel(cfg, params, tokenizer_from(files), GenerationConfig.of(path, cfg))


def read_weights(
    path: str | Path,
    tokenizer: str | Path | None = None,
    dtype: Any = None,
    layout: Layout | None = None,
) -> Any:
    """The weights `from_pretrained` would give, alone: for a model first loaded with
    `weights=False` (a training run compiles its step before any weight is in memory)."""
    return _read(hub.resolve(path), tokenizer, dtype, layout)[1]


def _read(path: Path, tokenizer, dtype, layout) -> tuple[LlamaConfig, Any, list[Path]]:
    if checkpoint.is_checkpoint(path):
        cfg, params, files = checkpoint.load_pretrained(path, layout and layout.param)
        if dtype is not None:
            params = cast(params, dtype)
        return cfg, params, files
    from convert import load

    cfg, params, files = load(path, tokenizer, dtype)
    params = put(params, layout.params(params)) if layout else jax.tree.map(jnp.asarray, params)
    return cfg, params, files
