"""Causal softmax attention for grouped-query heads, in memory linear in the sequence length.

`attend(q, k, v, mask, impl, window)` has three implementations with one meaning:

- "dense": softmax(q k^T / sqrt(K)) v with the [B, H, T, S] scores materialized; the reference,
  and the fastest when the scores are small (one block).
- "blockwise": flash-style (Dao et al. 2022, FlashAttention-2): query blocks against key blocks
  with an online softmax (running max and sum per query), so only one [B, H, bq, bk] block of
  scores exists; blocks that the causal mask (or the sliding window) hides entirely are skipped.
  A custom vjp keeps only q, k, v, the output and the log-sum-exp per query, and recomputes each
  block's probabilities in the backward.
- "cudnn": cuDNN's fused flash attention (`jax.nn.dot_product_attention`), on a GPU, for the
  cases it supports (float16 / bfloat16, no packed segments, no KV cache).

"auto" takes cudnn where it applies when compiling for one GPU, dense when the scores are no
bigger than one block, blockwise otherwise. Grouped-query heads are never repeated: the query
heads of a group are batched against their shared k / v head.

The mask is linear too (`Mask`): query t sits at key index `offset + t` (the tokens already in a
KV cache, or the chunks of a split sequence before it) and sees keys s <= offset + t, of its own
segment (packed documents; 0 = padding, which sees only padding), and with a window W only the W
latest (offset + t - s < W, as Mistral's sliding window). With a `split` the queries and keys are
one device's share of a sequence split over a mesh (lomo_jax.sequence_sharding): the split
gathers the keys and attends here.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lomo_jax import compiler

IMPLEMENTATIONS = ("auto", "dense", "blockwise", "cudnn")
BLOCK = 512  # default query and key block: big enough for efficient matmuls, 32 MB of scores
# at 32 heads in float32

_NEG = float(np.finfo(np.float32).min)


class Mask(NamedTuple):
    """Which keys each query sees, in O(T) memory (see the module docstring)."""

    segment_ids_BT: jax.Array | None = None  # packed documents, 0 = padding
    offset: jax.Array | int = 0  # key index of query 0: how many tokens a KV cache holds
    key_segment_ids_BS: jax.Array | None = None  # the keys' segments, where keys != queries
    split: Any = None  # a sequence_sharding.SequenceSplit: q, k, v are one device's tokens

    def segments(self) -> tuple[jax.Array, jax.Array] | None:
        """(queries', keys') segment ids, or None without packing."""
        if self.segment_ids_BT is None:
            return None
        keys = self.key_segment_ids_BS
        return self.segment_ids_BT, self.segment_ids_BT if keys is None else keys


def attend(
    q_BTHK: jax.Array,
    k_BSHK: jax.Array,
    v_BSHK: jax.Array,
    mask: Mask,
    impl: str = "auto",
    window: int | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """Attention output [B, T, H, K] of queries [B, T, H, K] over keys / values [B, S, KVH, K]
    (blocks of BLOCK queries / keys unless given)."""
    if mask.split is not None:
        return mask.split.attend(q_BTHK, k_BSHK, v_BSHK, mask, impl, window, block_q, block_k)
    block_q, block_k = block_q or BLOCK, block_k or BLOCK
    if mask.segments() is not None and mask.segments()[1].shape[1] != k_BSHK.shape[1]:
        raise ValueError("segment ids need one per key (none with a KV cache)")
    if impl == "auto":
        impl = choose(q_BTHK, k_BSHK, mask, block_q, block_k)
    if impl == "dense":
        return dense(q_BTHK, k_BSHK, v_BSHK, mask, window)
    if impl == "blockwise":
        return blockwise(q_BTHK, k_BSHK, v_BSHK, mask, window, block_q, block_k)
    if impl == "cudnn":
        local = None if window is None else (window - 1, 0)
        return jax.nn.dot_product_attention(
            q_BTHK, k_BSHK, v_BSHK, is_causal=True, local_window_size=local, implementation="cudnn"
        )
    raise ValueError(f"unknown attention implementation {impl!r}; choose from {IMPLEMENTATIONS}")


# ---- choosing ---------------------------------------------------------------------------------
def cudnn_supports(q_BTHK: jax.Array, k_BSHK: jax.Array, mask: Mask) -> bool:
    """Whether cuDNN's fused attention computes this case (causal self-attention, half precision,
    head dim a multiple of 8 up to 128, no packed segments) and JAX finds cuDNN."""
    K = q_BTHK.shape[-1]
    return (
        q_BTHK.dtype in (jnp.bfloat16, jnp.float16)
        and K % 8 == 0
        and K <= 128
        and mask.segment_ids_BT is None
        and isinstance(mask.offset, int)
        and mask.offset == 0
        and q_BTHK.shape[1] == k_BSHK.shape[1]
        and cudnn_found()
    )


@functools.cache
def cudnn_found() -> bool:
    """Whether JAX can trace cuDNN attention here (it looks for the cuDNN library as it traces;
    a deviceless GPU plan may run where only the CUDA compiler is installed)."""
    x = jax.ShapeDtypeStruct((1, 128, 1, 64), jnp.bfloat16)
    try:
        jax.eval_shape(
            functools.partial(jax.nn.dot_product_attention, implementation="cudnn"), x, x, x
        )
    except (RuntimeError, ImportError, NotImplementedError):
        return False
    return True


def choose(q_BTHK: jax.Array, k_BSHK: jax.Array, mask: Mask, block_q: int, block_k: int) -> str:
    """What "auto" means for these inputs on the target being compiled for. cuDNN only on one
    GPU: sharded, its partitioner wants q, k and v split alike, which the fsdp layout does not
    promise (heads of q and of k / v split differently)."""
    platform, devices = compiler.target()
    if platform in ("gpu", "cuda") and devices == 1 and cudnn_supports(q_BTHK, k_BSHK, mask):
        return "cudnn"
    if q_BTHK.shape[1] * k_BSHK.shape[1] <= block_q * block_k:
        return "dense"
    return "blockwise"


# ---- the mask ---------------------------------------------------------------------------------
def _visible(q_idx, k_idx, q_seg, k_seg, window):
    """[B or 1, Tq, Sk] bool: key k_idx[s] visible from query q_idx[t] (positions in the keys)."""
    ok = k_idx[None, :] <= q_idx[:, None]
    if window is not None:
        ok &= q_idx[:, None] - k_idx[None, :] < window
    ok = ok[None]
    if q_seg is not None:
        ok &= q_seg[:, :, None] == k_seg[:, None, :]
    return ok


def _grouped(q_BTHK, k_BSHK, v_BSHK):
    """q [B, KVH, G, T, K] (the G query heads of each KV head together), k and v [B, KVH, S, K]."""
    B, T, H, K = q_BTHK.shape
    KVH = k_BSHK.shape[2]
    q = q_BTHK.reshape(B, T, KVH, H // KVH, K).transpose(0, 2, 3, 1, 4)
    return q, k_BSHK.transpose(0, 2, 1, 3), v_BSHK.transpose(0, 2, 1, 3)


def _ungrouped(o_BHGTK):
    B, KVH, G, T, K = o_BHGTK.shape
    return o_BHGTK.transpose(0, 3, 1, 2, 4).reshape(B, T, KVH * G, K)


# ---- dense ------------------------------------------------------------------------------------
def dense(q_BTHK, k_BSHK, v_BSHK, mask: Mask, window: int | None = None) -> jax.Array:
    """The reference: every score at once."""
    T, K, S = q_BTHK.shape[1], q_BTHK.shape[3], k_BSHK.shape[1]
    q_BHGTK, k_BHSK, v_BHSK = _grouped(q_BTHK, k_BSHK, v_BSHK)
    q_seg, k_seg = mask.segments() or (None, None)
    ok_BTS = _visible(mask.offset + jnp.arange(T), jnp.arange(S), q_seg, k_seg, window)
    scores_BHGTS = jnp.einsum("bhgtk,bhsk->bhgts", q_BHGTK, k_BHSK).astype(jnp.float32)
    scores_BHGTS = scores_BHGTS / np.sqrt(K).astype(np.float32)
    scores_BHGTS = jnp.where(ok_BTS[:, None, None], scores_BHGTS, _NEG)
    probs_BHGTS = jax.nn.softmax(scores_BHGTS, axis=-1).astype(v_BSHK.dtype)
    return _ungrouped(jnp.einsum("bhgts,bhsk->bhgtk", probs_BHGTS, v_BHSK))


# ---- blockwise --------------------------------------------------------------------------------
def blockwise(
    q_BTHK,
    k_BSHK,
    v_BSHK,
    mask: Mask,
    window: int | None = None,
    block_q: int = BLOCK,
    block_k: int = BLOCK,
) -> jax.Array:
    """Flash-style attention; T and S are padded up to whole blocks (padded keys come after
    every query, so the causal mask hides them; padded queries are dropped)."""
    T, S = q_BTHK.shape[1], k_BSHK.shape[1]
    bq, bk = min(block_q, T), min(block_k, S)
    pad_t, pad_s = -T % bq, -S % bk
    q_BHGTK, k_BHSK, v_BHSK = _grouped(
        _pad(q_BTHK, pad_t, 1), _pad(k_BSHK, pad_s, 1), _pad(v_BSHK, pad_s, 1)
    )
    segs = mask.segments()
    segs = None if segs is None else (_pad(segs[0], pad_t, 1), _pad(segs[1], pad_s, 1))
    out = _flash(q_BHGTK, k_BHSK, v_BHSK, segs, jnp.asarray(mask.offset, jnp.int32), window, bq, bk)
    return _ungrouped(out)[:, :T]


def _pad(x, n, axis):
    if not n:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, n)
    return jnp.pad(x, widths)


class _Blocks(NamedTuple):
    """Static block geometry and the traced mask, shared by the forward and the backward."""

    segs: tuple[jax.Array, jax.Array] | None
    offset: jax.Array
    window: int | None
    bq: int
    bk: int

    def visible(self, i, j):
        """[B or 1, 1, 1, bq, bk] of query block i against key block j."""
        q_idx = self.offset + i * self.bq + jnp.arange(self.bq)
        k_idx = j * self.bk + jnp.arange(self.bk)
        q_seg = k_seg = None
        if self.segs is not None:
            q_seg = jax.lax.dynamic_slice_in_dim(self.segs[0], i * self.bq, self.bq, 1)
            k_seg = jax.lax.dynamic_slice_in_dim(self.segs[1], j * self.bk, self.bk, 1)
        return _visible(q_idx, k_idx, q_seg, k_seg, self.window)[:, None, None]

    def key_range(self, i, nk):
        """Key blocks [lo, hi) that query block i sees any key of."""
        first_q, last_q = self.offset + i * self.bq, self.offset + (i + 1) * self.bq - 1
        hi = jnp.minimum(nk, last_q // self.bk + 1)
        lo = 0 if self.window is None else jnp.maximum(0, (first_q - self.window + 1) // self.bk)
        return lo, hi

    def query_range(self, j, nq):
        """Query blocks [lo, hi) that see any key of key block j."""
        first_k, last_k = j * self.bk, (j + 1) * self.bk - 1
        lo = jnp.clip((first_k - self.offset) // self.bq, 0, nq)
        if self.window is None:
            return lo, nq
        # the first query past the window of the last key: offset + i * bq >= last_k + window
        return lo, jnp.clip(-(-(last_k + self.window - self.offset) // self.bq), 0, nq)


def _scores(q, k):
    """Scaled scores in float32: [B, KVH, G, bq, K] x [B, KVH, bk, K] -> [B, KVH, G, bq, bk]."""
    s = jnp.einsum("bhgtk,bhsk->bhgts", q, k, preferred_element_type=jnp.float32)
    return s / np.sqrt(q.shape[-1]).astype(np.float32)


def _block(x, i, size, axis):
    return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, segs, offset, window, bq, bk):
    return _flash_forward(q, k, v, _Blocks(segs, offset, window, bq, bk))[0]


def _flash_forward(q, k, v, g: _Blocks):
    """Output [B, KVH, G, T, K] and log-sum-exp [B, KVH, G, T] (float32), one query block at a
    time, each sweeping only the key blocks it sees with a running max m and sum l."""
    B, KVH, G, T, K = q.shape
    nq, nk = T // g.bq, k.shape[2] // g.bk

    def one_query_block(i):
        q_i = _block(q, i, g.bq, 3)

        def over_keys(j, carry):
            m, l, acc = carry
            ok = g.visible(i, j)
            s = jnp.where(ok, _scores(q_i, _block(k, j, g.bk, 2)), _NEG)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)
            rescale = jnp.exp(m - m_new)
            pv = jnp.einsum(
                "bhgts,bhsk->bhgtk",
                p.astype(v.dtype),
                _block(v, j, g.bk, 2),
                preferred_element_type=jnp.float32,
            )
            return m_new, l * rescale + p.sum(-1), acc * rescale[..., None] + pv

        init = (
            jnp.full((B, KVH, G, g.bq), _NEG, jnp.float32),
            jnp.zeros((B, KVH, G, g.bq), jnp.float32),
            jnp.zeros((B, KVH, G, g.bq, K), jnp.float32),
        )
        m, l, acc = jax.lax.fori_loop(*g.key_range(i, nk), over_keys, init)
        l = jnp.where(l > 0, l, 1.0)  # a padded query may see no key: 0, not 0 / 0
        return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)

    o, lse = jax.lax.map(one_query_block, jnp.arange(nq))  # [nq, B, KVH, G, bq, (K)]
    o = jnp.moveaxis(o, 0, 3).reshape(B, KVH, G, T, K)
    return o, jnp.moveaxis(lse, 0, 3).reshape(B, KVH, G, T)


def _flash_fwd(q, k, v, segs, offset, window, bq, bk):
    o, lse = _flash_forward(q, k, v, _Blocks(segs, offset, window, bq, bk))
    return o, (q, k, v, segs, offset, o, lse)


def _flash_bwd(window, bq, bk, residuals, do):
    """One key block at a time (its dk, dv accumulate in registers of the loop), against the
    query blocks that see it; dq accumulates in one [B, KVH, G, T, K] float32 buffer."""
    q, k, v, segs, offset, o, lse = residuals
    g = _Blocks(segs, offset, window, bq, bk)
    B, KVH, G, T, K = q.shape
    nq, nk = T // bq, k.shape[2] // bk
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [B, KVH, G, T]

    def one_key_block(dq, j):
        k_j, v_j = _block(k, j, bk, 2), _block(v, j, bk, 2)

        def over_queries(i, carry):
            dq, dk, dv = carry
            q_i, do_i = _block(q, i, bq, 3), _block(do, i, bq, 3)
            p = jnp.where(
                g.visible(i, j), jnp.exp(_scores(q_i, k_j) - _block(lse, i, bq, 3)[..., None]), 0.0
            )
            f32 = dict(preferred_element_type=jnp.float32)
            dv = dv + jnp.einsum("bhgts,bhgtk->bhsk", p.astype(do.dtype), do_i, **f32)
            dp = jnp.einsum("bhgtk,bhsk->bhgts", do_i, v_j, **f32)
            ds = (p * (dp - _block(delta, i, bq, 3)[..., None]) / np.sqrt(K)).astype(q.dtype)
            dk = dk + jnp.einsum("bhgts,bhgtk->bhsk", ds, q_i, **f32)
            dq_i = _block(dq, i, bq, 3) + jnp.einsum("bhgts,bhsk->bhgtk", ds, k_j, **f32)
            return jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * bq, 3), dk, dv

        zeros = jnp.zeros((B, KVH, bk, K), jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(*g.query_range(j, nq), over_queries, (dq, zeros, zeros))
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq, (dk, dv) = jax.lax.scan(
        one_key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(nk)
    )  # dk, dv: [nk, B, KVH, bk, K]
    dk = jnp.moveaxis(dk, 0, 2).reshape(k.shape)
    dv = jnp.moveaxis(dv, 0, 2).reshape(v.shape)
    return dq.astype(q.dtype), dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
