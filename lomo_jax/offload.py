"""Host offload of the fused step's saved layer inputs (`--offload-activations`).

The fused step keeps each layer's input for the reverse scan: L x B x T x D in the compute dtype,
what grows with the sequence once attention is linear in memory. Offloaded, the forward writes each
layer's input to host memory (JAX memory kinds: `pinned_host`, which a GPU reads and writes by
DMA) and the reverse scan brings layer i - 1's input back while layer i's backward computes
(double-buffered: the carry holds the next layer's input), so the device holds two layers' inputs
instead of L. The values are the same bits: only where they wait changes. (On a CPU, whose
device memory is the host's, the copies are between two buffers of the same RAM.)
"""

from __future__ import annotations

import jax


def to_host(x: jax.Array) -> jax.Array:
    """`x` in host memory (pinned_host), as the forward saves it."""
    return jax.device_put(x, jax.memory.Space.Host)


def to_device(x: jax.Array) -> jax.Array:
    """`x` back in device memory, for the reverse scan."""
    return jax.device_put(x, jax.memory.Space.Device)
