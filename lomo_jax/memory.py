"""Compile-time memory planning: lower a step on abstract shapes (`jax.ShapeDtypeStruct`) and
read XLA's memory analysis, so a 65B model can be planned on a laptop without allocating it.

peak = arguments + outputs + temporaries - aliased (donated buffers reused as outputs).

A plan compiles for a target: this process's CPU, or a GPU described by a `GpuTargetConfig`
(deviceless ahead-of-time compilation: XLA's real GPU pipeline, ptxas included, on a machine
without a GPU; it needs the CUDA plugin, `pip install "jax[cuda12-local]" nvidia-cuda-nvcc-cu12`).
GEMM autotuning is skipped there, so small workspaces may differ from a real GPU's; the large
buffers do not. XLA compiles an over-size program without complaint: `fits` compares.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lomo_jax.baseline import make_optax_step
from lomo_jax.compiler import compiling_for, jit
from lomo_jax.config import LlamaConfig
from lomo_jax.engine import init_train_state, make_fused_step
from lomo_jax.errors import UserError
from lomo_jax.loss import Batch, eval_nll
from lomo_jax.loss_scale import DynamicLossScale
from lomo_jax.model import param_shapes
from lomo_jax.optim import AdaLomo, Lomo
from lomo_jax.schedule import Schedule
from lomo_jax.sharding import Layout, abstract, make_mesh

METHODS = ("inference", "fused-lomo", "fused-adalomo", "sgd", "adamw")
SHARDED_METHODS = ("inference", "fused-lomo", "fused-adalomo")


class PlanError(UserError, ValueError):
    """A plan that cannot be made here: an unknown target, too few devices, no CUDA plugin."""


@dataclasses.dataclass(frozen=True)
class Gpu:
    """What XLA needs to know of a GPU to compile for it without one (its device description)."""

    name: str
    compute_capability: tuple[int, int]
    sms: int
    memory_bytes: int
    memory_bandwidth: int  # bytes / s
    l2_cache_bytes: int
    clock_ghz: float
    threads_per_sm: int
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int

    def target_config(self) -> str:
        """The GpuTargetConfigProto text that `jax.experimental.topologies` takes."""
        major, minor = self.compute_capability
        return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_memory_per_sm} threads_per_core_limit: {self.threads_per_sm}
  core_count: {self.sms} fpus_per_core: 128 block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535 block_dim_limit_z: 65535 memory_bandwidth: {self.memory_bandwidth}
  l2_cache_size: {self.l2_cache_bytes} clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 9 patch: 0 }}
device_description_str: "{self.name}"
"""


# The GPUs a plan can target; memory as CUDA reports it (what XLA's allocator can reach).
GPUS: dict[str, Gpu] = {
    "h100": Gpu(
        name="NVIDIA H100 80GB HBM3",
        compute_capability=(9, 0),
        sms=132,
        memory_bytes=84_929_347_584,
        memory_bandwidth=3_352_320_000_000,
        l2_cache_bytes=50 * 2**20,
        clock_ghz=1.98,
        threads_per_sm=2048,
        shared_memory_per_sm=228 * 1024,
        shared_memory_per_block_optin=227 * 1024,
    ),
    "rtx4090": Gpu(
        name="NVIDIA GeForce RTX 4090",
        compute_capability=(8, 9),
        sms=128,
        memory_bytes=25_393_692_672,
        memory_bandwidth=1_008_000_000_000,
        l2_cache_bytes=72 * 2**20,
        clock_ghz=2.52,
        threads_per_sm=1536,
        shared_memory_per_sm=100 * 1024,
        shared_memory_per_block_optin=99 * 1024,
    ),
}
TARGETS = ("cpu", *GPUS)
# The share of a GPU a step may plan for: JAX takes 75% by default; XLA_PYTHON_CLIENT_MEM_FRACTION
# raises it, leaving the rest to the CUDA context and library workspaces.
GPU_USABLE = 0.95


def target_layout(target: str, devices: int = 1, mesh: str | None = None) -> Layout | None:
    """A layout over `devices` of `target` (None: this process's one default device).

    CPU devices beyond the first exist only when XLA_FLAGS asked for them before JAX started
    (--xla_force_host_platform_device_count); GPU devices are a deviceless topology."""
    if target == "cpu":
        if devices > len(jax.devices("cpu")):
            raise PlanError(
                f"{devices} CPU devices requested, {len(jax.devices('cpu'))} exist: set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} before JAX starts"
            )
        return Layout(make_mesh(mesh, jax.devices("cpu")[:devices])) if devices > 1 else None
    if target not in GPUS:
        raise PlanError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(
            platform="cuda",
            target_config=GPUS[target].target_config(),
            topology=f"1x1x{devices}",
        )
    except Exception as e:  # the plugin raises plain RuntimeErrors
        raise PlanError(
            f"planning for {target} needs JAX's CUDA plugin (pip install "
            f'"jax[cuda12-local]=={jax.__version__}" nvidia-cuda-nvcc-cu12): '
            f"{str(e).splitlines()[0]}"
        ) from None
    return Layout(make_mesh(mesh, topo.devices))


def device_memory(target: str, devices: int = 1) -> int:
    """Bytes a step may use on one device of `target`: GPU_USABLE of a GPU; for CPU devices,
    their share of this machine's RAM."""
    if target in GPUS:
        return int(GPUS[target].memory_bytes * GPU_USABLE)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // devices


def _bytes(tree: Any) -> int:
    """Bytes one device holds of `tree` (all of it, unsharded)."""

    def one(x):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
        return math.prod(shape) * x.dtype.itemsize

    return sum(one(x) for x in jax.tree.leaves(tree))


def lower(
    cfg: LlamaConfig,
    method: str,
    batch_size: int,
    seq_len: int,
    dtype=jnp.float32,
    layout: Layout | None = None,
    rounding: str = "stochastic",
):
    """The jitted step for `method`, lowered on abstract inputs (nothing is allocated); with a
    `layout`, on its devices and, over several, sharded (SHARDED_METHODS only); fused steps
    round 16-bit weights as `rounding` says."""
    platform = "cpu" if layout is None else layout.mesh.devices.flat[0].platform
    with compiling_for(platform, 1 if layout is None else layout.mesh.size):
        return _lower(cfg, method, batch_size, seq_len, dtype, layout, rounding)


def _lower(cfg, method, batch_size, seq_len, dtype, layout, rounding):
    params = param_shapes(cfg, dtype)
    ids = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    sharded = layout if layout is not None and layout.mesh.size > 1 else None
    if sharded is not None:
        if method not in SHARDED_METHODS:
            raise ValueError(f"{method}: sharded plans exist for {SHARDED_METHODS}")
        params = abstract(params, layout.params(params))
        ids = abstract(ids, layout.batch(ids.shape))
    batch = Batch(ids, ids)
    if method == "inference":
        step = jit(functools.partial(eval_nll, cfg))
        return step.lower(*_on(layout, params, batch)), params
    if method.startswith("fused-"):
        rule = Lomo() if method == "fused-lomo" else AdaLomo()
        float16 = jnp.dtype(dtype) == jnp.float16
        state = jax.eval_shape(lambda p: init_train_state(rule, p, float16), params)
        state = state._replace(params=params)  # eval_shape drops the shardings
        if sharded is not None:
            state = state._replace(
                opt_state=abstract(state.opt_state, layout.opt_state(rule, params))
            )
        scaler = DynamicLossScale() if float16 else None
        step = make_fused_step(cfg, rule, Schedule(1e-3), scaler, sharded, rounding)
        return step.lower(*_on(layout, state, batch)), params
    tx = {"sgd": optax.sgd(1e-3), "adamw": optax.adamw(1e-3)}[method]
    opt_state = jax.eval_shape(tx.init, params)
    return make_optax_step(cfg, tx).lower(*_on(layout, params, opt_state, batch)), params


def _on(layout: Layout | None, *trees: Any) -> tuple:
    """`trees` with every abstract leaf not yet placed put whole on the layout's devices (the
    target's: a GPU topology compiles for that GPU)."""
    if layout is None:
        return trees

    def place(x):
        if getattr(x, "sharding", None) is not None:
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=layout.replicated())

    return jax.tree.map(place, trees)


def analyze(
    cfg: LlamaConfig,
    method: str,
    batch_size: int,
    seq_len: int,
    dtype=jnp.float32,
    layout: Layout | None = None,
    rounding: str = "stochastic",
) -> dict:
    """Per-device figures: with a layout, param_bytes is one device's share."""
    lowered, params = lower(cfg, method, batch_size, seq_len, dtype, layout, rounding)
    m = lowered.compile().memory_analysis()
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    param_bytes = _bytes(params)
    return {
        "method": method,
        "param_bytes": param_bytes,
        "peak_bytes": peak,
        "peak_over_params": round(peak / param_bytes, 4),
        "argument_bytes": m.argument_size_in_bytes,
        "output_bytes": m.output_size_in_bytes,
        "temp_bytes": m.temp_size_in_bytes,
        "alias_bytes": m.alias_size_in_bytes,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "dtype": jnp.dtype(dtype).name,
        "rounding": rounding,
        "devices": layout.mesh.size if layout else 1,
    }


def plan(
    cfg: LlamaConfig,
    method: str,
    batch_size: int,
    seq_len: int,
    dtype=jnp.float32,
    target: str = "cpu",
    devices: int = 1,
) -> dict:
    """`analyze` on `devices` of `target`, with the memory one device offers and whether the
    step fits in it."""
    row = analyze(cfg, method, batch_size, seq_len, dtype, target_layout(target, devices))
    usable = device_memory(target, devices)
    return {**row, "target": target, "device_bytes": usable, "fits": row["peak_bytes"] <= usable}
