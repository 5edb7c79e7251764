"""`lomo-jax train` end to end: the CLI's weights equal the engine driven directly."""

import json

import jax
import numpy as np
import pytest
import yaml

import lomo_jax
from lomo_jax.baseline import accumulated_value_and_grad
from lomo_jax.cli import main
from lomo_jax.engine import init_train_state, make_fused_step
from lomo_jax.loss import IGNORE, Batch
from lomo_jax.optim import AdaLomo
from lomo_jax.schedule import Schedule
from lomo_jax.sharding import Layout, make_mesh
from lomo_jax.train_step import StepOptions, make_train_step
from tests.conftest import CONFIGS, make_hf_dir, random_ids, train_args

CFG = CONFIGS["gqa"]


def write_rows(path, rows):
    path.write_text("".join(json.dumps({"input_ids": r.tolist()}) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_train_cli_matches_engine_and_exports(tmp_path, capsys):
    src = make_hf_dir(tmp_path / "hf", CFG)
    rows = random_ids(CFG, 8, 16, seed=3)
    data = write_rows(tmp_path / "data.jsonl", rows)
    args = train_args(
        src,
        data,
        tmp_path / "ckpt",
        "--optimizer",
        "adalomo",
        "--lr",
        "0.01",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--schedule",
        "linear",
        "--warmup-steps",
        "1",
        "--weight-decay",
        "0.1",
        "--clip-grad-norm",
        "1.0",
        "--no-shuffle",
    )
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "step 3/3" in err and "tok/s" in err and "peak mem" in err

    # The CLI lays the state out on a mesh of every visible device (here one): so does this.
    layout = Layout(make_mesh())
    rule = AdaLomo(weight_decay=0.1, clip_grad_norm=1.0)
    step = make_fused_step(CFG, rule, Schedule(0.01, "linear", 1, 3), layout=layout)
    params = lomo_jax.from_pretrained(src, layout=layout).params
    state = init_train_state(rule, params, layout=layout)
    for k in range(3):
        ids = rows[2 * k : 2 * k + 2]
        state, _ = step(state, layout.put_batch(Batch(ids, ids)))
    trained = lomo_jax.from_pretrained(tmp_path / "ckpt").params
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf-out")]) == 0


def test_gradient_accumulation_equals_the_whole_batch():
    """Four micro-batches of 2 rows give the loss and gradient of one batch of 8, also when the
    rows carry different numbers of loss tokens (the slices are weighted by them)."""
    ids = random_ids(CFG, 8, 16, seed=5)
    labels = ids.copy()
    for r in range(8):
        labels[r, : 2 * r] = IGNORE  # row r: 2r prompt tokens without loss
    batch = Batch(ids, labels)
    params = lomo_jax.init_params(CFG, jax.random.key(1))
    whole = jax.jit(accumulated_value_and_grad, static_argnums=(0, 3))(CFG, params, batch, 1)
    split = jax.jit(accumulated_value_and_grad, static_argnums=(0, 3))(CFG, params, batch, 4)
    np.testing.assert_allclose(split[0], whole[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(split[1]), jax.tree.leaves(whole[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_train_cli_accumulates_gradients(tmp_path):
    src = make_hf_dir(tmp_path / "hf", CFG)
    rows = random_ids(CFG, 8, 16, seed=3)
    data = write_rows(tmp_path / "data.jsonl", rows)
    flags = ["--optimizer", "sgd", "--lr", "0.1", "--steps", "2", "--seq-len", "16"]
    flags += ["--batch-size", "2", "--gradient-accumulation-steps", "2", "--no-shuffle"]
    assert main(train_args(src, data, tmp_path / "r", *flags)) == 0

    # The un-accumulated step on the 4 rows of each step.
    init, step = make_train_step(StepOptions("sgd", lr=0.1, total_steps=2), CFG)
    state = init(lomo_jax.from_pretrained(src).params)
    for k in range(2):
        ids = rows[4 * k : 4 * k + 4]
        state, _ = step(state, Batch(ids, ids))
    trained = lomo_jax.from_pretrained(tmp_path / "r").params
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--gradient-accumulation-steps", "4"], "gradient accumulation is impossible"),
        (["--seq-len", "8"], "row has 16 tokens, --seq-len is 8"),
    ],
)
def test_train_cli_bad_input(tmp_path, capsys, extra, message):
    src = make_hf_dir(tmp_path / "hf", CFG)
    data = write_rows(tmp_path / "data.jsonl", random_ids(CFG, 4, 16))
    flags = ["--steps", "1", "--batch-size", "2", "--seq-len", "16", *extra]
    args = train_args(src, data, tmp_path / "ckpt", *flags)
    if "--seq-len" in extra:
        args = args[: args.index("--seq-len")] + args[args.index("--seq-len") + 2 :]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err and err.startswith("lomo-jax: error:")
    assert not (tmp_path / "ckpt").exists()


def test_yaml_config_with_flag_overrides(tmp_path):
    src = make_hf_dir(tmp_path / "hf", CFG)
    data = write_rows(tmp_path / "data.jsonl", random_ids(CFG, 8, 16, seed=3))
    (tmp_path / "run.yaml").write_text(
        f"model: {src}\ndata: {data}\nseq_len: 16\nbatch_size: 2\nsteps: 2\n"
        "optimizer: lomo\nlr: 0.5\nschedule: cosine\nrounding: nearest\n"
    )
    assert (
        main(
            [
                "train",
                "--config",
                str(tmp_path / "run.yaml"),
                "--lr",
                "0.01",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    resolved = yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())
    assert resolved["lr"] == 0.01 and resolved["optimizer"] == "lomo"
    assert resolved["schedule"] == "cosine" and resolved["steps"] == 2
    assert resolved["rounding"] == "nearest"


@pytest.mark.parametrize(
    "text, message",
    [
        ("learning_rate: 0.1\n", "unknown option 'learning_rate'"),
        ("model: m\ndata: d\nout: o\nrounding: up\n", "rounding: 'up'; choose from"),
    ],
)
def test_yaml_config_rejects_unknown_options(tmp_path, capsys, text, message):
    (tmp_path / "run.yaml").write_text(text)
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 1
    assert message in capsys.readouterr().err
