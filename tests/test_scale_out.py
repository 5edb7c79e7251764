"""Scale-out: the sharded fused step on 8 host-platform CPU devices and across 2 processes gives
the weights of one device; checkpoints move between meshes. Multi-device runs happen in
subprocesses (the device count is fixed when JAX starts)."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

import lomo_jax
from lomo_jax.cli import main
from lomo_jax.sharding import Layout, MeshError, param_axes, parse_mesh
from tests.conftest import CONFIGS, make_hf_dir, random_ids, train_args
from tests.test_train_cli import write_rows

CFG = CONFIGS["gqa"]  # hidden 64, 4 heads (2 kv), intermediate 192: all divisible by 8
OPTIMIZERS = {
    "lomo": ["--optimizer", "lomo", "--lr", "0.05", "--clip-grad-norm", "0.5"],
    "adalomo": ["--optimizer", "adalomo", "--lr", "0.01", "--weight-decay", "0.01"],
}
MESHES = ("fsdp=1", "fsdp=8", "data=2,fsdp=4")
PROMPTS = [[1, 5, 9], [1, 7, 2]]
TIMEOUT = 600  # a process whose peer died waits for the coordinator's barrier timeout


def test_mesh_spec():
    assert parse_mesh(None, 8) == {"data": 1, "fsdp": 8}
    assert parse_mesh("data=2", 8) == {"data": 2, "fsdp": 4}
    assert parse_mesh("fsdp=2", 8) == {"data": 1, "fsdp": 2}  # the first 2 devices
    for bad in ("fsdp=16", "fsdp=0", "tensor=2", "fsdp"):
        with pytest.raises(MeshError):
            parse_mesh(bad, 8)


def test_partitioning_rules():
    lay = Layout(AbstractMesh((2, 4), ("data", "fsdp")))
    P = PartitionSpec

    def spec(name, shape):
        return lay.spec(param_axes(name), shape)

    # Every matrix is split along its first axis that fsdp divides; vectors stay whole.
    assert spec("layers.self_attn.q_proj.kernel", (3, 64, 32)) == P(None, "fsdp", None)
    assert spec("layers.self_attn.o_proj.kernel", (3, 32, 64)) == P(None, "fsdp", None)
    assert spec("layers.mlp.down_proj.kernel", (3, 192, 64)) == P(None, "fsdp", None)
    assert spec("embed.embedding", (96, 64)) == P("fsdp", None)
    assert spec("lm_head.kernel", (64, 96)) == P("fsdp", None)
    assert spec("layers.input_layernorm.weight", (3, 64)) == P(None, None)
    assert spec("layers.self_attn.q_proj.kernel", (3, 62, 64)) == P(None, None, "fsdp")
    # The batch goes over data, and over fsdp too where it divides.
    assert lay.spec(("batch", "length"), (8, 16)) == P(("data", "fsdp"), None)
    assert lay.spec(("batch", "length"), (2, 16)) == P("data", None)
    with pytest.raises(KeyError, match="no sharding rule"):
        param_axes("layers.mystery.kernel")


REPO = Path(__file__).resolve().parents[1]


def _env(devices: int) -> dict:
    """A subprocess environment with `devices` host-platform CPU devices (and XLA_FLAGS as
    `lomo_jax.configure()` set them here) and this repository importable (lomo_jax, tests)
    wherever pytest was started."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env = dict(os.environ, XLA_FLAGS=flags.strip())
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _train_args(src, data, out, optimizer: str) -> list[str]:
    steps = ["--steps", "4", "--batch-size", "8", "--seq-len", "16"]
    return train_args(src, data, out, *OPTIMIZERS[optimizer], *steps)


def _weights(path) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(lomo_jax.from_pretrained(path).params)]


def _assert_close(a_dir, b_dir, rtol=1e-5):
    for a, b in zip(_weights(a_dir), _weights(b_dir), strict=True):
        assert np.max(np.abs(a - b)) <= rtol * np.max(np.abs(a)), (a_dir, b_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every optimizer on every mesh, in one process that sees 8 CPU devices."""
    tmp = tmp_path_factory.mktemp("scale_out")
    src = make_hf_dir(tmp / "hf", CFG)
    data = write_rows(tmp / "data.jsonl", random_ids(CFG, 32, 16, seed=3))
    jobs = [
        _train_args(src, data, tmp / f"{opt}-{mesh}", opt) + ["--mesh", mesh]
        for opt in OPTIMIZERS
        for mesh in MESHES
    ]
    trained = str(tmp / "adalomo-fsdp=8")
    evaluate = ["eval", trained, "--data", str(data), "--seq-len", "16", "--json"]
    script = (
        "import json, lomo_jax\n"
        "from lomo_jax.cli import main\n"
        "from lomo_jax.sharding import Layout, make_mesh\n"
        + "".join(f"assert main({args!r}) == 0\n" for args in jobs)
        # The trained model evaluated and generating with its weights sharded over 8 devices.
        + f"assert main({evaluate + ['--mesh', 'fsdp=8']!r}) == 0\n"
        + f"m = lomo_jax.from_pretrained({trained!r}, layout=Layout(make_mesh('fsdp=8')))\n"
        + f"print(json.dumps(m.generate({PROMPTS!r}, 8)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=_env(8),
        check=True,
        timeout=TIMEOUT,
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    sharded_eval, sharded_tokens = done.stdout.strip().splitlines()[-2:]
    return tmp, src, data, evaluate, json.loads(sharded_eval), json.loads(sharded_tokens)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("mesh", ["fsdp=8", "data=2,fsdp=4"])
def test_sharded_training_equals_one_device(runs, optimizer, mesh):
    tmp = runs[0]
    _assert_close(tmp / f"{optimizer}-fsdp=1", tmp / f"{optimizer}-{mesh}")
    # ...and it trained: every tensor moved.
    moved = zip(_weights(tmp / "hf"), _weights(tmp / f"{optimizer}-{mesh}"))
    assert all(np.any(a != b) for a, b in moved)


@pytest.mark.slow
def test_sharded_eval_and_generate_equal_one_device(runs, capsys):
    tmp, _, _, evaluate, sharded_eval, sharded_tokens = runs
    assert main(evaluate) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert one["tokens"] == sharded_eval["tokens"] > 0
    assert abs(one["loss"] - sharded_eval["loss"]) <= 1e-5 * one["loss"]
    model = lomo_jax.from_pretrained(tmp / "adalomo-fsdp=8")
    assert model.generate(PROMPTS, 8) == sharded_tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_and_checkpoints_change_mesh(runs, tmp_path):
    tmp, src, data = runs[:3]
    out = tmp_path / "two"
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "lomo_jax.cli"]
            + _train_args(src, data, out, "adalomo")
            + [
                "--save-every",
                "2",
                "--coordinator-address",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "over 2 process(es)" in logs[0]
    _assert_close(tmp / "adalomo-fsdp=8", out)

    # The 2-process checkpoint of step 2 (saved from an 8-device mesh across two hosts) resumes
    # here, in one process on one device, and reaches the same weights.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    assert main(["train", "--resume", str(resumed), "--mesh", "fsdp=1"]) == 0
    _assert_close(out, resumed)


def _pieces_on_mesh(directory: str) -> None:
    """(Runs on 8 devices.) A checkpoint whose stacks are saved in layer pieces restores into
    the shards of a mesh, bit for bit, with the layout asked for."""
    import lomo_jax.checkpoint as ckpt
    from lomo_jax.sharding import make_mesh, put

    layout = Layout(make_mesh("data=2,fsdp=4"))
    params = jax.tree.map(np.asarray, lomo_jax.init_params(CFG, jax.random.key(1)))
    # Every stacked matrix here is larger than the pieces.
    ckpt.write_params(Path(directory), put(params, layout.params(params)), piece_bytes=10_000)
    assert (Path(directory) / "layers.mlp.up_proj.kernel@1").is_dir()
    back = ckpt.read_params(Path(directory), layout.param)
    for a, b, s in zip(
        jax.tree.leaves(back), jax.tree.leaves(params), jax.tree.leaves(layout.params(params))
    ):
        assert a.sharding == s and np.asarray(a).tobytes() == b.tobytes()


@pytest.mark.slow
def test_layer_pieces_restore_into_shards(tmp_path):
    code = f"from tests.test_scale_out import _pieces_on_mesh; _pieces_on_mesh({str(tmp_path)!r})"
    subprocess.run([sys.executable, "-c", code], env=_env(8), check=True, timeout=TIMEOUT)


def _no_stack_copies_on_mesh() -> None:
    """(Runs on 8 devices.) The sharded fused step updates the stacks' shards in place: no
    instruction copies a stacked matrix. (Split along their last axis, the stacks got another
    memory layout for the collectives and were copied whole: 1.54 x the share at 65B.)"""
    from lomo_jax.sharding import make_mesh
    from tests.test_engine_memory import compile_step, stack_copies

    layout = Layout(make_mesh("fsdp=8"))
    for method in ("fused-lomo", "fused-adalomo"):
        _, compiled = compile_step(method, 16, layout=layout)
        assert stack_copies(compiled, 16, matrices_only=True) == [], method


@pytest.mark.slow
def test_sharded_step_copies_no_stack():
    code = "from tests.test_scale_out import _no_stack_copies_on_mesh; _no_stack_copies_on_mesh()"
    subprocess.run([sys.executable, "-c", code], env=_env(8), check=True, timeout=TIMEOUT)


def _rounding_on_meshes() -> None:
    """(Runs on 8 devices.) Stochastic rounding draws the same bits however the weights are
    split: fused bfloat16 LOMO steps on fsdp=8 give the weights of one device bit for bit.
    Every label is masked, so the gradients are exactly zero and the update is weight decay
    alone, the same float32 values on every mesh (a real loss is summed in another order on
    each mesh, so no run with one is bit-identical across meshes, float32 included); what is
    left to differ is the rounding."""
    import jax.numpy as jnp

    from lomo_jax.engine import init_train_state, make_fused_step
    from lomo_jax.loss import IGNORE, Batch
    from lomo_jax.optim import Lomo
    from lomo_jax.schedule import Schedule
    from lomo_jax.sharding import make_mesh, put

    rule = Lomo(weight_decay=0.1)
    start = jax.tree.map(
        lambda x: np.asarray(x.astype(jnp.bfloat16)), lomo_jax.init_params(CFG, jax.random.key(2))
    )
    ids = random_ids(CFG, 8, 16, seed=4)
    batch = Batch(ids, np.full_like(ids, IGNORE))

    def train(mesh: str) -> list[np.ndarray]:
        layout = Layout(make_mesh(mesh))
        step = make_fused_step(CFG, rule, Schedule(0.05), layout=layout, seed=3)
        state = init_train_state(rule, put(start, layout.params(start)), layout=layout)
        for _ in range(2):
            state, _ = step(state, layout.put_batch(batch))
        return [np.asarray(x) for x in jax.tree.leaves(state.params)]

    one = train("fsdp=1")
    # The decay (0.5% a step) is below half an ulp: rounded to nearest nothing would move.
    moved = np.mean(np.concatenate([(a != b).ravel() for a, b in zip(one, jax.tree.leaves(start))]))
    assert moved > 0.3, moved
    for a, b in zip(one, train("fsdp=8"), strict=True):
        assert a.tobytes() == b.tobytes()


@pytest.mark.slow
def test_stochastic_rounding_is_the_same_on_every_mesh():
    code = "from tests.test_scale_out import _rounding_on_meshes; _rounding_on_meshes()"
    subprocess.run([sys.executable, "-c", code], env=_env(8), check=True, timeout=TIMEOUT)
