"""Device meshes and the one table that maps logical parameter axes to mesh axes (the axes of
each parameter are lomo_jax.parameters.TABLE's).

A mesh has two named axes: `data` (splits the batch) and `fsdp` (splits the batch and every
weight and optimizer factor, ZeRO-3 style: each device keeps 1/fsdp of each tensor and works
one layer at a time inside the scan). A dimension that a mesh axis does not divide stays whole.

A batch smaller than the mesh (one long sequence on 8 devices) is split along its length over
`fsdp` instead (context parallelism, `lomo_jax.sequence_sharding`): without it every device would
compute and keep the whole sequence. `--mesh fsdp=8,length=fsdp` forces the split,
`length=none` never splits.

Every matrix is split along its first axis that fsdp divides. Split along its last axis, a
stacked weight got another memory layout for XLA's collectives, and XLA copied the whole stack
inside the layer loop; a Megatron-style `tensor` axis (heads / MLP split on the output axis) hit
the same copies, so there is none (README, Memory: the plans that showed it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lomo_jax.errors import UserError
from lomo_jax.parameters import BY_NAME, LAYERS, leaf_name
from lomo_jax.sequence_sharding import SequenceSplit

MESH_AXES = ("data", "fsdp")
LENGTH = {"fsdp": True, "none": False}  # --mesh length=...: split every sequence, or none

# Logical axis -> mesh axes it may be split over, in order of preference.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "length": (),
    "embed": ("fsdp",),
    "vocab": ("fsdp",),
    "heads": ("fsdp",),
    "kv_heads": ("fsdp",),
    "mlp": ("fsdp",),
    "norm": (),
    "head_dim": (),
    "lora_rank": (),  # a LoRA factor's rank axis: tiny, kept whole
    "layers": (),
}


class MeshError(UserError, ValueError):
    """A `--mesh` that does not parse or needs more devices than there are."""


def _parts(spec: str | None) -> list[tuple[str, str]]:
    parts = [p.partition("=") for p in (spec or "").replace(" ", "").split(",") if p]
    return [(name, value) for name, _, value in parts]


def parse_length(spec: str | None) -> bool | None:
    """The `length=fsdp|none` part of a mesh spec: split every sequence over fsdp, never, or
    (None, absent) when the batch does not fill the mesh."""
    values = [value for name, value in _parts(spec) if name == "length"]
    if values and values[-1] not in LENGTH:
        raise MeshError(f"--mesh {spec!r}: length= takes {' or '.join(LENGTH)}")
    return LENGTH[values[-1]] if values else None


def parse_mesh(spec: str | None, n_devices: int) -> dict[str, int]:
    """'data=2,fsdp=4' -> axis sizes. data defaults to 1, fsdp to every device data leaves (so no
    spec = all devices on fsdp). A `length=` part (`parse_length`) is not an axis."""
    sizes: dict[str, int] = {}
    for name, value in _parts(spec):
        if name == "length":
            continue
        if name not in MESH_AXES or not (value.isascii() and value.isdigit()) or int(value) < 1:
            raise MeshError(
                f"--mesh {spec!r}: expected comma-separated axis=size with axes {MESH_AXES} "
                "(and length=fsdp|none)"
            )
        sizes[name] = int(value)
    sizes.setdefault("fsdp", max(1, n_devices // sizes.get("data", 1)))
    sizes = {a: sizes.get(a, 1) for a in MESH_AXES}
    if math.prod(sizes.values()) > n_devices:
        raise MeshError(
            f"--mesh {spec!r} needs {math.prod(sizes.values())} devices, {n_devices} are visible"
        )
    return sizes


def make_mesh(spec: str | None = None, devices: list | None = None) -> Mesh:
    """A mesh over the first devices (all of them when the spec leaves fsdp open)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    n = math.prod(sizes.values())
    return Mesh(np.array(devices[:n]).reshape(tuple(sizes.values())), MESH_AXES)


def param_axes(name: str) -> tuple[str, ...]:
    """Logical axes of a parameter from its dotted name (e.g. layers.mlp.up_proj.kernel), as
    lomo_jax.parameters.TABLE gives them (a stacked one's start with "layers")."""
    row = BY_NAME.get(name)
    if row is None:
        raise KeyError(f"no sharding rule for parameter {name!r} (not in parameters.TABLE)")
    return (LAYERS, *row.axes) if row.per_layer else row.axes


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where every array of a training step lives on `mesh`; `sequence`: split the batch's
    length over fsdp always (True), never (False), or when the batch does not fill the mesh."""

    mesh: Mesh
    sequence: bool | None = None

    @classmethod
    def of(cls, spec: str | None = None, devices: list | None = None) -> Layout:
        """The layout a `--mesh` spec asks for (`make_mesh`, `parse_length`)."""
        return cls(make_mesh(spec, devices), parse_length(spec))

    def spec(self, axes: tuple[str, ...], shape: tuple[int, ...]) -> PartitionSpec:
        """The partition spec for logical `axes`: each dimension takes the mesh axes its rule
        names that divide it and that no earlier dimension took."""
        used: set[str] = set()
        out = []
        for logical, size in zip(axes, shape):
            chosen: list[str] = []
            for axis in RULES[logical]:
                n = math.prod(self.mesh.shape[a] for a in (*chosen, axis))
                if axis not in used and self.mesh.shape[axis] > 1 and size % n == 0:
                    chosen.append(axis)
            used.update(chosen)
            out.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
        return PartitionSpec(*out)

    def sharding(self, axes: tuple[str, ...], shape: tuple[int, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes, shape))

    def param(self, name: str, shape: tuple[int, ...]) -> NamedSharding:
        """The sharding of the parameter called `name` (dotted, e.g. layers.mlp.up_proj.kernel)."""
        return self.sharding(param_axes(name), shape)

    def params(self, params: Any) -> Any:
        """A tree of shardings matching `params` (arrays or shapes)."""
        return jax.tree_util.tree_map_with_path(
            lambda path, x: self.param(leaf_name(path), x.shape), params
        )

    def layer(self, p_layer: Any) -> Any:
        """Shardings of one layer's slice of the stacked weights (no layer axis)."""
        return jax.tree_util.tree_map_with_path(
            lambda path, x: self.sharding(param_axes(f"{LAYERS}.{leaf_name(path)}")[1:], x.shape),
            p_layer,
        )

    def opt_state(self, rule: Any, params: Any) -> Any:
        """Shardings for `optim.init_state(rule, params)`: each state leaf follows the axes of
        its parameter that it keeps (AdaLomo's row factor drops the last, col the one before)."""

        def per_param(path, x):
            name = leaf_name(path)
            axes = param_axes(name)
            stacked = BY_NAME[name].per_layer
            shape = x.shape[1:] if stacked else x.shape
            state_axes = rule.state_axes(axes[1:] if stacked else axes)
            state_shape = jax.eval_shape(rule.init, jax.ShapeDtypeStruct(shape, x.dtype))
            return jax.tree.map(
                lambda ax, s: self.sharding(
                    (LAYERS, *ax) if stacked else ax,
                    (x.shape[0], *s.shape) if stacked else s.shape,
                ),
                state_axes,
                state_shape,
                is_leaf=lambda a: isinstance(a, tuple),
            )

        return jax.tree_util.tree_map_with_path(per_param, params)

    def sequence_split(self, shape: tuple[int, ...]) -> SequenceSplit | None:
        """How a step of [B, T] batches splits each sequence over fsdp (None: it does not)."""
        B, T = shape[:2]
        data, fsdp = self.mesh.shape["data"], self.mesh.shape["fsdp"]
        if fsdp == 1 or self.sequence is False:
            return None
        if self.sequence is None and B % (data * fsdp) == 0:  # the batch fills the mesh
            return None
        if T % (2 * fsdp):
            if self.sequence:
                raise MeshError(
                    f"sequence length {T}: splitting it over fsdp={fsdp} (length=fsdp) needs a "
                    f"multiple of {2 * fsdp}"
                )
            return None
        return SequenceSplit(self.mesh, "data" if data > 1 and B % data == 0 else None)

    def batch(self, shape: tuple[int, ...], sequence: bool = True) -> NamedSharding:
        """[B, T, ...]: the batch over data and fsdp where they divide it; or, for a step that
        splits its sequences (`sequence_split`), the length over fsdp (in sequence order: the
        step puts it in its split order)."""
        split = self.sequence_split(shape) if sequence else None
        if split is not None:
            rest = [None] * (len(shape) - 2)
            return NamedSharding(self.mesh, PartitionSpec(*split.spec(), *rest))
        return self.sharding(("batch", "length", *["norm"] * (len(shape) - 2)), shape)

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def on_mesh(self, tree: Any) -> Any:
        """`tree` with every leaf not yet laid out on the mesh (step counters, scalars)
        replicated there."""

        def one(x):
            s = getattr(x, "sharding", None)
            if isinstance(s, NamedSharding) and s.mesh == self.mesh:
                return x
            return put(np.asarray(x), self.replicated())

        return jax.tree.map(one, tree)

    def put_batch(self, batch: Any, sequence: bool = True) -> Any:
        """A tuple of host [B, T, ...] arrays (None kept) as global arrays laid out as `batch`
        says (`sequence=False`: never split along the length, as a plain forward wants)."""
        return type(batch)(
            *(None if a is None else put(a, self.batch(a.shape, sequence)) for a in batch)
        )


def abstract(tree: Any, shardings: Any) -> Any:
    """`tree`'s shapes and dtypes laid out as `shardings` (for compiling or restoring into)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def put(tree: Any, shardings: Any) -> Any:
    """Host arrays -> global arrays: each device receives only its own slice, and each process
    only builds its own devices' slices (works across hosts, unlike a plain device_put)."""

    def one(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)
