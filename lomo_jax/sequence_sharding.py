"""One long sequence split over the devices of a mesh (context parallelism), for batches smaller
than the mesh: the length axis goes over `fsdp`, so each device computes and keeps only its own
tokens' activations.

The sequence is cut into 2n equal chunks for n devices, and device d holds chunks d and
2n - 1 - d (MaxText's load-balanced order): under a causal mask an early chunk sees few keys and a
late one many, so every device computes the same number of score blocks. A step puts its batch in
that order once (`SequenceSplit.reorder`); the loss, a sum over tokens, does not care. Everything
but attention works token by token, on the device's tokens. Attention all-gathers each layer's
keys and values along the sequence (with grouped-query heads they are small: Llama-3-70B at 32k
tokens, 2 x 32768 x 1024 x 2 B = 128 MiB a layer), puts them back in sequence order, and attends
each local chunk at its offset, so the blockwise kernel skips the blocks the mask hides on every
shard. The gather's transpose reduce-scatters dK and dV.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lomo_jax import attention
from lomo_jax.attention import Mask


@dataclasses.dataclass(frozen=True)
class SequenceSplit:
    """The length axis split over mesh axis `axis`; the batch over `batch_axis` (or whole)."""

    mesh: Mesh
    batch_axis: str | None = None
    axis: str = "fsdp"

    @property
    def shards(self) -> int:
        return self.mesh.shape[self.axis]

    @property
    def chunks(self) -> int:
        return 2 * self.shards

    def spec(self) -> PartitionSpec:
        """[B, T, ...] arrays in split order: the batch over batch_axis, the length over axis."""
        return PartitionSpec(self.batch_axis, self.axis)

    def chunk_order(self) -> np.ndarray:
        """The sequence's chunk in each of the 2n places of the split order: device d holds
        places 2d and 2d + 1, chunks d and 2n - 1 - d."""
        d = np.arange(self.shards)
        return np.stack([d, self.chunks - 1 - d], axis=1).reshape(-1)

    def token_order(self, length: int) -> np.ndarray:
        """The sequence position of each token of the split order."""
        size = length // self.chunks
        return (self.chunk_order()[:, None] * size + np.arange(size)).reshape(-1)

    def reorder(self, x: jax.Array | None, axis: int = 1) -> jax.Array | None:
        """`x` (a [B, T, ...] array in sequence order, or None) in split order."""
        if x is None:
            return None
        return jnp.take(x, self.token_order(x.shape[axis]), axis=axis)

    def constrain(self, x: jax.Array) -> jax.Array:
        """[B, T, ...] `x` in split order, laid out as split: each device its own tokens."""
        spec = PartitionSpec(*self.spec(), *[None] * (x.ndim - 2))
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def attend(self, q_BTHK, k_BTHK, v_BTHK, mask: Mask, impl, window, block_q, block_k):
        """`attention.attend` of split-order q, k, v (mask.segment_ids_BT in split order too):
        each device gathers every key and value and attends its own two chunks of queries."""
        if mask.key_segment_ids_BS is not None or not isinstance(mask.offset, int) or mask.offset:
            raise ValueError("a split sequence attends to itself (no KV cache)")
        chunks = self.chunks
        natural = np.argsort(self.chunk_order())  # place of each chunk in the gathered keys

        def in_sequence_order(x):  # this device's [B, 2 chunks, ...] -> everyone's, in order
            x = jax.lax.all_gather(x, self.axis, axis=1, tiled=True)
            B, T = x.shape[:2]
            x = x.reshape(B, chunks, T // chunks, *x.shape[2:])[:, natural]
            return x.reshape(B, T, *x.shape[3:])

        def local(q, k, v, seg):
            d = jax.lax.axis_index(self.axis)
            k, v = in_sequence_order(k), in_sequence_order(v)
            key_seg = None if seg is None else in_sequence_order(seg)
            size = q.shape[1] // 2
            outs = []
            for half, chunk in enumerate((d, chunks - 1 - d)):
                part = slice(half * size, (half + 1) * size)
                m = Mask(None if seg is None else seg[:, part], chunk * size, key_seg)
                outs.append(attention.attend(q[:, part], k, v, m, impl, window, block_q, block_k))
            return jnp.concatenate(outs, axis=1)

        spec = self.spec()
        seg = mask.segment_ids_BT
        return jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(spec, spec, spec, None if seg is None else spec),
            out_specs=spec,
            check_vma=False,
        )(q_BTHK, k_BTHK, v_BTHK, seg)
