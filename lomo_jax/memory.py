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

from lomo_jax.compiler import jit
from lomo_jax.config import LlamaConfig
from lomo_jax.errors import UserError
from lomo_jax.loss import eval_nll
from lomo_jax.model import param_shapes
from lomo_jax.sharding import Layout, abstract
from lomo_jax.train_step import StepOptions, abstract_batch, abstract_state, make_train_step

# A model with LoRA factors (`cfg.lora`) plans the fused methods as LoRA + LOMO / AdaLomo (the
# LOMO paper's hybrid) and `lora` as plain LoRA (the base frozen).
METHODS = ("inference", "fused-lomo", "fused-adalomo", "lora", "sgd", "adamw")
SHARDED_METHODS = ("inference", "fused-lomo", "fused-adalomo", "lora")
FUSED_METHODS = ("fused-lomo", "fused-adalomo", "lora")  # the fused engine's: they can offload


MAX_TOKENS = 2**31 - 1  # in one step


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
    "h200": Gpu(  # the H100's chip with more and faster memory (HBM3e)
        name="NVIDIA H200",
        compute_capability=(9, 0),
        sms=132,
        memory_bytes=150_754_820_096,  # 143771 MiB, as nvidia-smi reports it
        memory_bandwidth=4_800_000_000_000,
        l2_cache_bytes=60 * 2**20,
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


def target_layout(target: str, devices: int = 1, mesh: str | None = None) -> Layout:
    """A layout over `devices` of `target` (the mesh `fsdp=devices` unless `mesh` says).

    CPU devices beyond the first exist only when JAX was asked for them before it started
    (`jax_num_cpu_devices`, or XLA_FLAGS=--xla_force_host_platform_device_count); GPU devices are
    a deviceless topology."""
    if target == "cpu":
        if devices > len(jax.devices("cpu")):
            raise PlanError(
                f"{devices} CPU devices requested, {len(jax.devices('cpu'))} exist: set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} before JAX starts"
            )
        return Layout.of(mesh, jax.devices("cpu")[:devices])
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
    return Layout.of(mesh, topo.devices)


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


def step_options(
    method: str, dtype=jnp.float32, rounding: str = "stochastic", offload: bool = False
) -> StepOptions:
    """The options `lomo-jax train` gives the step of `method` (a METHODS name but inference) by
    default, in `dtype` (float16 scales the loss), the layer inputs offloaded or not."""
    return StepOptions(
        optimizer="none" if method == "lora" else method.removeprefix("fused-"),
        loss_scaling=jnp.dtype(dtype) == jnp.float16,
        rounding=rounding,
        offload_activations=offload,
    )


def lower(
    cfg: LlamaConfig,
    method: str,
    batch_size: int,
    seq_len: int,
    dtype=jnp.float32,
    layout: Layout | None = None,
    rounding: str = "stochastic",
    offload: bool = False,
):
    """The step of `method` as `lomo-jax train` runs it (`train_step.make_train_step`, a batch
    of training rows), lowered on abstract inputs: nothing is allocated. On `layout`'s devices
    (None: this process's first CPU device), sharded over several (SHARDED_METHODS only); fused
    steps round 16-bit weights as `rounding` says and keep their layer inputs in host memory
    with `offload`. -> (lowered, abstract weights)"""
    layout = layout or target_layout("cpu")
    params = param_shapes(cfg, dtype)
    params = abstract(params, layout.params(params))
    batch = abstract_batch(layout, batch_size, seq_len)
    devices = layout.mesh.devices.flat
    if method == "inference":
        return jit(functools.partial(eval_nll, cfg), devices=devices).lower(params, batch), params
    if method not in METHODS:
        raise PlanError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if layout.mesh.size > 1 and method not in SHARDED_METHODS:
        raise PlanError(f"{method}: sharded plans exist for {', '.join(SHARDED_METHODS)}")
    try:
        step = make_train_step(step_options(method, dtype, rounding, offload), cfg, layout)
    except ValueError as e:  # LoRA with a method that has none, or the reverse; offload unfused
        raise PlanError(f"{method}: {e}") from None
    return step.step.lower(abstract_state(step.init, params), batch), params


def analyze(
    cfg: LlamaConfig,
    method: str,
    batch_size: int,
    seq_len: int,
    dtype=jnp.float32,
    layout: Layout | None = None,
    rounding: str = "stochastic",
    offload: bool = False,
) -> dict:
    """Per-device figures: with a layout, param_bytes is one device's share; host_bytes what
    the step keeps in host memory (the offloaded layer inputs)."""
    lowered, params = lower(cfg, method, batch_size, seq_len, dtype, layout, rounding, offload)
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
        "host_bytes": _host_bytes(m),
        "offload": offload,
        "sequence_split": bool(layout and layout.sequence_split((batch_size, seq_len))),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "dtype": jnp.dtype(dtype).name,
        "rounding": rounding,
        "devices": layout.mesh.size if layout else 1,
        "lora_rank": cfg.lora.rank if cfg.lora else 0,
    }


def _host_bytes(m) -> int:
    """Host memory a compiled program uses (arguments, outputs, temporaries, less aliased)."""
    parts = ("argument", "output", "temp")
    total = sum(getattr(m, f"host_{p}_size_in_bytes", 0) for p in parts)
    return total - getattr(m, "host_alias_size_in_bytes", 0)


OFFLOAD = ("off", "on", "auto")  # --offload-activations: auto = only when the step would not fit


def plan(
    cfg: LlamaConfig,
    method: str,
    batch_size: int,
    seq_len: int,
    dtype=jnp.float32,
    target: str = "cpu",
    devices: int = 1,
    offload: str = "off",
    mesh: str | None = None,
) -> dict:
    """`analyze` on `devices` of `target` (laid out as `mesh` says, default fsdp=devices), with
    the memory one device offers and whether the step fits in it. `offload` (OFFLOAD): the
    layer inputs in host memory, or not, or `auto`: only when the step does not fit without."""
    if offload not in OFFLOAD:
        raise PlanError(f"offload {offload!r}: choose from {', '.join(OFFLOAD)}")
    if batch_size * seq_len > MAX_TOKENS:
        raise PlanError(
            f"batch {batch_size} x {seq_len} is {batch_size * seq_len} tokens a step; at most "
            f"{MAX_TOKENS} (JAX indexes them with int32)"
        )
    layout = target_layout(target, devices, mesh)
    usable = device_memory(target, devices)

    def one(on: bool) -> dict:
        row = analyze(cfg, method, batch_size, seq_len, dtype, layout, offload=on)
        fits = row["peak_bytes"] <= usable
        return {**row, "target": target, "device_bytes": usable, "fits": fits}

    row = one(offload == "on")
    if offload == "auto" and not row["fits"] and method in FUSED_METHODS:
        row = one(True)
    return row
