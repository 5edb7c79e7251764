"""What the compiled fused step does on a GPU, read from XLA's optimized HLO without a GPU:
copies of weight slices in the layer loop, GEMM FLOPs against 8 N per token, and collectives.

    python benchmarks/compile_report.py --target h100 --model llama-7b --batch-size 8 --seq-len 512
    python benchmarks/compile_report.py --target h100 --model llama-7b --devices 8 \
        --batch-size 8 --seq-len 512 --json

A deviceless GPU compile (lomo_jax.memory) gives no `cost_analysis()`, and the CPU's counts each
loop body once, so FLOPs are counted here: every `dot` (Triton GEMM fusions included) and cuBLAS
GEMM, times the trip counts of the loops around it; cuDNN's attention kernels are counted from
their shapes (causal: half the scores). A weight-slice copy is an instruction of a loop body
that materializes one layer of a stacked weight ([L, ...] -> [1, ...]) in a buffer of its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from collections import Counter
from pathlib import Path

_INSTR = re.compile(r"^\s*(ROOT )?%(\S+) = (\(.*?\)|\S+) ([\w\-$]+)\((.*)$")
_ARRAY = re.compile(r"(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2}
_COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


@dataclasses.dataclass
class Instr:
    root: bool
    name: str
    shape: str
    op: str
    rest: str  # operands and attributes

    @property
    def operands(self) -> list[str]:
        depth, out = 0, []
        for i, ch in enumerate(self.rest):
            if ch == "(":
                depth += 1
            elif ch == ")":
                if depth == 0:
                    out = re.findall(r"%([\w.\-]+)", self.rest[:i])
                    break
                depth -= 1
        return out

    def attr(self, key: str) -> str | None:
        m = re.search(rf"{key}=%?([\w.\-]+)", self.rest)
        return m.group(1) if m else None


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY.findall(shape)]


def nbytes(shape: str) -> int:
    return sum(
        math.prod(dims) * _BYTES.get(t, 4 if "64" not in t else 8) for t, dims in arrays(shape)
    )


def parse(text: str) -> tuple[str, dict[str, list[Instr]]]:
    """(entry computation, {computation: its instructions}) of an HLO module's text."""
    comps: dict[str, list[Instr]] = {}
    entry, cur = "", None
    for line in text.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            cur = head.group(2)
            comps[cur] = []
            entry = cur if head.group(1) else entry
        elif cur and (m := _INSTR.match(line)):
            comps[cur].append(Instr(bool(m.group(1)), *m.groups()[1:]))
    return entry, comps


def trip_count(instr: Instr) -> int:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.rest)
    return int(m.group(1)) if m else 1


def executions(entry: str, comps: dict[str, list[Instr]]) -> dict[str, tuple[int, bool]]:
    """{computation: (times it runs per step, whether it is a fusion body)}, from ENTRY through
    loops (times their trip counts), calls, branches and fusions."""
    seen: dict[str, tuple[int, bool]] = {}

    def visit(c: str, times: int, fused: bool) -> None:
        if c not in comps:
            return
        old = seen.get(c, (0, fused))
        seen[c] = (old[0] + times, fused)
        for ins in comps[c]:
            if ins.op == "while":
                n = trip_count(ins)
                visit(ins.attr("body"), times * n, fused)
                visit(ins.attr("condition"), times * (n + 1), fused)
            elif ins.op in ("fusion", "fusion-start"):
                visit(ins.attr("calls"), times, True)
            elif ins.op in ("call", "async-start") or ins.op.endswith("-start"):
                visit(ins.attr("calls") or ins.attr("to_apply"), times, fused)
            elif ins.op == "conditional":
                for b in re.findall(r"%([\w.\-]+)", ins.rest.split("branch_computations=")[-1]):
                    visit(b, times, fused)

    visit(entry, 1, False)
    return seen


def _shapes(comp: list[Instr]) -> dict[str, str]:
    return {i.name: i.shape for i in comp}


def dot_flops(ins: Instr, shapes: dict[str, str]) -> int:
    """2 x output elements x contracted size of a `dot` or a cuBLAS GEMM custom call."""
    out = arrays(ins.shape)[0][1] if arrays(ins.shape) else ()
    lhs = arrays(shapes.get(ins.operands[0], ""))
    if not lhs:
        return 0
    if ins.op == "dot":
        dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.rest)
    else:
        dims = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.rest)
    contract = (
        [int(d.strip('" ')) for d in dims.group(1).split(",") if d.strip('" ')] if dims else []
    )
    return 2 * math.prod(out) * math.prod(lhs[0][1][d] for d in contract)


def attention_flops(ins: Instr, shapes: dict[str, str]) -> int:
    """cuDNN's fused attention: q [B, T, H, K] against k [B, S, KVH, K], causal (half the scores
    computed); the backward kernel does about 2.5 times the forward's work (5 matmuls to 2)."""
    q = arrays(shapes.get(ins.operands[0], ""))
    if not q or len(q[0][1]) != 4:
        return 0
    B, T, H, K = q[0][1]
    forward = 2 * 2 * B * H * T * T * K // 2
    return forward * 5 // 2 if "bwd" in ins.rest.split("custom_call_target=")[-1][:40] else forward


def report(text: str, layers: int) -> dict:
    entry, comps = parse(text)
    runs = executions(entry, comps)
    gemm = attn = 0
    collectives: Counter = Counter()
    async_collectives: Counter = Counter()
    overlapped: Counter = Counter()  # async collectives with work scheduled between start and done
    copies, loop_bodies = [], set()
    for c, (times, fused) in runs.items():
        shapes = _shapes(comps[c])
        pending: dict[str, tuple[str, int]] = {}  # an async start -> (its kind, work since)
        for ins in comps[c]:
            if not fused and ins.op in ("fusion", "custom-call"):
                pending = {k: (kind, n + 1) for k, (kind, n) in pending.items()}
            target = re.search(r'custom_call_target="([^"]+)"', ins.rest)
            target = target.group(1) if target else ""
            if ins.op == "dot" or (ins.op == "custom-call" and "gemm" in target):
                gemm += times * dot_flops(ins, shapes)
            elif ins.op == "custom-call" and "fmha" in target:
                attn += times * attention_flops(ins, shapes)
            if fused:
                continue
            kind = next((k for k in _COLLECTIVES if ins.op.startswith(k)), None)
            if kind and ins.op.endswith("-start"):
                async_collectives[kind] += times
                pending[ins.name] = (kind, 0)
            elif kind and ins.op.endswith("-done") and ins.operands[0] in pending:
                kind, work = pending.pop(ins.operands[0])
                overlapped[kind] += times * (work > 0)
            elif kind:
                collectives[kind] += times
            if ins.op == "while" and trip_count(ins) == layers:
                loop_bodies.add(ins.attr("body"))
    for body in sorted(loop_bodies):
        for ins in comps[body]:
            sliced = _weight_slices(ins, comps, layers)
            if sliced:
                copies.append(
                    {
                        "loop": body,
                        "instruction": ins.name,
                        "slices": sliced,
                        "bytes": sum(map(nbytes, sliced)),
                    }
                )
    return {
        "gemm_flops": gemm,
        "attention_flops": attn,
        "collectives": dict(collectives),
        "async_collectives": dict(async_collectives),
        "overlapped_collectives": dict(overlapped),
        "layer_loop_copies": copies,
    }


def _weight_slices(ins: Instr, comps: dict[str, list[Instr]], layers: int) -> list[str]:
    """The stacked-weight layers `ins` (a top-level instruction of a layer loop) writes to a
    buffer of its own: a copy, or a fusion returning dynamic slices of [L, a, b] parameters."""
    if ins.op == "copy":
        return [ins.shape] if _is_layer_of_matrix(ins.shape) else []
    if ins.op not in ("fusion", "fusion-start"):  # an async copy (jax 0.12) starts a fusion
        return []
    body = comps.get(ins.attr("calls"), [])
    params = {i.name: i.shape for i in body if i.op == "parameter"}
    by_name = {i.name: i for i in body}
    root = next((i for i in body if i.root), None)
    outputs = (
        root.operands if root is not None and root.op == "tuple" else [root.name] if root else []
    )
    out = []
    for name in outputs:
        i = by_name.get(name)
        while i is not None and i.op in ("bitcast", "copy"):
            i = by_name.get(i.operands[0])
        if i is None or i.op != "dynamic-slice":
            continue
        src = arrays(params.get(i.operands[0], ""))
        if src and len(src[0][1]) >= 3 and src[0][1][0] == layers and _is_layer_of_matrix(i.shape):
            out.append(i.shape)
    return out


def _is_layer_of_matrix(shape: str) -> bool:
    a = arrays(shape)
    return len(a) == 1 and len(a[0][1]) == 3 and a[0][1][0] == 1 and min(a[0][1][1:]) > 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-7b")
    p.add_argument("--method", default="fused-adalomo")
    p.add_argument("--target", default="h100")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument(
        "--attention",
        default="auto",
        help="auto, dense, blockwise or cudnn (dense: every score a GEMM counted exactly; the "
        "blockwise kernel's key loops have data-dependent bounds, counted once)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--hlo", type=Path, help="also write the optimized HLO text here")
    a = p.parse_args()

    import lomo_jax
    from lomo_jax import cuda_plugin

    lomo_jax.configure()  # as the CLI, before JAX starts
    cuda_plugin.import_jax()
    import jax.numpy as jnp

    from lomo_jax.memory import lower, target_layout
    from lomo_jax.presets import preset

    cfg = preset(a.model).replace(attention=a.attention)
    layout = target_layout(a.target, a.devices)
    lowered, params = lower(cfg, a.method, a.batch_size, a.seq_len, jnp.dtype(a.dtype), layout)
    text = lowered.compile().as_text()
    if a.hlo:
        a.hlo.write_text(text)
    r = report(text, cfg.num_hidden_layers)
    tokens = a.batch_size * a.seq_len
    n = cfg.num_params
    per_device = tokens * n / a.devices
    r.update(
        model=a.model,
        method=a.method,
        target=a.target,
        devices=a.devices,
        batch_size=a.batch_size,
        seq_len=a.seq_len,
        params=n,
        gemm_flops_over_8n_tokens=round(r["gemm_flops"] / (8 * per_device), 4),
        gemm_flops_over_6n_tokens=round(r["gemm_flops"] / (6 * per_device), 4),
        copies_per_layer=sum(len(c["slices"]) for c in r["layer_loop_copies"]),
        copy_bytes_per_layer=sum(c["bytes"] for c in r["layer_loop_copies"]),
        largest_copy_bytes=max((c["bytes"] for c in r["layer_loop_copies"]), default=0),
    )
    if a.json:
        print(json.dumps(r))
        return
    print(
        f"{a.model} {a.method}, {a.batch_size} x {a.seq_len}, {a.dtype}, {a.devices} x {a.target}"
    )
    print(
        f"GEMM FLOPs per device {r['gemm_flops']:.3e} = {r['gemm_flops_over_8n_tokens']} x 8 N "
        f"tokens ({r['gemm_flops_over_6n_tokens']} x 6 N); "
        f"cuDNN attention {r['attention_flops']:.3e}"
    )
    print(
        f"weight-slice copies per layer: {r['copies_per_layer']} "
        f"({r['copy_bytes_per_layer'] / 2**20:.0f} MiB)"
    )
    for c in r["layer_loop_copies"]:
        slices = ", ".join(c["slices"])
        print(f"  {c['loop']} {c['instruction']}: {slices} ({c['bytes'] / 2**20:.0f} MiB)")
    print(
        f"collectives per step: sync {r['collectives']}, async {r['async_collectives']} "
        f"(of which with work scheduled between start and done: {r['overlapped_collectives']})"
    )


if __name__ == "__main__":
    main()
