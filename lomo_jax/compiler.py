"""`jax.jit` with the XLA options the model needs on the platform it compiles for.

XLA:CPU computes bfloat16 and float16 arithmetic in float32: its float normalization puts a
convert on the operand of every dynamic-slice that reads one layer out of a stacked weight. When
the stack is loop-invariant (the forward's `lax.scan` over `params["layers"]`), the while-loop
invariant code motion pass then hoists that convert out of the layer loop: a float32 copy of
every whole stack, twice the bfloat16 weights (README, Memory: the bfloat16 plans before it).
Without the pass the convert stays fused into each layer's slice. Other backends compute in
16 bits and keep their whole pipeline.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax

CPU_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}

_TARGET: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "target", default=None
)


@contextlib.contextmanager
def compiling_for(platform: str, devices: int = 1) -> Iterator[None]:
    """Within: trace and compile for `devices` of `platform` ("cpu", "cuda", ...), not for this
    process's default backend (a deviceless GPU plan traces in a CPU-only process)."""
    token = _TARGET.set((platform, devices))
    try:
        yield
    finally:
        _TARGET.reset(token)


def target() -> tuple[str, int]:
    """(platform, number of devices) being compiled for."""
    return _TARGET.get() or (jax.default_backend(), jax.device_count())


def compiler_options(platform: str) -> dict[str, str]:
    """XLA options for compiling on `platform` ("cpu", "cuda", "gpu", "tpu", ...)."""
    return dict(CPU_OPTIONS) if platform == "cpu" else {}


class _PlatformJit:
    """A `jax.jit` built at its first use, so the platform is known by then (at import time
    asking for it would start the backend before `jax.distributed` can). With `devices` (a
    mesh's), it is traced as compiling for them, whatever this process's default backend."""

    def __init__(self, fun: Callable, devices: list | None, jit_kwargs: dict[str, Any]):
        self._fun, self._devices, self._jit_kwargs = fun, devices, jit_kwargs
        functools.update_wrapper(self, fun)

    @functools.cached_property
    def jitted(self):
        platform = self._devices[0].platform if self._devices else target()[0]
        return jax.jit(self._fun, compiler_options=compiler_options(platform), **self._jit_kwargs)

    def _tracing(self) -> contextlib.AbstractContextManager:
        if not self._devices:
            return contextlib.nullcontext()
        return compiling_for(self._devices[0].platform, len(self._devices))

    def __call__(self, *args, **kwargs):
        with self._tracing():
            return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with self._tracing():
            return self.jitted.lower(*args, **kwargs)


def jit(fun: Callable, *, devices: Any = None, **jit_kwargs) -> _PlatformJit:
    """`jax.jit(fun, **jit_kwargs)` with `compiler_options` for the platform of `devices` (a
    mesh's devices, which it is then traced for) or else of `target()` at the first call."""
    return _PlatformJit(fun, None if devices is None else list(devices), jit_kwargs)
