"""LoRA (Hu et al. 2021) as Hugging Face peft computes it: a projection y = x W becomes
y = x W + (alpha / r) * dropout(x) A B, with A [in, r] and B [r, out] trained and W frozen (plain
LoRA) or trained too, by fused LOMO / AdaLomo in the same backward (the LOMO paper's hybrid,
section 4.3.2).

The factors are rows of `lomo_jax.parameters.TABLE` (`layers.<module>.lora_a` / `lora_b`,
stacked [L, ...] like the weight they adapt), so they live in the parameter tree beside their
weight: converters, sharding rules and checkpoints read them from the table. `LoraConfig` is the
model's `cfg.lora`; it travels as peft's `adapter_config.json`. A and B are kept in float32
whatever the weights' dtype, and the LoRA path computes in float32, as peft does
(`autocast_adapter_dtype`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict

from lomo_jax.parameters import TABLE, params_of

if TYPE_CHECKING:
    from lomo_jax.config import LlamaConfig

# The projections LoRA can adapt: those with factor rows in the table (q_proj ... down_proj).
TARGETS: tuple[str, ...] = tuple(p.path[-2] for p in TABLE if p.path[-1] == "lora_a")
FACTORS = ("lora_a", "lora_b")
DTYPE = jnp.float32


class LoraConfigError(ValueError):
    pass


# The adapter_config.json keys lomo-jax reads, and those that do not change what the adapter
# computes (how it was initialized, what it was saved from); any other key must be unset
# (None, false, empty or "none"): rank or alpha patterns, biases, DoRA, layer subsets, extra
# trained modules and any option a newer peft adds are refused, not silently dropped.
_PEFT_READ = {
    *("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora"),
    *("task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version"),
    *("auto_mapping", "layers_pattern", "init_lora_weights", "loftq_config", "eva_config"),
    *("corda_config", "lora_ga_config", "megatron_core", "qalora_group_size"),
    "ensure_weight_tying",
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (None: 2r), the projections adapted (`TARGETS` names), dropout on the LoRA
    path's input, and rsLoRA's scaling alpha / sqrt(r) instead of alpha / r."""

    rank: int
    alpha: float | None = None
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    rslora: bool = False

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LoraConfigError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if self.alpha is None:
            object.__setattr__(self, "alpha", 2 * self.rank)
        if not (isinstance(self.alpha, int | float) and math.isfinite(self.alpha)):
            raise LoraConfigError(f"LoRA alpha must be a number, got {self.alpha!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        unknown = [t for t in targets if t not in TARGETS]
        if unknown or not targets:
            raise LoraConfigError(
                f"LoRA targets: {unknown[0] if unknown else 'none given'!r} is not a projection "
                f"of the model; choose from {', '.join(TARGETS)}"
            )
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))
        if not 0 <= self.dropout < 1:
            raise LoraConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    # ---- peft's adapter_config.json ------------------------------------------------------
    def to_peft(self, base_model: str | None = None) -> dict[str, Any]:
        """peft's LoraConfig fields for this adapter (what `PeftModel.from_pretrained` reads)."""
        alpha = int(self.alpha) if float(self.alpha).is_integer() else self.alpha
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": alpha,
            "lora_dropout": self.dropout,
            "target_modules": list(self.targets),
            "use_rslora": self.rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_dora": False,
        }

    @classmethod
    def from_peft(cls, d: dict[str, Any], layers: int) -> LoraConfig:
        """From peft's adapter_config.json, for a model of `layers` layers; what lomo-jax does
        not compute is refused (one rank and alpha for every adapted projection of every layer,
        no biases, DoRA or extra modules)."""
        if not isinstance(d, dict):
            raise LoraConfigError("expected a JSON object of peft settings")
        if d.get("peft_type", "LORA") != "LORA":
            raise LoraConfigError(f"peft_type {d.get('peft_type')!r} is not LORA")
        for key, value in d.items():
            if key not in _PEFT_READ and value not in (None, False, {}, [], "none"):
                raise LoraConfigError(f"{key}={value!r} is not supported")
        targets = _peft_targets(d.get("target_modules"), layers)
        try:
            return cls(
                rank=d["r"],
                alpha=d.get("lora_alpha", 8),  # peft's default
                targets=targets,
                dropout=float(d.get("lora_dropout", 0.0)),
                rslora=bool(d.get("use_rslora", False)),
            )
        except KeyError:
            raise LoraConfigError("no rank (r)") from None
        except (TypeError, ValueError) as e:  # a value of the wrong type
            raise LoraConfigError(str(e)) from None


_LAYER_MODULE = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)")


def _peft_targets(target_modules: Any, layers: int) -> tuple[str, ...]:
    """The projections peft's `target_modules` adapts in every layer: names (`q_proj`),
    "all-linear", or full module names, which peft writes for "all-linear" (each projection then
    must be named in every layer)."""
    if target_modules == "all-linear":
        return TARGETS
    if isinstance(target_modules, str) or not isinstance(target_modules, list | tuple):
        raise LoraConfigError(
            f"target_modules {target_modules!r}: give a list of projection names (regular "
            "expressions are not supported)"
        )
    whole, per_layer = set(), {}
    for name in target_modules:
        m = _LAYER_MODULE.fullmatch(str(name))
        if m is None:
            whole.add(name)
        else:
            per_layer.setdefault(m[2], set()).add(int(m[1]))
    for module, found in per_layer.items():
        if module not in whole and found != set(range(layers)):
            raise LoraConfigError(
                f"target_modules adapts {module} in layers {sorted(found)} only: lomo-jax "
                f"adapts a projection in all {layers} layers or none"
            )
    return tuple(whole | set(per_layer))


def factor_rows(cfg: LlamaConfig) -> list:
    """The table's rows of the factors a model of config `cfg` has (none without `cfg.lora`)."""
    return [p for p in params_of(cfg) if p.adapts is not None]


def is_factor(path: tuple) -> bool:
    return any(k in FACTORS for k in path)


def split(tree: dict) -> tuple[dict, dict]:
    """(the base weights, the LoRA factors) of a parameter tree -- or of any tree that has the
    parameter tree as a prefix, such as the optimizer state."""
    flat = flatten_dict(tree, keep_empty_nodes=True)
    base = {k: v for k, v in flat.items() if not is_factor(k)}
    factors = {k: v for k, v in flat.items() if is_factor(k)}
    return unflatten_dict(base), unflatten_dict(factors)


def join(base: dict, factors: dict) -> dict:
    """The inverse of `split`."""
    flat = flatten_dict(base, keep_empty_nodes=True)
    flat.update(flatten_dict(factors, keep_empty_nodes=True))
    return unflatten_dict(flat)


def kaiming_uniform(batch_axis: tuple[int, ...] = ()) -> nn.initializers.Initializer:
    """torch's `kaiming_uniform_(a=sqrt(5))` of a [rank, in] weight, peft's init of A: uniform
    in +-1/sqrt(in). Flax's A is [in, rank]; `batch_axis` holds the layer axis of a stack."""
    return nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", batch_axis=batch_axis)


def init_factors(cfg: LlamaConfig, key: jax.Array) -> dict:
    """Fresh factors, as peft makes them: A random, B zero, so the model starts as its base.
    Each factor's values come from its own key (a fold of its name), whatever the targets."""
    tree: dict = {}
    for p in factor_rows(cfg):
        if p.path[-1] == "lora_a":
            k = jax.random.fold_in(key, zlib.crc32(p.name.encode()))
            value = kaiming_uniform((0,))(k, p.shape(cfg), DTYPE)
        else:
            value = jnp.zeros(p.shape(cfg), DTYPE)
        tree[p.path] = value
    return unflatten_dict(tree)


def dropout_key(seed: int, step: jax.Array) -> jax.Array:
    """The LoRA dropout key of a training step (`model.layer_dropout_key` gives each layer's)."""
    key = jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"), step)
    return jax.random.fold_in(key, zlib.crc32(b"lora_dropout"))


def delta(cfg: LlamaConfig, a: jax.Array, b: jax.Array) -> jax.Array:
    """(alpha / r) A B in float32: what merging adds to the weight (one layer's or a stack's)."""
    return cfg.lora.scale * jnp.matmul(a.astype(DTYPE), b.astype(DTYPE))
