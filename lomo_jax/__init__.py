"""lomo-jax: full-parameter LLaMA fine-tuning in JAX with the fused LOMO and AdaLomo optimizers.

The names below are imported on first use, so `lomo-jax` catches Ctrl-C before JAX loads.
Importing lomo_jax (or any of its modules) changes nothing in the process; `configure()` sets
the process up as the `lomo-jax` command does.
"""

import importlib
import os

# XLA:CPU's default scheduler favours concurrency over memory; the memory-aware one cuts the
# fused step's temporaries (docs/measurements.md). XLA reads the choice from XLA_FLAGS once,
# when JAX's CPU backend starts: as a per-compile option (lomo_jax.compiler's way) it is
# accepted and ignored. Other backends ignore the flag.
CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"

_EXPORTS = {
    "PRESETS": "lomo_jax.presets",
    "LlamaConfig": "lomo_jax.config",
    "preset": "lomo_jax.presets",
    "decoder_layer": "lomo_jax.model",
    "embed": "lomo_jax.model",
    "forward": "lomo_jax.model",
    "head": "lomo_jax.model",
    "init_params": "lomo_jax.model",
    "param_shapes": "lomo_jax.model",
    "LlamaModel": "lomo_jax.pretrained",
    "from_pretrained": "lomo_jax.pretrained",
    "Tokenizer": "lomo_jax.tokenizer",
    "load_tokenizer": "lomo_jax.tokenizer",
}
__all__ = sorted([*_EXPORTS, "configure"])


def configure() -> None:
    """Sets this process up as the `lomo-jax` command does: call it first, before JAX's first
    computation, in a script that trains near the machine's memory or plans memory on this CPU.

    - XLA:CPU's memory-aware scheduler (`CPU_SCHEDULER_FLAG=false` appended to XLA_FLAGS,
      unless XLA_FLAGS names the flag already: yours wins); without it the CPU compiles the
      same steps with larger temporaries than README's figures;
    - glibc malloc's fixed thresholds (`lomo_jax.host_memory.configure`).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if CPU_SCHEDULER_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {CPU_SCHEDULER_FLAG}=false".strip()
    from lomo_jax import host_memory

    host_memory.configure()


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lomo_jax' has no attribute {name!r}")
    importlib.import_module("lomo_jax.cuda_plugin").import_jax()
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
