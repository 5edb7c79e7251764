"""The fused LOMO / AdaLomo step: gradients are consumed by the update the moment they exist.

JAX has no backward hooks, so the backward pass is written out:

1. forward: `lax.scan` over the stacked layers, saving only each layer's input h_i
   (activation checkpointing at layer boundaries);
2. head: loss and gradients of final norm + lm_head over vocabulary pieces
   (`loss.head_loss_and_grads`), so the [B, T, V] logits never exist; the head is updated at
   once;
3. reverse scan i = L-1..0: recompute layer i from h_i under `jax.vjp`, one stage of
   `model.LAYER_BLOCKS` at a time (a norm, or the projections reading one input); walking the
   stages back, update each stage's weights and optimizer state in the carried (donated) stacks
   before the next stage's gradients are computed; pass dh_i down;
4. embedding: the gradient is dh_0 summed per token id into its rows (plus the head's gradient
   when the table is tied: one update with the sum).

Gradients have the weights' dtype, as in the paper's PyTorch code (a bfloat16 model's `.grad` is
bfloat16); the rules do their arithmetic in float32.

A batch smaller than the mesh is split along its length (`sharding.Layout.sequence_split`): the
step puts its tokens in the split's order, each device embeds, saves and recomputes only its own
tokens, attention gathers the keys (`lomo_jax.sequence_sharding`), and each weight's gradient,
a sum over tokens, is reduce-scattered onto its shards as with a split batch. A long sequence's
MLP runs a block of tokens at a time (`model.mlp_tokens`), forward and backward, so its
[T, intermediate] activations never exist whole; its weights' gradients are summed over the
blocks in float32 and updated once.

Each gradient is taken at the pre-step parameters (layer i is updated after its own vjp, and
layer i-1 only needs dh_i), so a step equals ordinary SGD / AdaLomo on the same batch. With
global-norm clipping or float16 a first reverse pass only measures the norm (and overflow), as the
paper does; only one stage's gradients (a long sequence's MLP: its block's) are alive at a time
in either pass.

Copies: XLA updates a stack in place (dynamic_update_slice into the donated carry) only when it
can prove every read of layer i's weights happens before the write; `_depends_on` adds the data
edges that prove it (and the edges that make each stage wait for the update above it, or XLA
would compute every weight gradient of the layer first and hold them all).
tests/test_engine_memory.py fails if a copy of a stack comes back.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.experimental import layout as xla_layout

from lomo_jax import blocks, lora, offload
from lomo_jax.attention import Mask
from lomo_jax.compiler import jit
from lomo_jax.config import LlamaConfig
from lomo_jax.loss import Batch, batch_inputs, head_loss_and_grads, next_token_targets
from lomo_jax.loss_scale import DynamicLossScale, no_scaling
from lomo_jax.model import (
    LAYER_BLOCKS,
    decoder_layers,
    embed,
    layer_dropout_key,
    layer_stage,
    mlp_tokens,
    token_block_key,
)
from lomo_jax.optim import (
    AdamW,
    Lomo,
    StepScalars,
    UpdateRule,
    apply_updates,
    clip_coefficient,
    global_norm_sq,
    init_state,
    map_rule,
)
from lomo_jax.parameters import stage_weights
from lomo_jax.rounding import step_key
from lomo_jax.schedule import Schedule
from lomo_jax.sharding import Layout
from lomo_jax.state import TrainState, all_finite


class LoraTraining(NamedTuple):
    """How the fused step trains a model's LoRA factors (`lomo_jax.lora`): after the reverse
    scan, with `rule` (AdamW) at `schedule`'s learning rate, from the gradients the scan's
    per-layer vjps gave beside the base weights'."""

    rule: AdamW
    schedule: Schedule


def _by_part(rule: UpdateRule | None, factor_rule: AdamW | None, params, f):
    """`f(rule, tree)` for the base weights (no state when frozen: `rule` None) and
    `f(factor_rule, tree)` for the LoRA factors, joined into one tree like `params`."""
    if factor_rule is None:
        return f(rule, params)
    base, factors = lora.split(params)
    return lora.join(f(rule or Lomo(), base), f(factor_rule, factors))


def opt_state_shardings(
    layout: Layout, rule: UpdateRule | None, factor_rule: AdamW | None, params
) -> Any:
    """Where each leaf of `init_train_state`'s optimizer state lives on `layout`'s mesh."""
    return _by_part(rule, factor_rule, params, layout.opt_state)


def init_train_state(
    rule: UpdateRule | None,
    params: Any,
    float16: bool = False,
    loss_scale: DynamicLossScale | None = None,
    layout: Layout | None = None,
    factor_rule: AdamW | None = None,
) -> TrainState:
    """The step-0 state around `params` for the fused step.

    Args:
        rule: the update rule (`optim.Lomo`, `optim.AdaLomo`) whose state to create: AdaLomo's
            float32 row and column factors per matrix (per layer for the stacked ones).
        params: the weights (arrays, or abstract `jax.ShapeDtypeStruct`s under `jax.eval_shape`).
        float16: start float16's dynamic loss scale (`loss_scale`'s, else the default's).
        loss_scale: the scaler whose initial scale to start from.
        layout: the mesh `params` are laid out on: the optimizer state is created in its shards,
            never whole on one device.
        factor_rule: the LoRA factors' rule (AdamW) when `params` has factors; `rule` None: the
            base weights are frozen (plain LoRA) and keep no state.
    """

    def rest(params):
        scale = (loss_scale or DynamicLossScale()).init() if float16 else no_scaling()
        return _by_part(rule, factor_rule, params, init_state), jnp.int32(0), scale

    if layout is not None:
        shardings = jax.tree.map(lambda _: layout.replicated(), jax.eval_shape(rest, params))
        opt_shardings = opt_state_shardings(layout, rule, factor_rule, params)
        rest = jax.jit(rest, out_shardings=(opt_shardings, *shardings[1:]))
    return TrainState(params, *rest(params))


def _head_params(cfg: LlamaConfig, params) -> dict:
    key = "embed" if cfg.tie_word_embeddings else "lm_head"
    return {"norm": params["norm"], key: params[key]}


def _embedding_grad(
    ids_BT: jax.Array, dh_BTD: jax.Array, table: jax.Array, block_bytes: int, g_head=None
):
    """The table's gradient in its own dtype (as a framework's `.grad`), plus the tied head's
    gradient `g_head` when given. The rows of repeated ids are summed in float32 first, so each
    row is rounded once; the table is filled one block of columns at a time, so no float32
    [V, D] table exists (XLA:CPU scatters into 16-bit arrays through a float32 copy): a block's
    float32 copy holds at most `block_bytes`."""
    V, D = table.shape
    ids_N = ids_BT.reshape(-1)
    n = ids_N.shape[0]
    order_N = jnp.argsort(ids_N)
    sorted_N = ids_N[order_N]
    first_N = jnp.concatenate([jnp.ones(1, bool), sorted_N[1:] != sorted_N[:-1]])
    segment_N = jnp.cumsum(first_N) - 1
    # The zeros are made after dh (XLA would schedule a broadcast first, before the reverse
    # scan, and keep this [n, D] and the [V, D] table of zeros alive through all of it).
    zeros = lambda shape, dtype: _depends_on(jnp.zeros(shape, dtype), dh_BTD)  # noqa: E731
    sums_ND = (
        zeros((n, D), jnp.float32)
        .at[segment_N]
        .add(dh_BTD.reshape(n, D)[order_N].astype(jnp.float32))
    )
    # Row of each segment; the segments past the last id keep V, out of range (dropped).
    rows_N = jnp.full(n, V, ids_N.dtype).at[segment_N].set(sorted_N)
    nb, bd = blocks.even_blocks(D, block_bytes // (4 * V))

    def fill(g, j):  # a block's overlap with the one before is already filled: keep it
        old = blocks.take(g, j, bd, 1)
        new = old.astype(jnp.float32).at[rows_N].add(blocks.take(sums_ND, j, bd, 1), mode="drop")
        keep = jnp.where(blocks.own(j, bd, D), new.astype(g.dtype), old)
        return blocks.put(g, keep, j, 1), None

    g = zeros(table.shape, table.dtype) if g_head is None else g_head
    return jax.lax.scan(fill, g, jnp.arange(nb))[0]


def _first(x: jax.Array) -> jax.Array:
    """x's first element (indexed, not raveled: a sharded array's ravel would be gathered)."""
    return x[(0,) * x.ndim]


def _depends_on(tree, *deps):
    """`tree` with the same values, but data-dependent on `deps` (one scalar read of each).

    The in-place write of layer i's weights needs every read of them ordered before it, and a
    weight's own gradient often does not read it (dW_up = x^T (dact * silu(gate)) never reads
    W_up); without an edge XLA cannot prove the order and copies the whole stack every
    iteration. `lax.optimization_barrier` would say this, but XLA:CPU drops it, so the edge is
    `x + 0 * dep`, which XLA cannot fold for floats (0 * inf is NaN) and fuses for free.
    """
    if not jax.tree.leaves(deps):
        return tree
    zero = 0.0 * sum(_first(x).astype(jnp.float32) for x in jax.tree.leaves(deps))
    return jax.tree.map(lambda x: x + zero.astype(x.dtype), tree)


class _Reverse(NamedTuple):
    """What a reverse pass walks: the batch, what the forward saved (each layer's input, the
    loss's cotangent at the last layer's output) and the mesh its gradients are sharded over
    (None: one device, where the stages' updates are ordered instead)."""

    cfg: LlamaConfig
    ids: jax.Array  # [B, T] token ids
    positions: jax.Array  # [B, T]
    mask: Mask
    hs: jax.Array  # [L, B, T, D] each layer's input (in host memory when offloaded)
    dh_L: jax.Array  # [B, T, D]
    layout: Layout | None
    dropout_key: jax.Array | None  # the step's LoRA dropout key (None: no dropout)
    frozen: bool  # the base weights are frozen: only the LoRA factors' gradients are taken
    offload: bool = False  # hs are in host memory: fetch each layer's input a layer ahead

    def embedding_grad(self, table: jax.Array, dh_0: jax.Array, g_tied=None) -> jax.Array:
        return _embedding_grad(self.ids, dh_0, table, self.cfg.block_bytes, g_tied)


def _layer_backward(rev: _Reverse, stacks: dict, i, h_i, dh, consume, acc):
    """Layer i's backward, block by block (`model.LAYER_BLOCKS`; a stage's weights are the rows
    of `parameters.TABLE` that name it), the last block first: each block is recomputed under
    `jax.vjp` from its input once the block above is done, one stage at a time; walking its
    stages back, each stage's gradients go to `consume(acc, i, weights, grads) -> (acc, done)`
    as soon as they exist, so at most one stage's gradients and one block's activations are
    alive; the stages below wait for `done`. -> (acc, dh below).

    `stacks` (and what `consume` receives) is flat: {path tuple: weight (stack)}. Sharded, each
    gradient is constrained to its weight's shards, so XLA reduce-scatters it and the update
    touches only the device's slice. With `rev.frozen` the vjps are taken over the LoRA factors
    alone: no base weight's gradient is computed. A long sequence's MLP block, run in blocks of
    tokens (`model.mlp_tokens`), is taken whole instead: its stages' gradients, summed over the
    blocks, exist together (`_vjp_in_tokens`)."""
    cfg, positions, mask = rev.cfg, rev.positions, rev.mask
    key = None if rev.dropout_key is None else layer_dropout_key(rev.dropout_key, i)

    def stage(name, frozen, key=key):  # stage `name` of (its trained weights, its inputs)
        f = layer_stage(cfg, name, positions, mask, key)
        return lambda p, xs: f(unflatten_dict({**frozen, **p}), xs)

    def weights(stage, after):
        """(the stage's weights the vjp is taken over, those it is not: a frozen base's)."""
        # Sliced anew after `after`: one slice shared with the forward would stay alive between.
        j = _index_after(i, after)
        wanted = stage_weights(stage)
        p = {k: w[j] for k, w in stacks.items() if k in wanted}
        frozen = {k: w for k, w in p.items() if rev.frozen and not lora.is_factor(k)}
        return {k: w for k, w in p.items() if k not in frozen}, frozen

    # Each block's input (a plain forward of the blocks before it: its activations are not kept).
    inputs = [(h_i,)]
    for block in LAYER_BLOCKS[:-1]:
        xs = inputs[-1]
        for name in block:
            p, frozen = weights(name, h_i)
            xs = stage(name, frozen)(p, xs)
        inputs.append(xs)

    def constrain(g):  # sharded: each gradient onto its weight's shards (XLA reduce-scatters)
        return g if rev.layout is None else jax.lax.with_sharding_constraint(g, rev.layout.layer(g))

    def take(acc, p, g, dxs):
        # dxs reads every weight of the stage (the in-place writes must come after the reads),
        # and the stages below wait for this one's update: its gradients die here.
        acc, done = consume(acc, i, p, _depends_on(constrain(g), dxs))
        return acc, _depends_on(dxs, done)

    tokens = mlp_tokens(cfg, *h_i.shape[:2], mask)
    dxs = (dh,)
    for block, xs in zip(reversed(LAYER_BLOCKS), reversed(inputs)):
        xs, tape = _depends_on(xs, dxs), []
        if block == LAYER_BLOCKS[-1] and tokens.n > 1:  # a long sequence's MLP
            ps, frozens = zip(*(weights(name, dxs) for name in block))
            stages = [
                functools.partial(stage, name, frozen) for name, frozen in zip(block, frozens)
            ]
            sums, dxs = _vjp_in_tokens(stages, ps, xs, dxs, tokens, key, constrain)
            for p, g in reversed(list(zip(ps, sums))):  # each sum rounded as its turn comes
                acc, dxs = take(acc, p, {k: g[k].astype(w.dtype) for k, w in p.items()}, dxs)
            continue
        for name in block:
            p, frozen = weights(name, dxs)
            xs, vjp = jax.vjp(stage(name, frozen), p, xs)
            tape.append((p, vjp))
        for p, vjp in reversed(tape):
            g, dxs = vjp(dxs)
            acc, dxs = take(acc, p, g, dxs)
    return acc, dxs[0]


def _vjp_in_tokens(stages: list, ps: tuple, xs: tuple, dys: tuple, tokens, key, constrain):
    """The vjp of a per-token block (the MLP's, as `model.mlp_tokens` blocks it) one block of
    tokens at a time. `stages[k](key)` is the k-th stage as a function of (its trained weights
    `ps[k]`, its inputs), with block j's LoRA dropout key (`model.token_block_key`, as the
    forward draws it). -> (each stage's weight gradients in float32, the inputs' cotangents).
    A weight's gradient is the sum of the blocks' (each in the weights' dtype, as its vjp gives
    it) in float32; a block's tokens an earlier block had (the last block overlaps) get a zero
    cotangent, so every token counts once."""

    def body(carry, j):
        sums, dxs = carry
        k = token_block_key(key, j, tokens)

        def block(ps, xs):
            for f, p in zip(stages, ps):
                xs = f(k)(p, xs)
            return xs

        dys_j = tuple(jnp.where(tokens.own(j, y.ndim), tokens.take(y, j), 0) for y in dys)
        _, vjp = jax.vjp(block, list(ps), tuple(tokens.take(x, j) for x in xs))
        gs, dxs_j = vjp(dys_j)
        sums = [
            jax.tree.map(lambda s, g: s + g.astype(jnp.float32), s, constrain(g))
            for s, g in zip(sums, gs)
        ]
        return (sums, tuple(tokens.put(d, d_j, j) for d, d_j in zip(dxs, dxs_j))), None

    zeros = [constrain(jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.float32), p)) for p in ps]
    init = (zeros, tuple(jnp.zeros_like(x) for x in xs))
    return jax.lax.scan(body, init, jnp.arange(tokens.n))[0]


def _index_after(i: jax.Array, deps) -> jax.Array:
    """`i`, computed after `deps` (it reads one of their elements); XLA cannot fold it."""
    x = _first(jax.tree.leaves(deps)[0])
    return jnp.minimum(i, i + jnp.isnan(x).astype(i.dtype))


def _reverse_layers(rev: _Reverse, consume, acc, stacks_of, dh_L):
    """The layers' backward from the last to the first (`lax.scan`), each handing its stages'
    gradients to `consume`; `stacks_of(acc)` are the stacked weights to recompute from (the
    carried ones while they are being updated). -> (acc, the cotangent of the embedding's
    output)."""

    def layer(carry, x):
        acc, dh = carry
        h_i, i = x
        return _layer_backward(rev, stacks_of(acc), i, h_i, dh, consume, acc), None

    idx = jnp.arange(rev.cfg.num_hidden_layers)
    if not rev.offload:
        return jax.lax.scan(layer, (acc, dh_L), (rev.hs, idx), reverse=True)[0]

    def fetch(i):  # layer i's input, from host memory to the device
        return offload.to_device(jax.lax.dynamic_index_in_dim(rev.hs, i, keepdims=False))

    def prefetching(carry, i):  # layer i - 1's input comes while layer i computes
        carry, h_i = carry
        return (layer(carry, (h_i, i))[0], fetch(jnp.maximum(i - 1, 0))), None

    last = fetch(rev.cfg.num_hidden_layers - 1)
    return jax.lax.scan(prefetching, ((acc, dh_L), last), idx, reverse=True)[0][0]


def _untie(g_head: dict) -> tuple[dict, jax.Array | None]:
    """The head's gradients without the tied embedding's (added to the embedding's own)."""
    g_head = dict(g_head)
    return g_head, g_head.pop("embed", {}).get("embedding")


def _measure_pass(rev: _Reverse, params, g_head: dict, sc: StepScalars):
    """The first reverse pass of a step that clips by the global norm or scales its loss, as
    the paper's: every base gradient's squared norm, summed (the LoRA factors' are not in it, as
    in the authors' LoRA + LOMO), and whether all are finite; nothing is updated.
    -> (sum of squares, finite)"""
    g_head, g_tied = _untie(g_head)
    p_stacks = flatten_dict(params["layers"])

    def measure_stage(acc, i, p, g):
        sumsq, ok = acc
        base = {k: v for k, v in g.items() if not lora.is_factor(k)}
        sumsq = sumsq + global_norm_sq(base, sc.loss_scale)
        return (sumsq, ok & all_finite(g)), sumsq

    acc = (global_norm_sq(g_head, sc.loss_scale), all_finite(g_head))
    (sumsq, finite), dh_0 = _reverse_layers(rev, measure_stage, acc, lambda _: p_stacks, rev.dh_L)
    g_emb = rev.embedding_grad(params["embed"]["embedding"], dh_0, g_tied)
    return sumsq + global_norm_sq(g_emb, sc.loss_scale), finite & all_finite(g_emb)


def _update_pass(rev: _Reverse, rule: UpdateRule | None, params, opt_state, g_head: dict, sc):
    """The reverse pass that updates: the head at once, each stage of each layer as its
    gradients appear (in place, in the carried stacks), the embedding last. The LoRA factors'
    gradients are written into stacks of their own for after the scan; `rule` None (plain LoRA):
    they are the only gradients taken. -> (params, state, the factors' gradients)"""
    g_head, g_tied = _untie(g_head)
    new_params, new_state = dict(params), dict(opt_state)
    for k, g in g_head.items():
        new_params[k], new_state[k] = map_rule(rule, params[k], g, opt_state[k], sc, k)
    # The layers wait for the head's update, or its gradient (as big as the vocabulary table)
    # would be kept alive through the whole reverse scan.
    dh_L = _depends_on(rev.dh_L, [new_params[k] for k in g_head])
    put = lambda stack, v, i: jax.lax.dynamic_update_index_in_dim(stack, v, i, 0)  # noqa: E731

    def update_stage(acc, i, p, g):
        p_stacks, s_stacks, g_stacks = acc
        g_stacks = {**g_stacks, **{k: put(g_stacks[k], g[k], i) for k in p if lora.is_factor(k)}}
        p = {k: w for k, w in p.items() if not lora.is_factor(k)}
        if not p:
            return (p_stacks, s_stacks, g_stacks), []
        s = {k: jax.tree.map(lambda a: a[i], s_stacks[k]) for k in p}
        p, s = map_rule(rule, p, {k: g[k] for k in p}, s, sc, "layers", i)
        if rev.layout is None:  # on a mesh the pin makes XLA gather every weight of a layer
            p = {k: _row_major(v) for k, v in p.items()}
        p_stacks = {**p_stacks, **{k: put(p_stacks[k], p[k], i) for k in p}}
        # The rule's state reads feed the weight update: state writes after weight writes.
        s = _depends_on(s, [p_stacks[k][i] for k in p])
        s_stacks = {
            **s_stacks,
            **{k: jax.tree.map(lambda a, b: put(a, b, i), s_stacks[k], s[k]) for k in p},
        }
        # Only the matrices' writes are waited for: a vector's gradient is tiny, and XLA turns a
        # read of an updated [L, D] stack into a read of the old one (a copy). Sharded, the read
        # would gather the stack (a partial slice of a split axis): the stages are left unordered
        # there, as each device holds only its share anyway.
        if rev.layout is not None:
            return (p_stacks, s_stacks, g_stacks), []
        done = [_read_after_write(p_stacks[k], i) for k in p if p_stacks[k].ndim > 2]
        return (p_stacks, s_stacks, g_stacks), done

    # The base stacks are carried (updated in place); the factors are read as they were.
    stacks = flatten_dict(params["layers"])
    carried = {k: w for k, w in stacks.items() if not (rev.frozen or lora.is_factor(k))}
    fixed = {k: w for k, w in stacks.items() if k not in carried}
    base_state, factor_state = lora.split(opt_state["layers"])
    s_stacks = flatten_dict(base_state, is_leaf=lambda path, _: path in carried)
    g_stacks = {k: jnp.zeros(w.shape, w.dtype) for k, w in fixed.items() if lora.is_factor(k)}
    (p_stacks, s_stacks, g_stacks), dh_0 = _reverse_layers(
        rev, update_stage, (carried, s_stacks, g_stacks), lambda a: {**fixed, **a[0]}, dh_L
    )
    g_factors = {"layers": unflatten_dict(g_stacks)} if g_stacks else {}
    if rev.frozen:
        return new_params, new_state, g_factors
    new_params["layers"] = unflatten_dict({**fixed, **p_stacks})
    new_state["layers"] = lora.join(unflatten_dict(s_stacks), factor_state)
    g_emb = {"embedding": rev.embedding_grad(params["embed"]["embedding"], dh_0, g_tied)}
    new_params["embed"], new_state["embed"] = map_rule(
        rule, params["embed"], g_emb, opt_state["embed"], sc, "embed"
    )
    return new_params, new_state, g_factors


def _update_factors(training: LoraTraining, params, opt_state, grads, step: jax.Array):
    """AdamW on the LoRA factors from the gradients the reverse scan gathered. The factor rule's
    norm clipping (plain LoRA's) covers every factor's gradient. -> (params, state, metrics)"""
    base, factors = lora.split(params)
    base_state, factor_state = lora.split(opt_state)
    norm = jnp.sqrt(global_norm_sq(grads, 1.0))
    sc = StepScalars(
        lr=training.schedule(step),
        t=step + 1,
        clip_coef=clip_coefficient(training.rule, norm),
        loss_scale=jnp.float32(1.0),
    )
    factors, factor_state = apply_updates(training.rule, factors, grads, factor_state, sc)
    metrics = {"lora_lr": sc.lr, "lora_grad_norm": norm}
    return lora.join(base, factors), lora.join(base_state, factor_state), metrics


def _row_major(x: jax.Array) -> jax.Array:
    """`x` laid out row-major, as the stacks are. XLA:GPU lays a weight gradient out as its
    matmul prefers (column-major), and an elementwise update (LOMO's) carried that layout into the
    loop-carried stack: a transposed copy of every stack around the loop (README, GPU plans)."""
    return xla_layout.with_layout_constraint(x, xla_layout.Layout(tuple(range(x.ndim))))


def _read_after_write(stack: jax.Array, i: jax.Array) -> jax.Array:
    """One element XLA must read from the written `stack`: another layer's (a read of layer i
    after its update is rewritten into a read of the old stack, which then gets copied)."""
    j = (i + 1) % stack.shape[0]
    return jax.lax.dynamic_slice(stack, (j,) + (0,) * (stack.ndim - 1), (1,) * stack.ndim)


def _forward(
    cfg: LlamaConfig,
    params,
    batch: Batch,
    scale: jax.Array,
    layout: Layout | None,
    dropout_key: jax.Array | None,
    frozen: bool,
    offload_inputs: bool = False,
):
    """The forward pass, saving each layer's input (in host memory with `offload_inputs`), then
    the head's loss and gradients (of loss x `scale`, 1 unless float16; none for a `frozen`
    base). -> (loss, the head's gradients, what the reverse passes walk)"""
    positions, mask = batch_inputs(batch)
    ids, targets = batch.input_ids, next_token_targets(batch.labels)
    split = layout.sequence_split(ids.shape) if layout is not None else None
    if split is not None:  # every [B, T] input in split order, each device its own tokens
        ids, positions, targets, segments = (
            None if x is None else split.constrain(split.reorder(x))
            for x in (ids, positions, targets, mask.segment_ids_BT)
        )
        mask = Mask(segments, split=split)
    h_0 = embed(cfg, params["embed"], ids)
    h_0 = h_0 if split is None else split.constrain(h_0)
    store = offload.to_host if offload_inputs else None
    h_L, hs = decoder_layers(
        cfg,
        params["layers"],
        h_0,
        positions,
        mask,
        keep_inputs=True,
        store=store,
        dropout_key=dropout_key,
    )
    loss, g_head, dh_L = head_loss_and_grads(
        cfg, _head_params(cfg, params), h_L, targets, scale, weight_grads=not frozen
    )
    # The reverse pass shards its gradients over a mesh of several devices; on one device it
    # orders the stages' updates and pins their layout (what no mesh would do there either).
    sharded = layout if layout is not None and layout.mesh.size > 1 else None
    rev = _Reverse(
        cfg, ids, positions, mask, hs, dh_L, sharded, dropout_key, frozen, offload_inputs
    )
    return loss, g_head, rev


def fused_step(
    cfg: LlamaConfig,
    rule: UpdateRule | None,
    schedule: Schedule,
    state: TrainState,
    batch: Batch,
    loss_scale: DynamicLossScale | None = None,
    layout: Layout | None = None,
    rounding: str = "stochastic",
    seed: int = 0,
    lora_training: LoraTraining | None = None,
    offload_activations: bool = False,
):
    """One fused training step -> (new state, metrics); `make_fused_step` jits it.

    Args:
        cfg: the model's config (static).
        rule: the update rule: `optim.Lomo` or `optim.AdaLomo`, with its weight decay and
            clipping (norm clipping costs a first reverse pass that measures the norm); None:
            the base weights are frozen and get no gradient (plain LoRA).
        schedule: the learning rate as a function of the steps taken (`schedule.Schedule`).
        state: params, optimizer state, steps taken and loss scale (`state.TrainState`).
        batch: `loss.Batch` of [B, T] int32 arrays; labels -100 carry no loss.
        loss_scale: float16's dynamic loss scaling: an overflow skips the step (every tensor
            keeps its value) and halves the scale. None: no scaling.
        layout: the mesh the state is sharded over (`sharding.Layout`); None: one device.
        rounding: how 16-bit weights take their float32 update: `stochastic` (random bits from
            `seed` and the step) or `nearest` (`lomo_jax.rounding`); no effect in float32.
        seed: the stochastic rounding's and the LoRA dropout's seed.
        lora_training: how to train the LoRA factors of a model with `cfg.lora` (AdamW after the
            scan; None: the model has none).
        offload_activations: keep the saved layer inputs in host memory (`lomo_jax.offload`).

    Metrics: `loss`, `lr`, `loss_scale`; `grad_norm` with norm clipping or loss scaling (of the
    base weights' gradients); `overflow` with loss scaling; `lora_lr`, `lora_grad_norm` with LoRA.
    """
    params = state.params
    frozen = rule is None
    dropout = cfg.lora is not None and cfg.lora.dropout > 0
    dropout_key = lora.dropout_key(seed, state.step) if dropout else None
    loss, g_head, rev = _forward(
        cfg, params, batch, state.scale.scale, layout, dropout_key, frozen, offload_activations
    )
    sc = StepScalars(
        lr=schedule(state.step),
        t=state.step + 1,
        clip_coef=jnp.float32(1.0),
        loss_scale=state.scale.scale,
        key=step_key(rounding, seed, state.step),
    )
    metrics = {"loss": loss, "lr": sc.lr, "loss_scale": state.scale.scale}
    finite = jnp.bool_(True)
    if not frozen and (rule.clip_grad_norm is not None or loss_scale is not None):
        sumsq, finite = _measure_pass(rev, params, g_head, sc)
        norm = jnp.sqrt(sumsq)
        sc = sc._replace(clip_coef=clip_coefficient(rule, norm))
        metrics["grad_norm"] = norm
    new_params, new_state, g_factors = _update_pass(rev, rule, params, state.opt_state, g_head, sc)
    if lora_training is not None:
        new_params, new_state, lora_metrics = _update_factors(
            lora_training, new_params, new_state, g_factors, state.step
        )
        metrics.update(lora_metrics)
    scale = state.scale
    if loss_scale is not None:
        # An overflow skips the whole step: every tensor keeps its old value, bit for bit.
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_params = jax.tree.map(keep, new_params, params)
        new_state = jax.tree.map(keep, new_state, state.opt_state)
        scale = loss_scale.update(scale, ~finite)
        metrics["overflow"] = ~finite
    if layout is not None:  # the next step (and the donation) expects the same layout
        new_params = jax.lax.with_sharding_constraint(new_params, layout.params(params))
        factor_rule = lora_training and lora_training.rule
        new_state = jax.lax.with_sharding_constraint(
            new_state, opt_state_shardings(layout, rule, factor_rule, params)
        )
    return TrainState(new_params, new_state, state.step + 1, scale), metrics


def make_fused_step(
    cfg: LlamaConfig,
    rule: UpdateRule | None,
    schedule: Schedule,
    loss_scale: DynamicLossScale | None = None,
    layout: Layout | None = None,
    rounding: str = "stochastic",
    seed: int = 0,
    lora_training: LoraTraining | None = None,
    offload_activations: bool = False,
):
    """`fused_step` jitted, `(state, batch) -> (state, metrics)`, with the state donated (its
    buffers are updated in place: do not use the state passed in afterwards). The arguments are
    `fused_step`'s; `lomo_jax.train_step.make_train_step` builds it from a run's options."""
    step = functools.partial(
        fused_step,
        cfg,
        rule,
        schedule,
        loss_scale=loss_scale,
        layout=layout,
        rounding=rounding,
        seed=seed,
        lora_training=lora_training,
        offload_activations=offload_activations,
    )
    return jit(step, devices=layout and layout.mesh.devices.flat, donate_argnums=0)
