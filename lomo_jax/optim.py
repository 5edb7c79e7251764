"""LOMO and AdaLomo as per-tensor update rules over pytrees, with the exact semantics of the
paper authors' `lomo-optim` 0.1.1 (Lv et al., arXiv 2306.09782 and 2310.10195; the PyPI package
`lomo-optim`, which tests/test_engine.py compares against).

A rule sees one tensor at a time -- (param, float32 gradient, its state) -- which is what lets the
fused engine apply it inside the reverse layer scan; `apply_updates` drives the same rules over a
whole gradient tree, so plain `jax.grad` code can use them too. Decoder weights are stacked
[L, ...]: the engine hands the rules one layer's slice, and `apply_updates` vmaps over the layer
axis, so each layer keeps its own AdaLomo factors either way. Math is float32; the result is cast
back to the parameter's dtype (no master copy, as in the paper): to nearest, as the paper does, or
stochastically when the step has a rounding key (`lomo_jax.rounding`; 16-bit weights only).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from lomo_jax import blocks
from lomo_jax.parameters import BY_NAME, leaf_name
from lomo_jax.rounding import round_to, tensor_key

State = Any


class StepScalars(NamedTuple):
    """Per-step values the rules need; traced, so changing them never recompiles."""

    lr: jax.Array  # the schedule's learning rate for this step
    t: jax.Array  # AdaLomo's step counter, 1 on the first step
    clip_coef: jax.Array  # min(1, max_norm / (norm + 1e-6)); 1 without norm clipping
    loss_scale: jax.Array  # gradients arrive multiplied by this (1 unless float16)
    key: jax.Array | None = None  # rounding.step_key: round stochastically; None: to nearest


class UpdateRule(Protocol):
    """A per-tensor update rule (`Lomo`, `AdaLomo`): what the fused step applies inside its
    reverse scan and `apply_updates` applies to a whole gradient tree."""

    clip_grad_norm: float | None
    clip_grad_value: float | None

    def init(self, p: jax.Array) -> State: ...

    def state_axes(self, axes: tuple[str, ...]) -> State:
        """The state of a parameter with logical `axes`, holding the axes of each state leaf."""
        ...

    def update(
        self, p: jax.Array, g: jax.Array, s: State, sc: StepScalars, key: jax.Array | None = None
    ) -> tuple[jax.Array, State]:
        """-> (p updated, in p's dtype, stochastically rounded with `key`, this tensor's key;
        to nearest without; new state)."""
        ...


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def prepare_grad(g: jax.Array, sc: StepScalars, clip_grad_value: float | None) -> jax.Array:
    """Unscale, clip by value, then by the global-norm coefficient, as the reference orders it."""
    g = g.astype(jnp.float32) / sc.loss_scale
    if clip_grad_value is not None and clip_grad_value > 0:
        g = jnp.clip(g, -clip_grad_value, clip_grad_value)
    return g * sc.clip_coef


@dataclasses.dataclass(frozen=True)
class Lomo:
    """LOMO, fused SGD: w <- w * (1 - lr * weight_decay) - lr * g, with no state.

    weight_decay: decoupled, times the learning rate (lomo-optim's).
    clip_grad_norm: scale every gradient by min(1, max_norm / (global norm + 1e-6)); the fused
        step measures the norm in a first reverse pass. None: no clipping.
    clip_grad_value: clip each gradient element to [-v, v] first. None: no clipping.
    """

    weight_decay: float = 0.0
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None

    def init(self, p: jax.Array) -> State:
        return {}

    def state_axes(self, axes):
        return {}

    def update(self, p, g, s, sc, key=None):
        g = prepare_grad(g, sc, self.clip_grad_value)
        w = p.astype(jnp.float32)
        if self.weight_decay:
            w = w * (1.0 - sc.lr * self.weight_decay)
        return round_to(w - sc.lr * g, p.dtype, key), s


@dataclasses.dataclass(frozen=True)
class AdaLomo:
    """AdaLomo: Adafactor-style second moments (factored for matrices), update-RMS clipping, and
    an update scaled by the parameter's RMS. Tensors of more than two dimensions are stacked
    matrices. Its state is float32: a row and a column factor per matrix, a vector otherwise.

    weight_decay: decoupled, times the RMS-scaled learning rate (AdaLomo's).
    clip_grad_norm, clip_grad_value: as `Lomo`'s.
    eps1: added to g^2 before the moments; eps2: the smallest weight RMS the update scales by.
    clip_threshold: the update's RMS is clipped to it.
    decay_rate: the moments' decay is 1 - t ** decay_rate at step t (t = 1 first).
    block_bytes: a matrix's update walks its columns in blocks of at most this many bytes of
        float32 intermediates (`lomo_jax.blocks`); the result does not depend on it.
    """

    weight_decay: float = 0.0
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None
    eps1: float = 1e-30
    eps2: float = 1e-3
    clip_threshold: float = 1.0
    decay_rate: float = -0.8
    block_bytes: int = blocks.BLOCK_BYTES  # a matrix's float32 intermediates per column block

    def init(self, p: jax.Array) -> State:
        if p.ndim >= 2:
            return {
                "row": jnp.zeros(p.shape[:-1], jnp.float32),
                "col": jnp.zeros(p.shape[:-2] + p.shape[-1:], jnp.float32),
            }
        return {"v": jnp.zeros(p.shape, jnp.float32)}

    def state_axes(self, axes):
        if len(axes) >= 2:
            return {"row": axes[:-1], "col": axes[:-2] + axes[-1:]}
        return {"v": axes}

    def update(self, p, g, s, sc, key=None):
        beta = 1.0 - jnp.power(sc.t.astype(jnp.float32), self.decay_rate)
        if p.ndim == 2:
            return self._update_matrix(p, g, s, sc, beta, key)
        g = prepare_grad(g, sc, self.clip_grad_value)
        v = beta * s["v"] + (1.0 - beta) * (g * g + self.eps1)
        u = jax.lax.rsqrt(v) * g
        w = self._new_weights(p, u, _rms(u), _rms(p.astype(jnp.float32)), sc.lr)
        return round_to(w, p.dtype, key), {"v": v}

    def _new_weights(self, p, u, rms_u, rms_w, lr):
        """The elementwise end of the update, float32: clipped u, scaled by the weight's RMS."""
        u = u / jnp.maximum(1.0, rms_u / self.clip_threshold)
        w = p.astype(jnp.float32)
        alpha = lr * jnp.maximum(self.eps2, rms_w)
        if self.weight_decay:
            w = w * (1.0 - alpha * self.weight_decay)
        return w - alpha * u

    def _update_matrix(self, p, g, s, sc, beta, key):
        """The factored update of an [m, n] matrix, over blocks of its columns: the row and
        column means of g^2 and the weight's RMS, then the update's RMS, then the new weights,
        each pass reading one block at a time.

        The four reductions feed the elementwise update, and XLA:CPU materializes every
        full-size float32 intermediate that feeds more than one of them (docs/measurements.md);
        over blocks each is one block of `block_bytes`. Columns, because the
        sharding rules split a matrix along its first axis. A block's rounding bits are those of
        its place in the whole matrix, so the blocking never changes the result."""
        m, n = p.shape
        nb, bn = blocks.even_blocks(n, self.block_bytes // (4 * m))

        def cols(x, j):
            return blocks.take(x, j, bn, x.ndim - 1)

        def grad(j):
            return prepare_grad(cols(g, j), sc, self.clip_grad_value)

        def moments(carry, j):
            row_sum, col_mean, w_sq = carry
            own = blocks.own(j, bn, n)
            sq = grad(j) * grad(j) + self.eps1
            row_sum = row_sum + jnp.sum(jnp.where(own, sq, 0.0), axis=-1)
            col_mean = blocks.put(col_mean, jnp.mean(sq, axis=-2), j, 0)
            w = cols(p, j).astype(jnp.float32)
            return (row_sum, col_mean, w_sq + jnp.sum(jnp.where(own, w * w, 0.0))), None

        zeros = (jnp.zeros(m, jnp.float32), jnp.zeros(n, jnp.float32), jnp.float32(0.0))
        (row_sum, col_mean, w_sq), _ = jax.lax.scan(moments, zeros, jnp.arange(nb))
        row = beta * s["row"] + (1.0 - beta) * (row_sum / n)
        col = beta * s["col"] + (1.0 - beta) * col_mean
        r_factor = jax.lax.rsqrt(row / jnp.mean(row))[:, None]
        c_factor = jax.lax.rsqrt(col)

        def u(j):
            return (r_factor * cols(c_factor, j)[None, :]) * grad(j)

        def u_squares(total, j):
            return total + jnp.sum(jnp.where(blocks.own(j, bn, n), u(j) * u(j), 0.0)), None

        u_sq, _ = jax.lax.scan(u_squares, jnp.float32(0.0), jnp.arange(nb))
        rms_u, rms_w = jnp.sqrt(u_sq / (m * n)), jnp.sqrt(w_sq / (m * n))

        def write(w, j):  # in place: a block reads only columns no block has written yet
            old = cols(w, j)
            new = self._new_weights(old, u(j), rms_u, rms_w, sc.lr)
            new = round_to(new, p.dtype, key, (0, blocks.start(j, bn, n)), (m, n))
            return blocks.put(w, jnp.where(blocks.own(j, bn, n), new, old), j, 1), None

        w, _ = jax.lax.scan(write, p, jnp.arange(nb))
        return w, {"row": row, "col": col}


@dataclasses.dataclass(frozen=True)
class AdamW:
    """AdamW as torch.optim.AdamW and optax.adamw compute it (decoupled weight decay, bias-corrected
    moments, eps outside the square root), for the few tensors that keep full state: the LoRA
    factors. `sc.t` is the step count (1 on the first step)."""

    weight_decay: float = 0.0
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def init(self, p: jax.Array) -> State:
        return {"mu": jnp.zeros(p.shape, jnp.float32), "nu": jnp.zeros(p.shape, jnp.float32)}

    def state_axes(self, axes):
        return {"mu": axes, "nu": axes}

    def update(self, p, g, s, sc, key=None):
        g = prepare_grad(g, sc, self.clip_grad_value)
        mu = self.b1 * s["mu"] + (1.0 - self.b1) * g
        nu = self.b2 * s["nu"] + (1.0 - self.b2) * g * g
        t = sc.t.astype(jnp.float32)
        mu_hat, nu_hat = mu / (1.0 - self.b1**t), nu / (1.0 - self.b2**t)
        w = p.astype(jnp.float32)
        w = w - sc.lr * (mu_hat / (jnp.sqrt(nu_hat) + self.eps) + self.weight_decay * w)
        return round_to(w, p.dtype, key), {"mu": mu, "nu": nu}


def _key(sc: StepScalars, name: str, layer: jax.Array | None) -> jax.Array | None:
    """The rounding key of tensor `name` (of layer `layer` if stacked) in this step."""
    return None if sc.key is None else tensor_key(sc.key, name, layer)


def _per_tensor(f, tree, *rest):
    """`f(name, layer, leaf, *rest's nodes)` for each leaf of `tree`, vmapped over the layer
    axis (`layer` the index) where parameters.TABLE says the leaf is stacked per layer, else
    with layer None; `rest` have `tree` as a prefix."""

    def one(path, x, *ns):
        name = leaf_name(path)
        if BY_NAME[name].per_layer:
            per_layer = jax.vmap(functools.partial(f, name))
            return per_layer(jnp.arange(x.shape[0], dtype=jnp.int32), x, *ns)
        return f(name, None, x, *ns)

    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    nodes = [treedef.flatten_up_to(r) for r in rest]
    return treedef, [one(path, x, *ns) for (path, x), *ns in zip(leaves, *nodes)]


def init_state(rule: UpdateRule, params: dict) -> dict:
    """Optimizer state mirroring `params`; stacked layer weights get per-layer state."""
    treedef, states = _per_tensor(lambda name, layer, p: rule.init(p), params)
    return treedef.unflatten(states)


def map_rule(
    rule: UpdateRule,
    params,
    grads,
    state,
    sc: StepScalars,
    name: str,
    layer: jax.Array | None = None,
):
    """Applies `rule` leaf by leaf; `state` has `params` as a prefix (a state node per param).
    `params` is the subtree called `name` (of layer `layer` for slices of stacked weights): each
    leaf's rounding key folds in its full name and the layer, wherever the update happens."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    g_leaves = treedef.flatten_up_to(grads)
    s_nodes = treedef.flatten_up_to(state)
    out = [
        rule.update(p, g, s, sc, _key(sc, f"{name}.{leaf_name(path)}", layer))
        for (path, p), g, s in zip(leaves, g_leaves, s_nodes)
    ]
    return treedef.unflatten([o[0] for o in out]), treedef.unflatten([o[1] for o in out])


def apply_updates(rule: UpdateRule, params: dict, grads: dict, state: dict, sc: StepScalars):
    """The unfused path: one update of a whole tree from a full gradient tree (from `jax.grad`),
    with the same rounding keys as the fused engine's. -> (params, state)

    Args:
        rule: the update rule.
        params, grads: the weights and their gradients (same tree; stacked layers vmapped).
        state: `init_state(rule, params)` or what the last update returned.
        sc: this step's scalars: learning rate, AdaLomo's t, the norm-clipping coefficient
            (`clip_coefficient`), the loss scale, and the rounding key (`rounding.step_key`).
    """

    def update(name, layer, p, g, s):
        return rule.update(p, g, s, sc, _key(sc, name, layer))

    treedef, out = _per_tensor(update, params, grads, state)
    return treedef.unflatten([o[0] for o in out]), treedef.unflatten([o[1] for o in out])


def global_norm_sq(grads, loss_scale) -> jax.Array:
    return sum(
        jnp.sum(jnp.square(g.astype(jnp.float32) / loss_scale)) for g in jax.tree.leaves(grads)
    )


def clip_coefficient(rule: UpdateRule, norm: jax.Array) -> jax.Array:
    if rule.clip_grad_norm is None:
        return jnp.float32(1.0)
    if rule.clip_grad_norm <= 0:
        raise ValueError(f"clip_grad_norm must be positive, got {rule.clip_grad_norm}")
    return jnp.minimum(1.0, rule.clip_grad_norm / (norm + 1e-6))
