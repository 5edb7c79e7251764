"""JAX's CUDA plugin on a machine without an NVIDIA GPU (`make install` adds it: GPU memory plans
compile for a GPU here). Its libraries print "Could not find cuda drivers" from C++ as JAX loads
them, and its backend logs a traceback when it fails to start; `import_jax` picks the CPU and
imports JAX with the process's stderr pointed elsewhere, so a user sees neither."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")  # what JAX itself looks for


def _plugin_without_gpu() -> bool:
    gpu = any(os.path.exists(d) for d in _DEVICE_FILES)
    return not gpu and importlib.util.find_spec("jax_cuda12_plugin") is not None


def import_jax() -> None:
    """Imports JAX (and registers its plugins) quietly where the plugin has no GPU to use, and
    selects the CPU platform there unless JAX_PLATFORMS names one (JAX's `jax_platforms`
    setting, not the environment: a child process chooses for itself); a no-op once JAX is
    imported or where there is a GPU or no plugin."""
    if "jax" in sys.modules or not _plugin_without_gpu():
        return
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        jax = importlib.import_module("jax")
        if not os.environ.get("JAX_PLATFORMS"):
            jax.config.update("jax_platforms", "cpu")
        # Loading the plugin prints too, when a backend is first asked for. Registering it starts
        # no backend, so XLA_FLAGS set later still count.
        importlib.import_module("jax._src.xla_bridge")._discover_and_register_pjrt_plugins()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
