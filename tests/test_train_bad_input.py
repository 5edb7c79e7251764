"""Bad training / eval input: one line, exit 1, and an existing run is left exactly as it was;
every option is checked before anything is written."""

import json

import pytest
import yaml

from lomo_jax.cli import main
from lomo_jax.train import TrainConfig
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
    "text file as tokenizer": (
        ["--data", "{tmp}/rows.jsonl", "--tokenizer", "{tmp}/notes.txt"],
        "notes.txt: not a SentencePiece model",
    ),
    "batch size 0": (
        ["--data", "{tmp}/rows.jsonl", "--batch-size", "0"],
        "--batch-size: must be at least 1, got 0",
    ),
    "negative batch size": (
        ["--data", "{tmp}/rows.jsonl", "--batch-size", "-2"],
        "--batch-size: must be at least 1, got -2",
    ),
    "batch larger than the data": (
        ["--data", "{tmp}/rows.jsonl", "--batch-size", "5"],
        "--batch-size: 5 rows per step, but {tmp}/rows.jsonl gives 4 training rows",
    ),
    "batch larger than what is left for training": (
        ["--data", "{tmp}/rows.jsonl", "--batch-size", "4", "--eval-fraction", "0.25"],
        "gives 3 training rows (1 held out for validation)",
    ),
    "zero steps": (
        ["--data", "{tmp}/rows.jsonl", "--steps", "0"],
        "--steps: must be at least 1, got 0",
    ),
    "negative lr": (
        ["--data", "{tmp}/rows.jsonl", "--lr", "-0.1"],
        "--lr: must be at least 0, got -0.1",
    ),
    "negative clip": (
        ["--data", "{tmp}/rows.jsonl", "--clip-grad-norm", "-1"],
        "--clip-grad-norm: must be positive (0 or absent: no clipping), got -1.0",
    ),
    "eval fraction 1": (
        ["--data", "{tmp}/rows.jsonl", "--eval-fraction", "1"],
        "--eval-fraction: must be in [0, 1), got 1.0",
    ),
    "seq len beyond the context": (
        ["--data", "{tmp}/long.jsonl", "--seq-len", "200"],
        "--seq-len 200 is beyond the model's context (max_position_embeddings 128)",
    ),
    "negative token id": (
        ["--data", "{tmp}/negative.jsonl"],
        "negative.jsonl:3: token id -1 does not fit",
    ),
    "token id beyond the vocabulary": (
        ["--data", "{tmp}/big.jsonl"],
        "big.jsonl:2: token id 96 does not fit the model's vocab_size 96",
    ),
    "fractional token ids": (
        ["--data", "{tmp}/floats.jsonl"],
        "floats.jsonl:2: 'input_ids' must be a list of integer token ids",
    ),
    "token ids as text": (
        ["--data", "{tmp}/strings.jsonl"],
        "strings.jsonl:1: 'input_ids' must be a list of integer token ids",
    ),
    "binary data": (["--data", "{tmp}/garbage.bin"], "garbage.bin:2: not UTF-8 text"),
    "directory as pretokenized data": (
        ["--data", "{tmp}"],
        "a directory; --format pretokenized reads one",
    ),
    "bad json line": (
        ["--data", "{tmp}/broken.jsonl", "--format", "alpaca"],
        "broken.jsonl:2: cannot read as json",
    ),
    "alpaca field not text": (
        ["--data", "{tmp}/numbers.json", "--format", "alpaca"],
        "numbers.json: record 2: field 'output' must be text, got list (format alpaca)",
    ),
    "text field not text": (
        ["--data", "{tmp}/numbers.jsonl", "--format", "text"],
        "numbers.jsonl:1: field 'text' must be text, got int (format text)",
    ),
    "template syntax": (
        ["--data", "{tmp}/alpaca.json", "--format", "template", "--template", "{tmp}/brace.yaml"],
        "brace.yaml: prompt: expected '}' before end of string",
    ),
    "template positional field": (
        [
            "--data",
            "{tmp}/alpaca.json",
            "--format",
            "template",
            "--template",
            "{tmp}/positional.yaml",
        ],
        "positional.yaml: response: every {} needs a field name",
    ),
    "template attribute": (
        [
            "--data",
            "{tmp}/alpaca.json",
            "--format",
            "template",
            "--template",
            "{tmp}/attribute.yaml",
        ],
        "alpaca.json: record 1: cannot fill in {tmp}/attribute.yaml: "
        "'str' object has no attribute 'x'",
    ),
    "template not text": (
        ["--data", "{tmp}/alpaca.json", "--format", "template", "--template", "{tmp}/number.yaml"],
        "number.yaml: prompt must be text, got int",
    ),
    "task label": (
        ["--data", "{tmp}/copa.jsonl", "--format", "superglue", "--task", "copa"],
        "copa.jsonl:1: not a copa record",
    ),
    "out under a file": (
        ["--data", "{tmp}/rows.jsonl", "--out", "{tmp}/notes.txt/run"],
        "{tmp}/notes.txt/run: cannot be created, {tmp}/notes.txt is a file",
    ),
}


def write_inputs(tmp):
    """The files the cases above name."""
    row = lambda ids: json.dumps({"input_ids": ids}) + "\n"  # noqa: E731
    good = [row(list(range(1, 17)))] * 2
    files = {
        "text.json": json.dumps([{"text": "hello world " * 50}]),
        "rows.jsonl": "".join(good * 2),
        "long.jsonl": row([1] * 200) * 4,
        "negative.jsonl": "".join(good) + row([-1] * 16),
        "big.jsonl": good[0] + row([96] * 16),
        "floats.jsonl": good[0] + row([1.5] * 16),
        "strings.jsonl": row(["a"] * 16),
        "broken.jsonl": json.dumps({"instruction": "a", "output": "b"}) + "\n{oops\n",
        "numbers.json": json.dumps(
            [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": [1]}]
        ),
        "numbers.jsonl": json.dumps({"text": 5}) + "\n",
        "alpaca.json": json.dumps([{"instruction": "a", "output": "b"}]),
        "brace.yaml": "prompt: 'x {instruction'\nresponse: '{output}'\n",
        "positional.yaml": "prompt: '{instruction}'\nresponse: '{}'\n",
        "attribute.yaml": "prompt: '{instruction.x}'\nresponse: '{output}'\n",
        "number.yaml": "prompt: 5\nresponse: '{output}'\n",
        "copa.jsonl": json.dumps(
            {"premise": "p.", "choice1": "A", "choice2": "B", "question": "cause", "label": "x"}
        )
        + "\n",
        "notes.txt": "remember the milk\n",
    }
    for name, text in files.items():
        (tmp / name).write_text(text)
    (tmp / "garbage.json").write_bytes(b"\x00\x01 not json {{{")
    (tmp / "garbage.bin").write_bytes(b"ok\n\xff\xfe\x00")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_train_input_leaves_the_run_alone(tmp_path, src, capsys, case):
    write_inputs(tmp_path)
    run = tmp_path / "run"
    run.mkdir()  # empty, so a new run may go there (a non-empty one is refused first)
    extra, message = CASES[case]
    tok = str(data_path("llama2c", "tok512.model")) if "tokenizer" in case else ""
    extra = [e.format(tmp=tmp_path, tok=tok) for e in extra]
    message = message.replace("{tmp}", str(tmp_path))
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
    if rc is None:  # argparse rejects an unknown choice itself
        rc = main(["train", "--model", str(src), "--out", str(run), *extra])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and message in err, err
    assert err.startswith("lomo-jax: error: ")
    assert list(run.iterdir()) == []  # nothing written
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["hf", "run"]


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


def test_bad_values_in_a_resume_leave_the_run_alone(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    config = {"model": "m", "data": "d", "out": str(run), "steps": 10}
    (run / "train_config.yaml").write_text(yaml.safe_dump(config))
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--batch-size", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "lomo-jax: error: --batch-size: must be at least 1, got 0"
    assert snapshot(run) == before


def test_yaml_values_are_read_as_the_options_types(tmp_path, capsys):
    # PyYAML reads 1e-3 (no dot) and 1e3 as strings; an option's type decides.
    (tmp_path / "run.yaml").write_text("lr: 1e-3\nsteps: 1e3\nclip_grad_norm: 0\n")
    c = TrainConfig.from_sources(tmp_path / "run.yaml", {"model": "m", "data": "d", "out": "o"})
    assert (c.lr, c.steps, c.clip_grad_norm) == (0.001, 1000, None)  # 0: no clipping, as in HF
    assert type(c.lr) is float and type(c.steps) is int

    (tmp_path / "bad.yaml").write_text("model: m\ndata: d\nout: o\nlr: fast\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"lomo-jax: error: {tmp_path / 'bad.yaml'}: lr: expected a number, got 'fast'"
    assert not (tmp_path / "o").exists()
