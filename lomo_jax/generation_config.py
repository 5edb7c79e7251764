"""A model's `generation_config.json`: the Hugging Face file that says which ids end a reply (an
instruct model often has several: Llama 3's `<|eot_id|>` and `<|end_of_text|>`, Qwen's
`<|im_end|>` and `<|endoftext|>`) and how to sample by default.

It travels through import, training and export as it was read, byte for byte, keys lomo-jax does
not use included. A model without one (Meta, llama2.c) gets what transformers'
`GenerationConfig.from_model_config` makes of its config: its BOS, end and pad ids."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from lomo_jax.atomic import write_file
from lomo_jax.config import LlamaConfig
from lomo_jax.errors import UserError
from lomo_jax.generate import GenerateError, Sampling
from lomo_jax.inputs import SMALL_FILE, parse_json, read_text

FILE = "generation_config.json"
DEFAULT_MAX_NEW_TOKENS = 128


class GenerationConfigError(UserError, ValueError):
    """A generation_config.json that is not JSON, or whose values have the wrong type."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


# The keys lomo-jax reads: what each must be (null always means unset).
_CHECKS = {
    "bos_token_id": (lambda v: _is_int(v) and v >= 0, "a token id"),
    "pad_token_id": (lambda v: _is_int(v) and v >= 0, "a token id"),
    "eos_token_id": (
        lambda v: all(_is_int(i) and i >= 0 for i in (v if isinstance(v, list) else [v])),
        "a token id or a list of them",
    ),
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "temperature": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "max_new_tokens": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
}


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    values: dict[str, Any]
    text: str  # the file as read (written back as it was), or as derived

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> GenerationConfig:
        # transformers' own layout of the file (GenerationConfig.to_json_string)
        return cls(values, json.dumps(values, indent=2, sort_keys=True) + "\n")

    @classmethod
    def derived(cls, cfg: LlamaConfig) -> GenerationConfig:
        keys = ("bos_token_id", "eos_token_id", "pad_token_id")
        return cls.from_values({k: getattr(cfg, k) for k in keys if getattr(cfg, k) is not None})

    @classmethod
    def read(cls, path: Path) -> GenerationConfig:
        text = read_text(path, SMALL_FILE, GenerationConfigError)
        values = parse_json(text, path, GenerationConfigError)
        if not isinstance(values, dict):
            raise GenerationConfigError(f"{path}: not a JSON object")
        for key, (ok, what) in _CHECKS.items():
            v = values.get(key)
            if v is not None and not ok(v):
                raise GenerationConfigError(f"{path}: {key} must be {what}, got {v!r}")
        return cls(values, text)

    @classmethod
    def find(cls, model: Path) -> GenerationConfig | None:
        """The generation config in a model directory (lomo-jax or Hugging Face), if any."""
        f = Path(model) / FILE
        return cls.read(f) if f.is_file() else None

    @classmethod
    def of(cls, model: Path, cfg: LlamaConfig) -> GenerationConfig:
        """The model's generation config, else the one its config implies (a Meta directory or
        a llama2.c file has none)."""
        return cls.find(model) or cls.derived(cfg)

    def write(self, directory: Path) -> None:
        write_file(directory / FILE, self.text)

    def end_ids(self, cfg: LlamaConfig) -> tuple[int, ...]:
        """Every id that ends a reply: this file's and the model config's."""
        ids = self.values.get("eos_token_id")
        ids = [] if ids is None else ids if isinstance(ids, list) else [ids]
        return tuple(dict.fromkeys([*ids, *cfg.eos_ids]))

    def _get(self, key: str, unset: Any) -> Any:
        v = self.values.get(key)
        return unset if v is None else v

    def sampling(
        self,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
    ) -> Sampling:
        """The settings given, the others this file's. As in transformers, the file's
        temperature, top_p and top_k apply only with `do_sample: true` (else greedy); unlike
        transformers, no top_k applies unless one is set (transformers' default is 50)."""
        sample = self._get("do_sample", False)

        def default(key: str, unset: Any, greedy: Any) -> Any:
            return self._get(key, unset) if sample else greedy

        return Sampling(
            temperature=default("temperature", 1.0, 0.0) if temperature is None else temperature,
            top_p=default("top_p", 1.0, 1.0) if top_p is None else top_p,
            top_k=default("top_k", 0, 0) if top_k is None else top_k,
        )

    def max_new_tokens(self, given: int | None = None) -> int:
        """`given`, else this file's max_new_tokens, else DEFAULT_MAX_NEW_TOKENS."""
        if given is not None and given < 0:
            raise GenerateError(f"max_new_tokens must be at least 0, got {given}")
        return given if given is not None else self._get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
