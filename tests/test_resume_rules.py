"""A run's history is never rewritten: `--resume` below the latest checkpoint is refused (a new
run from an earlier checkpoint goes back instead), a refused resume changes nothing, the options
a resume may change follow one rule whether from flags or `--config`, and a run resumes from any
working directory."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import yaml

from lomo_jax import checkpoint, resume
from lomo_jax.checkpoint import read_params
from lomo_jax.cli import main
from tests.conftest import CONFIGS, make_hf_dir, random_ids, train_args
from tests.test_train_cli import write_rows

CFG = CONFIGS["gqa"]
FLAGS = ["--batch-size", "4", "--seq-len", "16", "--lr", "0.01", "--save-every", "1"]
FLAGS += ["--keep-checkpoints", "0", "--eval-fraction", "0.25", "--eval-every", "2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished AdaLomo run of 4 steps with a checkpoint after each, and its inputs."""
    d = tmp_path_factory.mktemp("base")
    src = make_hf_dir(d / "hf", CFG)
    other = make_hf_dir(d / "hf-wide", CFG.replace(intermediate_size=256))
    data = write_rows(d / "data.jsonl", random_ids(CFG, 24, 16, seed=1))
    assert main(train_args(src, data, d / "run", *FLAGS, "--steps", "4")) == 0
    return d, src, other, data


@pytest.fixture
def run(tmp_path, base):
    shutil.copytree(base[0] / "run", tmp_path / "run")
    return tmp_path / "run"


def snapshot(d):
    """Every file of the run a resume must leave as it was: options, history, checkpoints."""
    keep = ("train_config.yaml", "metrics.jsonl", "checkpoints")
    return {
        str(p.relative_to(d)): p.read_bytes()
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.relative_to(d).parts[0] in keep
    }


def steps(run) -> list[tuple]:
    return [(m["step"], "loss" in m) for m in map(json.loads, (run / "metrics.jsonl").open())]


def losses(run) -> list[tuple]:
    lines = map(json.loads, (run / "metrics.jsonl").open())
    return [(m["step"], m.get("loss"), m.get("eval_loss")) for m in lines]


def last_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err), "\n".join(err[-20:])
    return err[-1]


# ---- 1. --steps below the latest checkpoint ---------------------------------------------------
def test_steps_below_the_latest_checkpoint_are_refused(run, capsys):
    shutil.rmtree(run / "checkpoints" / "step_00000003")  # as --keep-checkpoints may have
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--steps", "3"]) == 1
    assert last_line(capsys) == (
        f"lomo-jax: error: {run}: --steps 3 is below its checkpoint of step 4, and a run's "
        "history is never rewritten; to go back, start a new run from an earlier checkpoint: "
        f"lomo-jax train --resume {run} --from-checkpoint step_00000002 --out NEW --steps 3"
    )
    assert snapshot(run) == before

    for name in ("step_00000001", "step_00000002"):
        shutil.rmtree(run / "checkpoints" / name)
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--steps", "2"]) == 1  # no checkpoint that early
    assert last_line(capsys).endswith(
        "to go back, start a new run with its options: lomo-jax train --config "
        f"{run / 'train_config.yaml'} --out NEW --steps 2"
    )
    assert snapshot(run) == before


@pytest.mark.slow
def test_a_new_run_from_an_earlier_checkpoint_goes_back(tmp_path, run, capsys):
    before = snapshot(run)
    new = tmp_path / "new"
    argv = ["train", "--resume", str(run), "--from-checkpoint", "step_00000002"]
    assert main([*argv, "--out", str(new), "--steps", "3"]) == 0
    assert snapshot(run) == before  # the run it came from is untouched
    assert steps(new) == [(1, True), (2, True), (2, False), (3, True), (3, False)]
    saved = yaml.safe_load((new / "train_config.yaml").read_text())
    assert saved["steps"] == 3 and saved["from_checkpoint"] == str(
        run / "checkpoints" / "step_00000002"
    )
    # The same as the run it came from, which went straight on (a constant learning rate).
    assert losses(new)[:4] == losses(run)[:4]  # steps 1 and 2, validation at 2, step 3
    a, b = (
        read_params(new / "params"),
        read_params(run / "checkpoints" / "step_00000003" / "params"),
    )
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_from_checkpoint_needs_a_new_out(run, capsys):
    argv = ["train", "--resume", str(run), "--from-checkpoint", "step_00000002"]
    assert main(argv) == 1
    assert last_line(capsys) == (
        "lomo-jax: error: --from-checkpoint starts a new run: give its --out"
    )
    assert main([*argv, "--out", str(run)]) == 1
    assert f"{run}: already exists" in last_line(capsys)
    assert main([*argv[:3], "--from-checkpoint", "step_00000005", "--out", str(run) + "2"]) == 1
    assert last_line(capsys).endswith(
        "step_00000005: no such checkpoint; it has step_00000001, step_00000002, step_00000003, "
        "step_00000004"
    )
    nowhere = run.parent / "nowhere" / "step_00000002"  # a checkpoint's path, without --resume
    assert main(["train", "--from-checkpoint", str(nowhere), "--out", str(run) + "2"]) == 1
    assert last_line(capsys) == f"lomo-jax: error: {nowhere}: no such checkpoint"
    assert not (run.parent / "run2").exists()


def test_resuming_a_finished_run_rewrites_nothing(run, capsys):
    before = snapshot(run)
    assert main(["train", "--resume", str(run)]) == 0
    assert snapshot(run) == before
    assert "already trained to step 4; nothing to do" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_stopped_before_its_model_was_written_writes_it(run, monkeypatch, capsys):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(run / "params"))

    monkeypatch.setattr(checkpoint, "write_model", full_disk)
    assert main(["train", "--resume", str(run), "--steps", "6"]) == 1  # the step-4 model stays
    monkeypatch.undo()
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--steps", "6"]) == 0
    assert snapshot(run) == before  # no step, validation or checkpoint taken again
    final = read_params(run / "checkpoints" / "step_00000006" / "params")
    assert all(
        np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(read_params(run / "params")), jax.tree.leaves(final))
    )


# ---- 2. a refused resume changes nothing ------------------------------------------------------
REFUSED = [
    ("--model {other}", "--model: a resumed run keeps its model"),
    ("--dtype bfloat16", "--dtype: a resumed run keeps its dtype (float32)"),
    ("--optimizer adamw", "--optimizer: a resumed run keeps its optimizer (adalomo)"),
    ("--optimizer lomo", "--optimizer: a resumed run keeps its optimizer (adalomo)"),
    ("--tokenizer {other}", "--tokenizer: a resumed run keeps its tokenizer (its model's)"),
    ("--out {other}", "--out: a resumed run stays in"),
    ("--lora-rank 4", "--lora-rank: a resumed run keeps its lora_rank (none)"),
    (
        "--lora-targets q_proj",
        "--lora-targets: a resumed run keeps its lora_targets (q_proj,v_proj)",
    ),
    ("--adapter {other}", "--adapter: a resumed run keeps its adapter (none)"),
]


def test_a_refused_resume_leaves_the_run_alone(base, run, capsys):
    before = snapshot(run)
    for change, problem in REFUSED:
        flags = change.format(other=base[2]).split()
        assert main(["train", "--resume", str(run), "--steps", "6", *flags]) == 1, change
        err = last_line(capsys)
        assert err.startswith("lomo-jax: error: ") and problem in err, err
        assert snapshot(run) == before, change  # so a plain --resume goes on as before


# ---- 3. one rule for --config and the flags given with --resume -------------------------------
@pytest.mark.slow
def test_a_config_file_given_with_resume_follows_the_same_rule(tmp_path, run, capsys):
    changes = tmp_path / "more.yaml"
    changes.write_text("optimizer: lomo\nsteps: 6\n")
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--config", str(changes)]) == 1
    assert last_line(capsys) == (
        f"lomo-jax: error: {changes}: optimizer: a resumed run keeps its optimizer (adalomo): "
        "its checkpoints hold that optimizer's state; start a new run for another"
    )
    assert snapshot(run) == before

    changes.write_text("steps: 7\nlr: 0.005\neval_every: 3\n")
    assert main(["train", "--resume", str(run), "--config", str(changes), "--steps", "6"]) == 0
    changed = "resuming with --eval-every 3 (was 2), --lr 0.005 (was 0.01), --steps 6 (was 4)"
    assert changed in capsys.readouterr().err  # the flag wins over the file
    saved = yaml.safe_load((run / "train_config.yaml").read_text())
    assert (saved["steps"], saved["lr"], saved["eval_every"]) == (6, 0.005, 3)
    assert steps(run) == [(s, True) for s in (1, 2)] + [(2, False)] + [
        (s, True) for s in (3, 4)
    ] + [(4, False), (5, True), (6, True), (6, False)]


# ---- 4. a run resumes from any working directory ----------------------------------------------
@pytest.mark.slow
def test_a_run_resumes_from_another_directory(tmp_path, base, monkeypatch):
    _, src, _, data = base
    first, elsewhere = tmp_path / "first", tmp_path / "elsewhere"
    first.mkdir()
    elsewhere.mkdir()
    shutil.copytree(src, first / "model")
    shutil.copy(data, first / "data.jsonl")
    monkeypatch.chdir(first)
    flags = ["--batch-size", "4", "--seq-len", "16", "--steps", "2"]
    assert main(train_args("model", "data.jsonl", "runs/a", *flags)) == 0
    config = first / "runs" / "a" / "train_config.yaml"
    saved = yaml.safe_load(config.read_text())
    absolute = (str(first / "model"), str(first / "data.jsonl"), str(first / "runs" / "a"))
    assert (saved["model"], saved["data"], saved["out"]) == absolute

    # As an older version saved it: relative to the directory the run was started from.
    config.write_text(yaml.safe_dump(dict(saved, model="model", data="data.jsonl", out="runs/a")))
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", os.path.relpath(first / "runs" / "a"), "--steps", "3"]) == 0
    saved = yaml.safe_load(config.read_text())
    assert (saved["model"], saved["data"], saved["out"]) == absolute


def test_saved_paths_are_absolute_and_hub_ids_stay_ids(tmp_path):
    (tmp_path / "org" / "local").mkdir(parents=True)
    given = {
        "model": "meta-llama/Llama-3.2-1B",
        "data": "tatsu-lab/alpaca:train[:10%]",
        "eval_data": "org/local",
        "chat_template": "chat.jinja",
        "adapter": "lora/adapter",
        "template": None,
    }
    saved = resume.absolute(given, tmp_path)
    assert saved["adapter"] == str(tmp_path / "lora" / "adapter")
    assert saved["model"] == given["model"] and saved["data"] == given["data"]
    assert saved["eval_data"] == str(tmp_path / "org" / "local")  # a path of an id's form is a path
    assert saved["chat_template"] == str(tmp_path / "chat.jinja")
    assert saved["template"] is None


# ---- 5. a LoRA run keeps its factors' shape; their AdamW options may change -------------------
LORA_RUN = {
    "model": "/models/base",
    "optimizer": "lomo",
    "lora_rank": 8,
    "lora_alpha": None,
    "lora_targets": "q_proj,v_proj",
    "adapter": None,
    "lora_dropout": 0.0,
    "lora_lr": 5e-4,
    "lora_schedule": None,
    "lora_warmup_steps": None,
    "lora_weight_decay": 0.0,
}


def test_a_lora_run_keeps_the_shape_of_its_factors(tmp_path):
    refused = {
        "lora_rank": (16, "lora_rank (8): its checkpoints hold LoRA factors of that rank"),
        "lora_alpha": (32.0, "lora_alpha (none): its factors were trained at that scale"),
        "lora_targets": ("q_proj,k_proj,v_proj", "lora_targets (q_proj,v_proj): its checkpoints"),
        "adapter": (str(tmp_path / "adapter"), "adapter (none): its factors began from that"),
    }
    for name, (value, kept) in refused.items():
        with pytest.raises(resume.ResumeError) as e:
            resume.resumed_options(LORA_RUN, {name: value}, {}, tmp_path)
        flag = "--" + name.replace("_", "-")
        assert str(e.value).startswith(f"{flag}: a resumed run keeps its {kept}"), str(e.value)
        assert str(e.value).endswith("; start a new run for another")
    with pytest.raises(resume.ResumeError, match=r"^more.yaml: lora_rank: a resumed run keeps"):
        resume.resumed_options(LORA_RUN, {"lora_rank": 4}, {"lora_rank": "more.yaml"}, tmp_path)

    may_change = {
        "lora_lr": 1e-3,
        "lora_schedule": "cosine",
        "lora_warmup_steps": 5,
        "lora_weight_decay": 0.1,
        "lora_dropout": 0.1,
        "lora_rank": 8,  # given as it was: no change
    }
    options, changes = resume.resumed_options(LORA_RUN, may_change, {}, tmp_path)
    assert options == LORA_RUN | may_change
    assert changes == [
        "--lora-dropout 0.1 (was 0.0)",
        "--lora-lr 0.001 (was 0.0005)",
        "--lora-schedule cosine (was None)",
        "--lora-warmup-steps 5 (was None)",
        "--lora-weight-decay 0.1 (was 0.0)",
    ]
