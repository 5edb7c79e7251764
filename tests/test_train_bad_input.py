"""Bad training / eval input: one line, exit 1, and an existing run is left exactly as it was."""

import json

import pytest

from lomo_jax.cli import main
from tests.conftest import CONFIGS, data_path, make_hf_dir


@pytest.fixture
def src(tmp_path):
    return make_hf_dir(tmp_path / "hf", CONFIGS["gqa"])  # vocab 96, no tokenizer


def snapshot(d):
    return {p: p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


CASES = {
    "missing file": (
        ["--data", "{tmp}/nope.json", "--format", "alpaca"],
        "nope.json: file not found",
    ),
    "wrong fields": (
        ["--data", "{tmp}/text.json", "--format", "alpaca"],
        "has no field 'instruction'",
    ),
    "not json": (["--data", "{tmp}/garbage.json", "--format", "alpaca"], "cannot read as json"),
    "unknown format": (["--data", "{tmp}/text.json", "--format", "poetry"], "invalid choice"),
    "unknown task": (
        ["--data", "{tmp}/text.json", "--format", "superglue", "--task", "nli"],
        "unknown task 'nli'",
    ),
    "task fields": (
        ["--data", "{tmp}/text.json", "--format", "superglue", "--task", "copa"],
        "missing field 'premise' for task copa",
    ),
    "mesh too big": (
        ["--data", "{tmp}/text.json", "--format", "text", "--mesh", "fsdp=16"],
        "--mesh 'fsdp=16' needs 16 devices, 1 are visible",
    ),
    "mesh typo": (
        ["--data", "{tmp}/text.json", "--format", "text", "--mesh", "fdsp=2"],
        "--mesh 'fdsp=2': expected comma-separated axis=size",
    ),
    "tokenizer too big": (
        ["--data", "{tmp}/text.json", "--format", "text", "--tokenizer", "{tok}"],
        "512 tokens do not fit the model's vocab_size 96",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_train_input_leaves_the_run_alone(tmp_path, src, capsys, case):
    (tmp_path / "text.json").write_text(json.dumps([{"text": "hello world " * 50}]))
    (tmp_path / "garbage.json").write_bytes(b"\x00\x01 not json {{{")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = snapshot(run)
    extra, message = CASES[case]
    tok = str(data_path("llama2c", "tok512.model")) if "tokenizer" in case else ""
    extra = [e.format(tmp=tmp_path, tok=tok) for e in extra]
    rc = (
        main(
            [
                "train",
                "--model",
                str(src),
                "--out",
                str(run),
                "--steps",
                "1",
                "--seq-len",
                "16",
                *extra,
            ]
        )
        if case != "unknown format"
        else None
    )
    if rc is None:  # argparse rejects an unknown choice itself (exit status 2)
        with pytest.raises(SystemExit) as e:
            main(["train", "--model", str(src), "--out", str(run), *extra])
        assert e.value.code == 2
        rc = 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and message in err, err
    assert snapshot(run) == before


def test_existing_run_is_not_overwritten(tmp_path, src, capsys):
    (tmp_path / "text.json").write_text(json.dumps([{"input_ids": [1] * 16}]))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("precious\n")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"input_ids": [1] * 16}) + "\n")
    assert (
        main(
            [
                "train",
                "--model",
                str(src),
                "--data",
                str(rows),
                "--out",
                str(run),
                "--steps",
                "1",
                "--seq-len",
                "16",
                "--batch-size",
                "1",
            ]
        )
        == 1
    )
    assert "already exists (pass --resume" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == "precious\n"
