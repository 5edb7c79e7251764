"""Several processes (hosts) as one JAX program: `jax.distributed`, and the little the file
system needs from it -- one writer, and everyone waiting at the same points."""

from __future__ import annotations

import os

import jax
import numpy as np

from lomo_jax.errors import UserError


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Starts `jax.distributed` when a coordinator is named (argument or JAX_COORDINATOR_ADDRESS,
    with JAX_NUM_PROCESSES and JAX_PROCESS_ID); returns whether it did. Call before any other
    JAX work. On CPU the cross-process collectives are gloo's."""
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if coordinator_address is None:
        return False
    if num_processes is None and "JAX_NUM_PROCESSES" in env:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None and "JAX_PROCESS_ID" in env:
        process_id = _env_int("JAX_PROCESS_ID")
    if num_processes is not None and not 1 <= num_processes <= MAX_PROCESSES:
        raise DistributedError(
            f"--num-processes must be in [1, {MAX_PROCESSES}], got {num_processes}"
        )
    if process_id is not None and not 0 <= process_id < (num_processes or MAX_PROCESSES):
        raise DistributedError(
            f"--process-id must be in [0, --num-processes), got {process_id} of {num_processes}"
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


MAX_PROCESSES = 2**16  # hosts jax.distributed joins, at most


class DistributedError(UserError, ValueError):
    """Settings of several processes that cannot be joined."""


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise DistributedError(f"{name}={os.environ[name]!r}: expected an integer") from None


def is_primary() -> bool:
    """The process that writes files everyone shares (configs, indexes, logs)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(value: int) -> int:
    """The largest of every process's `value` (so all of them take the same branch)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(value))))
