"""One prepared GPU check: correctness on the GPU, memory measured against the plan, and speed
against the paper authors' PyTorch LOMO, in one command that fits a short lease.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out DIR        # one H100 / H200, ~8 minutes
    python benchmarks/gpu_check.py --out DIR --dry-run            # tiny shapes, CPU (the tests)

Writes DIR/gpu_check.json (every figure) and DIR/gpu_check.md (the tables), rewritten after each
part, so a run cut short still leaves what it measured.

1. Correctness (tiny model, in this process): fused LOMO = `jax.grad` + SGD and fused AdaLomo =
   the same rule driven by `jax.grad` (float32, matmuls at full precision: <= 1e-5 relative;
   bfloat16: the update within 2% relative); cuDNN attention = blockwise = dense, output and
   gradient (bfloat16); a checkpoint written and read back by the training run's own code, bit
   for bit.
2. Rows, each in a process of its own (its allocator's peak is its own): random bfloat16
   weights, the step compiled first, then -- one row at a time on the GPU, behind a lock, while
   the next rows compile -- one warm-up step and timed steps. A row reports the peak bytes in use
   (`memory_stats`) against two plans of the same step: XLA's own for this GPU
   (`compiled.memory_analysis()`) and the deviceless one lomo-jax computes without a GPU
   (`lomo_jax.memory.plan`, target h100 / h200, compiled in parallel on the CPU). Speed is
   tokens/s per GPU, MFU and HFU.
   FLOPs per token: MFU counts the model, 6 N + 6 L T (H K) (N: every matmul weight, the
   embedding lookup excluded; attention causal: half of 12 L T H K); HFU adds the forward
   matmuls each method recomputes (the fused step: each layer once more, its attention block
   twice; jax.grad and PyTorch with checkpointing: each layer once), not the flash kernels'
   own recompute. Peak: the GPU's dense bfloat16 rate from its datasheet.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
sys.path.insert(0, str(SCRIPT.parent))  # torch_reference, beside this file

# bfloat16 steps against their reference: the weights agree to bfloat16's precision (2^-8
# relative); their gradients differ in the last bits (computed layer by layer against one
# graph), which moves a few roundings by one unit in the last place.
BF16_TOLERANCE = 2.0**-8
# Dense bfloat16 FLOP/s by device kind (datasheets; the first name found in the kind wins).
PEAK_FLOPS = {
    "H100 PCIe": 756e12,
    "H100": 989.4e12,
    "H200": 989.4e12,
    "A100": 312e12,
    "RTX 4090": 165.2e12,
    "RTX 3090": 71e12,
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One measured step: `method` on `model` at batch x seq, bfloat16."""

    method: str  # fused-adalomo, fused-lomo, adamw (jax.grad + optax), torch-adalomo, torch-lomo
    model: str  # a lomo_jax preset, or "tiny"
    batch: int
    seq: int
    memory: bool = False  # compared with the plans (the rows the issue names)

    @property
    def name(self) -> str:
        return f"{self.method} {self.model} {self.batch}x{self.seq}"


# In order of importance: a lease that runs out cuts the tail.
ROWS = (
    Row("fused-adalomo", "llama-7b", 8, 512, memory=True),
    Row("torch-adalomo", "llama-7b", 8, 512),
    Row("fused-lomo", "llama-7b", 8, 512, memory=True),
    Row("torch-lomo", "llama-7b", 8, 512),
    Row("fused-adalomo", "llama-7b", 1, 4096, memory=True),
    Row("fused-lomo", "llama-7b", 1, 4096, memory=True),
    Row("torch-adalomo", "llama-7b", 1, 4096),
    Row("torch-lomo", "llama-7b", 1, 4096),
    Row("fused-adalomo", "llama3-8b", 1, 8192, memory=True),
    Row("adamw", "llama-7b", 8, 512),
    Row("adamw", "llama-7b", 1, 4096),
)
DRY_ROWS = (  # one of each kind of row
    Row("fused-adalomo", "tiny", 2, 64, memory=True),
    Row("torch-adalomo", "tiny", 2, 64),
    Row("adamw", "tiny", 2, 64),
)


def model_config(name: str):
    from lomo_jax.config import LlamaConfig
    from lomo_jax.presets import preset

    if name == "small":  # the correctness checks' model
        return LlamaConfig(
            vocab_size=1024,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
    if name == "tiny":
        return LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=172,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    return preset(name)


# ---- FLOPs ------------------------------------------------------------------------------------
def flops_per_token(cfg, seq: int, method: str) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) per token of one training step (see the module docstring)."""
    D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    HK, KVK = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attn_proj = D * HK + 2 * D * KVK + HK * D
    layer = attn_proj + 3 * D * F
    matmul = L * layer + D * cfg.vocab_size
    scores = 2 * seq * HK  # causal QK^T and PV, forward, per token and layer
    model = 6 * matmul + 3 * L * scores
    recompute = L * (2 * layer + scores)  # each layer's forward once more
    if method.startswith("fused"):
        recompute += L * (2 * attn_proj + scores)  # and the attention block once again
    return model, model + recompute


# ---- device rows (one process each) -----------------------------------------------------------
@contextlib.contextmanager
def gpu_turn(lock: Path):
    """Exclusive use of the GPU among the check's processes: steps are timed alone."""
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def random_params(cfg, dtype, seed: int = 0):
    """Random weights (normal, std 0.02) made on the device one layer at a time, so making them
    never needs more than one layer's float32 temporaries."""
    import jax
    import jax.numpy as jnp

    from lomo_jax.model import param_shapes

    shapes = param_shapes(cfg, dtype)
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def one(key, shape):
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    @functools.partial(jax.jit, static_argnums=1)
    def make(key, shape):
        if len(shape) < 3:
            return one(key, shape)
        return jax.lax.map(lambda k: one(k, shape[1:]), jax.random.split(key, shape[0]))

    return jax.tree.unflatten(treedef, [make(k, s.shape) for k, s in zip(keys, leaves)])


def jax_row(row: Row, steps: int, lock: Path) -> dict:
    """The step `lomo-jax train` runs (`train_step.make_train_step`, a batch of training rows),
    compiled by `lomo_jax.memory.lower` as a plan is, here for the real device."""
    import jax
    import jax.numpy as jnp

    from lomo_jax.loss import Batch
    from lomo_jax.memory import lower, step_options
    from lomo_jax.sharding import Layout, make_mesh
    from lomo_jax.train_step import make_train_step

    cfg = model_config(row.model)
    dtype = jnp.bfloat16
    layout = Layout(make_mesh(None, jax.devices()[:1]))
    method = row.method if row.method.startswith("fused-") else "adamw"
    t0 = time.perf_counter()
    lowered, _ = lower(cfg, method, row.batch, row.seq, dtype, layout)
    compiled = lowered.compile()
    out = {"compile_s": round(time.perf_counter() - t0, 1), **memory_plan_of(compiled)}
    with contextlib.suppress(Exception):  # XLA's count of what runs (absent for some backends)
        out["xla_flops"] = float(compiled.cost_analysis()["flops"])
    device = jax.devices()[0]
    init = make_train_step(step_options(method, dtype), cfg, layout).init
    with gpu_turn(lock):
        state = init(random_params(cfg, dtype))
        out["setup_peak_bytes"] = peak_bytes(device)
        shape = (row.batch, row.seq)
        ids = jax.random.randint(jax.random.key(1), shape, 0, cfg.vocab_size)
        positions = jnp.broadcast_to(jnp.arange(row.seq, dtype=jnp.int32), shape)
        batch = Batch(ids, ids, jnp.ones(shape, jnp.int32), positions)  # one document a row
        seconds, losses = [], []
        for k in range(steps + 1):  # the first step warms up
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            losses.append(float(metrics["loss"]))
            if k:
                seconds.append(time.perf_counter() - t0)
        out["peak_bytes"] = peak_bytes(device)
    out["param_bytes"] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
    out["losses"] = losses
    out["seconds"] = seconds
    return out


def peak_bytes(device) -> int | None:
    stats = device.memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


def memory_plan_of(compiled) -> dict:
    m = compiled.memory_analysis()
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return {"xla_plan_bytes": peak, "temp_bytes": m.temp_size_in_bytes}


def torch_row(row: Row, steps: int, lock: Path) -> dict:
    """The paper authors' lomo-optim on transformers' LlamaForCausalLM, sdpa attention and
    gradient checkpointing, bfloat16 (as their trainer runs it, without clipping)."""
    import torch
    from torch_reference import make_optimizer, random_model

    cfg = model_config(row.model)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with gpu_turn(lock):
        model = random_model(cfg, "bfloat16", dev)
        opt = make_optimizer(model, row.method.removeprefix("torch-"), lr=1e-5)
        ids = torch.randint(0, cfg.vocab_size, (row.batch, row.seq), device=dev)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds, losses = [], []
        for k in range(steps + 1):
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            opt.fused_backward(loss, 1e-5)
            losses.append(float(loss))  # waits for the step
            if k:
                seconds.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"peak_bytes": peak, "param_bytes": params, "losses": losses, "seconds": seconds}


def deviceless_plan(row: Row, target: str) -> dict:
    """lomo-jax's plan of the row's step, compiled for `target` without a GPU."""
    import jax.numpy as jnp

    from lomo_jax.memory import plan

    t0 = time.perf_counter()
    method = row.method if row.method.startswith("fused") else "adamw"
    p = plan(model_config(row.model), method, row.batch, row.seq, jnp.bfloat16, target)
    return {"plan_bytes": p["peak_bytes"], "plan_s": round(time.perf_counter() - t0, 1)}


# ---- correctness (in the parent process, on the default device) ------------------------------
def rel_err(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def tree_rel_err(ours, ref) -> float:
    import jax

    return max(rel_err(a, b) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)))


def correctness(model: str, workdir: Path) -> list[dict]:
    checks = []
    for check in (fused_vs_reference, attention_agrees, checkpoint_round_trip):
        t0 = time.perf_counter()
        try:
            results = check(model, workdir)
        except Exception as e:  # one broken check must not cost the rest of the lease
            results = [{"check": check.__name__, "ok": False, "error": _one_line(e)}]
            traceback.print_exc()
        for r in results:
            r["seconds"] = round(time.perf_counter() - t0, 1)
        checks.extend(results)
    return checks


def fused_vs_reference(model: str, workdir: Path) -> list[dict]:
    """Two steps of each fused rule against its reference from a full `jax.grad` tree: optax's
    SGD for LOMO in float32; the same rule driven by `jax.grad` (`baseline.unfused_step`, the
    same rounding) otherwise."""
    import jax
    import jax.numpy as jnp
    import optax

    from lomo_jax.baseline import unfused_step
    from lomo_jax.engine import init_train_state, make_fused_step
    from lomo_jax.loss import Batch, loss_fn
    from lomo_jax.model import init_params
    from lomo_jax.optim import AdaLomo, Lomo
    from lomo_jax.schedule import Schedule

    cfg = model_config(model)
    key = jax.random.key(0)
    shape = (4, min(128, cfg.max_position_embeddings))
    ids = [jax.random.randint(jax.random.fold_in(key, k), shape, 0, cfg.vocab_size) for k in (0, 1)]
    base = init_params(cfg, jax.random.key(1))

    def run(step, state):
        for x in ids:
            state, _ = step(state, Batch(x, x))
        return state.params

    def sgd(params, lr):
        tx = optax.sgd(lr)
        opt_state, grad = tx.init(params), jax.jit(jax.grad(loss_fn, argnums=1), static_argnums=0)
        for x in ids:
            updates, opt_state = tx.update(grad(cfg, params, Batch(x, x)), opt_state, params)
            params = optax.apply_updates(params, updates)
        return params

    results = []
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, BF16_TOLERANCE)):
        name = jnp.dtype(dtype).name
        for rule, lr in ((Lomo(), 0.05), (AdaLomo(weight_decay=0.1, clip_grad_norm=1.0), 1e-2)):
            params = jax.tree.map(lambda x, d=dtype: x.astype(d), base)
            # The step donates its state: each run starts from its own copy.
            fresh = lambda r=rule, p=params: init_train_state(r, jax.tree.map(jnp.copy, p))  # noqa: E731
            with jax.default_matmul_precision("highest"):  # no TF32 in the float32 comparison
                step = make_fused_step(cfg, rule, Schedule(lr), rounding="nearest")
                fused = run(step, fresh())
                if isinstance(rule, Lomo) and dtype == jnp.float32:
                    ref, against = sgd(params, lr), "jax.grad + optax SGD"
                else:
                    step = functools.partial(
                        unfused_step, cfg, rule, Schedule(lr), rounding="nearest"
                    )
                    ref, against = run(jax.jit(step), fresh()), "jax.grad + the same rule"
            label = f"fused {type(rule).__name__} = {against}, {name}"
            results.append(_agreement(label, fused, ref, tol))
    return results


def _agreement(check: str, ours, ref, tol: float) -> dict:
    import jax
    import numpy as np

    pairs = list(zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True))
    differ = sum(int(np.sum(np.asarray(a) != np.asarray(b))) for a, b in pairs)
    err = tree_rel_err(ours, ref)
    return {
        "check": check,
        "ok": bool(err <= tol),
        "max_rel_err": err,
        "tolerance": tol,
        "elements_differing": differ / sum(a.size for a, _ in pairs),
    }


def attention_agrees(model: str, workdir: Path) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from lomo_jax import attention
    from lomo_jax.attention import Mask

    B, T, H, KVH, K = 2, 1024, 8, 2, 128
    keys = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(keys[0], (B, T, H, K), jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, T, KVH, K), jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, T, KVH, K), jnp.bfloat16)
    do = jax.random.normal(keys[3], (B, T, H, K), jnp.float32)

    def value_and_grads(impl):
        def f(q, k, v):
            return jnp.sum(attention.attend(q, k, v, Mask(), impl).astype(jnp.float32) * do)

        out = jax.jit(lambda q, k, v: attention.attend(q, k, v, Mask(), impl))(q, k, v)
        return out, jax.jit(jax.grad(f, (0, 1, 2)))(q, k, v)

    dense = value_and_grads("dense")
    impls = ["blockwise"]
    results = []
    if jax.default_backend() == "gpu":
        impls.append("cudnn")
    else:
        results.append({"check": "cuDNN attention", "ok": None, "skipped": "needs a GPU"})
    for impl in impls:
        out, grads = value_and_grads(impl)
        err = max(rel_err(out, dense[0]), *(rel_err(a, b) for a, b in zip(grads, dense[1])))
        # bfloat16 inputs and outputs: each result is rounded to 2^-8 relative.
        results.append(
            {
                "check": f"{impl} attention = dense, output and gradient, bfloat16",
                "ok": bool(err <= 2e-2),
                "max_rel_err": err,
                "tolerance": 2e-2,
            }
        )
    return results


def checkpoint_round_trip(model: str, workdir: Path) -> list[dict]:
    """A training run's checkpoint (`RunDir.save_state` / `load_latest`) restores bit for bit."""
    import jax
    import numpy as np

    from lomo_jax.engine import init_train_state
    from lomo_jax.model import init_params
    from lomo_jax.optim import AdaLomo
    from lomo_jax.rundir import RunDir
    from lomo_jax.sharding import Layout, make_mesh

    cfg = model_config(model)
    rule = AdaLomo()
    state = init_train_state(rule, init_params(cfg, jax.random.key(2)))
    state = state._replace(opt_state=jax.tree.map(lambda x: x + 0.5, state.opt_state))
    with RunDir.create(workdir / "checkpoint-run") as run:
        run.save_state(state, keep=1)
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        back = run.load_latest(like, Layout(make_mesh(None, jax.devices()[:1])))
    same = all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back), strict=True)
    )
    return [{"check": "checkpoint save / restore, bit for bit", "ok": same}]


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


# ---- the orchestra ----------------------------------------------------------------------------
def _child(args: list[str], env: dict | None, timeout: float) -> dict:
    """Runs this script in a fresh process; its last stdout line is its JSON result."""
    cmd = [sys.executable, str(SCRIPT), *args]
    try:
        done = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-3:]
        return {"error": f"exit {done.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def derive(row: Row, r: dict, peak_flops: float | None) -> dict:
    """Median step time, tokens/s, MFU / HFU and the peak against the plans."""
    if "seconds" not in r or not r["seconds"]:
        return r
    cfg = model_config(row.model)
    s = statistics.median(r["seconds"])
    tokens = row.batch * row.seq
    model, hardware = flops_per_token(cfg, row.seq, row.method)
    r.update(step_s=round(s, 4), tokens_per_s=round(tokens / s, 1))
    r["finite"] = all(math.isfinite(x) for x in r.get("losses", []))
    if peak_flops:
        r["mfu"] = round(model * tokens / s / peak_flops, 4)
        r["hfu"] = round(hardware * tokens / s / peak_flops, 4)
        if "xla_flops" in r:
            r["hfu_xla_count"] = round(r["xla_flops"] / s / peak_flops, 4)
    if r.get("peak_bytes"):
        r["peak_over_params"] = round(r["peak_bytes"] / r["param_bytes"], 4)
        for plan in ("plan_bytes", "xla_plan_bytes"):
            if r.get(plan):
                r[plan.replace("_bytes", "_vs_measured")] = round(r["peak_bytes"] / r[plan] - 1, 4)
    return r


def markdown(report: dict) -> str:
    gib = lambda b: f"{b / 2**30:.2f}" if b else "-"  # noqa: E731
    lines = [
        f"# GPU check: {report['device']} ({report['date']}, jax {report['jax']})",
        "",
        "| check | result | max rel. error |",
        "|---|---|---:|",
    ]
    for c in report["checks"]:
        res = c.get("skipped") or c.get("error") or ("pass" if c["ok"] else "FAIL")
        err = f"{c['max_rel_err']:.2e} (<= {c['tolerance']:.0e})" if "max_rel_err" in c else ""
        lines.append(f"| {c['check']} | {res} | {err} |")
    lines += [
        "",
        "| row | tokens/s | MFU | HFU | peak GiB | / params | deviceless plan GiB | "
        "XLA plan GiB | peak vs plan |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        if "error" in r or "tokens_per_s" not in r:
            lines.append(f"| {r['row']} | {r.get('error', 'not run')} | | | | | | | |")
            continue
        pct = lambda x: f"{100 * x:.1f}%" if x is not None else "-"  # noqa: E731
        vs = r.get("plan_vs_measured")
        lines.append(
            f"| {r['row']} | {r['tokens_per_s']:.0f} | {pct(r.get('mfu'))} | {pct(r.get('hfu'))} "
            f"| {gib(r.get('peak_bytes'))} | {r.get('peak_over_params', '-')} "
            f"| {gib(r.get('plan_bytes'))} | {gib(r.get('xla_plan_bytes'))} "
            f"| {'-' if vs is None else f'{100 * vs:+.1f}%'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on this machine's CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 5)")
    p.add_argument("--budget-s", type=float, default=450, help="start no row after this")
    p.add_argument("--parallel", type=int, default=3, help="row processes at once")
    p.add_argument("--rows", help="comma-separated indexes into the row list (default: all)")
    a = p.parse_args()
    t_start = time.perf_counter()
    a.out.mkdir(parents=True, exist_ok=True)
    # Several processes share the GPU: none may take 75% of it up front (this one included).
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if a.dry_run:
        os.environ["JAX_PLATFORMS"] = "cpu"
    import lomo_jax
    from lomo_jax import cuda_plugin

    lomo_jax.configure()  # as the CLI, before JAX starts
    cuda_plugin.import_jax()
    import jax

    device = jax.devices()[0]
    kind = device.device_kind
    peak = next((f for name, f in PEAK_FLOPS.items() if name in kind), None)
    target = "cpu" if a.dry_run else ("h200" if "H200" in kind else "h100")
    rows = DRY_ROWS if a.dry_run else ROWS
    if a.rows:
        rows = tuple(rows[int(i)] for i in a.rows.split(","))
    steps = a.steps or (2 if a.dry_run else 5)
    report = {
        "device": kind,
        "platform": device.platform,
        "date": time.strftime("%Y-%m-%d"),
        "jax": jax.__version__,
        "python": sys.version.split()[0],
        "peak_flops": peak,
        "plan_target": target,
        "checks": [],
        "rows": [],
    }

    saving = threading.Lock()

    def save():  # from the checks' thread and this one
        with saving:
            report["seconds"] = round(time.perf_counter() - t_start, 1)
            (a.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
            (a.out / "gpu_check.md").write_text(markdown(report))

    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    lock = work / "gpu.lock"
    env = dict(os.environ)
    plan_env = dict(env, JAX_PLATFORMS="cpu")  # deviceless plans compile on the CPU
    pool = concurrent.futures.ThreadPoolExecutor
    with pool(a.parallel) as row_pool, pool(2) as plan_pool, pool(1) as check_pool:
        plans = {
            r: plan_pool.submit(
                _child, ["--plan", _spec(r), "--target", target], plan_env, a.budget_s
            )
            for r in rows
            if r.memory
        }

        def checks():  # on the GPU, so in its turn; the rows compile meanwhile
            with gpu_turn(lock):
                report["checks"] = correctness("tiny" if a.dry_run else "small", work)
            save()

        checked = check_pool.submit(checks)
        results: dict[Row, dict] = {}
        rows_left, running = list(rows), {}
        while rows_left or running:
            while rows_left and len(running) < a.parallel:
                r = rows_left.pop(0)
                if time.perf_counter() - t_start > a.budget_s:
                    results[r] = {"error": "skipped: the time budget is spent"}
                    continue
                args = ["--row", _spec(r), "--steps", str(steps), "--lock", str(lock)]
                running[row_pool.submit(_child, args, env, a.budget_s)] = r
            if not running:
                break
            done, _ = concurrent.futures.wait(
                running, return_when=concurrent.futures.FIRST_COMPLETED
            )
            for fut in done:
                results[running.pop(fut)] = fut.result()
                report["rows"] = _rows(rows, results, plans, peak)
                save()
        checked.result()
        concurrent.futures.wait(plans.values())
        report["rows"] = _rows(rows, results, plans, peak)
    save()
    print(markdown(report))


def _spec(r: Row) -> str:
    return json.dumps(dataclasses.asdict(r))


def _rows(rows, results, plans, peak) -> list[dict]:
    out = []
    for r in rows:
        if r not in results:
            continue
        res = dict(results[r], row=r.name, **dataclasses.asdict(r))
        fut = plans.get(r)
        if fut is not None and fut.done():
            res.update({k if k != "error" else "plan_error": v for k, v in fut.result().items()})
        out.append(derive(r, res, peak))
    return out


def _run_child(argv: list[str]) -> None:
    """A child process: one row (`--row SPEC --steps N --lock FILE`) or one deviceless plan
    (`--plan SPEC --target T`); its result is its last line on stdout."""
    p = argparse.ArgumentParser()
    for flag in ("--row", "--plan", "--target", "--lock"):
        p.add_argument(flag)
    p.add_argument("--steps", type=int)
    a = p.parse_args(argv)
    spec = Row(**json.loads(a.row or a.plan))
    import lomo_jax
    from lomo_jax import cuda_plugin

    lomo_jax.configure()  # as the CLI, before JAX starts
    cuda_plugin.import_jax()
    if a.plan:
        if os.environ.get("JAX_PLATFORMS") == "cpu":  # a GPU machine: register the plugin
            import jax._src.xla_bridge as xb

            xb._discover_and_register_pjrt_plugins()
        result = deviceless_plan(spec, a.target)
    elif spec.method.startswith("torch"):
        try:
            import lomo_optim  # noqa: F401
            import torch  # noqa: F401
        except ImportError as e:
            result = {"error": f"skipped: {e} (the PyTorch reference needs torch and lomo-optim)"}
        else:
            result = torch_row(spec, a.steps, Path(a.lock))
    else:
        result = jax_row(spec, a.steps, Path(a.lock))
    print(json.dumps(result))


if __name__ == "__main__":
    if {"--row", "--plan"} & set(sys.argv):
        _run_child(sys.argv[1:])
    else:
        main()
