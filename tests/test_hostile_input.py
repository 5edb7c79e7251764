"""Inputs of any size or shape: JSON and YAML nested past what a parser recurses, text that is
not UTF-8, numbers beyond what their consumer takes, files that are not regular files, command
lines argparse refuses. Each is one line `lomo-jax: error: ...`, exit status 1, nothing written,
in bounded time and memory."""

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from lomo_jax.cli import main
from lomo_jax.data import build_rows, cache_dir
from lomo_jax.tokenizer import load_tokenizer
from tests.conftest import CONFIGS, data_path, make_hf_dir, random_ids
from tests.test_train_cli import write_rows

CFG = CONFIGS["gqa"]  # vocab 96, context 128
DEEP = "[" * 100_000
BAD_UTF8 = b"prompt: \xff\xfe\n"


def nonutf8(text: str) -> str:
    """TEXT with a byte that is not UTF-8, as Python receives it in argv or a directory listing."""
    return os.fsdecode(text.encode() + b"\xff")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    hf = make_hf_dir(d / "hf", CFG)
    assert main(["import", str(hf), str(d / "ckpt")]) == 0  # no tokenizer
    write_rows(d / "rows.jsonl", random_ids(CFG, 4, 16))
    (d / "alpaca.json").write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi."}] * 8))
    return d


def stories(d) -> str:
    """stories260K with its tokenizer (context 512), imported once."""
    if not (d / "stories").exists():
        bin_, tok = data_path("llama2c", "stories260K.bin"), data_path("llama2c", "tok512.model")
        assert main(["import", str(bin_), str(d / "stories"), "--tokenizer", str(tok)]) == 0
    return str(d / "stories")


def train(d, *flags: str) -> list[str]:
    return ["train", "--model", str(d / "ckpt"), "--out", str(d / "run"), "--seq-len=16", *flags]


def alpaca(d, data: str, *flags: str) -> list[str]:
    """A train command on DATA in Alpaca format (read before the missing tokenizer matters)."""
    return [*train(d, "--data", data, "--format", "alpaca"), "--seq-len", "64", *flags]


def fifo(tmp) -> str:
    os.mkfifo(tmp / "rows.jsonl")
    return str(tmp / "rows.jsonl")


def nonutf8_file(tmp) -> str:
    """An Alpaca file whose name is not UTF-8."""
    name = os.fsdecode(b"data\xff.json")
    (tmp / name).write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi."}]))
    return str(tmp / name)


def damaged_copy(d, tmp, relative: str, content: bytes | str):
    """A copy of the checkpoint with RELATIVE (a path inside it) replaced by CONTENT."""
    ckpt = tmp / "damaged"
    shutil.copytree(d / "ckpt", ckpt)
    f = ckpt / relative
    f.write_bytes(content.encode() if isinstance(content, str) else content)
    return ckpt


def write(tmp, name: str, content: bytes | str) -> str:
    f = tmp / name
    f.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(f)


CASES = {
    # JSON and YAML nested past what Python's parsers recurse
    "deep json data": lambda d, t: (
        alpaca(d, write(t, "deep.json", DEEP)),
        "deep.json: nested deeper than",
    ),
    "deep json line": lambda d, t: (
        train(d, "--data", write(t, "deep.jsonl", '{"input_ids": ' + DEEP + "\n")),
        "deep.jsonl:1: nested deeper than",
    ),
    "deep checkpoint config": lambda d, t: (
        ["generate", str(damaged_copy(d, t, "config.json", DEEP))],
        "damaged/config.json: nested deeper than",
    ),
    "deep checksums": lambda d, t: (
        ["export", str(damaged_copy(d, t, "params/checksums.json", DEEP)), str(t / "out")],
        "checksums.json: nested deeper than",
    ),
    "deep yaml config": lambda d, t: (
        ["train", "--config", write(t, "deep.yaml", "lr: " + DEEP)],
        "deep.yaml:1: nested deeper than",
    ),
    "deep yaml template": lambda d, t: (
        [
            *alpaca(d, str(d / "alpaca.json")),
            "--format",
            "template",
            "--template",
            write(t, "deep.yaml", "prompt: " + DEEP),
        ],
        "deep.yaml:1: nested deeper than",
    ),
    "yaml aliases": lambda d, t: (
        ["train", "--config", write(t, "laughs.yaml", "a: &a [1, 1]\nb: &b [*a, *a]\nlr: *b\n")],
        "laughs.yaml:1: anchors and aliases are not supported",
    ),
    # text that is not UTF-8: names, paths, prompts, file contents
    "data file name": lambda d, t: (alpaca(d, nonutf8_file(t)), "is not UTF-8"),
    "out path": lambda d, t: (
        [*alpaca(d, str(d / "alpaca.json")), "--out", nonutf8(str(t / "run"))],
        "is not UTF-8",
    ),
    "import out": lambda d, t: (
        ["import", str(d / "hf"), nonutf8(str(t / "ckpt"))],
        "is not UTF-8",
    ),
    "prompt": lambda d, t: (
        ["generate", stories(d), "--prompt", nonutf8("Once"), "--max-new-tokens", "2"],
        "is not UTF-8",
    ),
    "yaml config bytes": lambda d, t: (
        ["train", "--config", write(t, "bad.yaml", b"lr: 0.1\n" + BAD_UTF8)],
        "bad.yaml:2: not UTF-8 text",
    ),
    "template bytes": lambda d, t: (
        [
            *alpaca(d, str(d / "alpaca.json")),
            "--format",
            "template",
            "--template",
            write(t, "bad.yaml", BAD_UTF8),
        ],
        "bad.yaml:1: not UTF-8 text",
    ),
    "lone surrogate in a record": lambda d, t: (
        alpaca(d, write(t, "s.json", '[{"instruction": "a\\udcff", "output": "b"}]')),
        "s.json: record 1: field 'instruction' is not valid Unicode",
    ),
    "nul in a yaml path": lambda d, t: (
        [
            "train",
            "--config",
            write(t, "nul.yaml", 'model: "a\\0b"\ndata: d\nout: o\n'),
        ],
        "nul.yaml: model: holds a NUL character",
    ),
    # numbers beyond what their consumer takes
    "max new tokens": lambda d, t: (
        ["generate", stories(d), "--max-new-tokens", "1000000000"],
        "max_new_tokens 1000000000: with the prompt's 1 token(s) that is beyond the model's "
        "context (max_position_embeddings 512); at most 511",
    ),
    "generate seed": lambda d, t: (
        ["generate", stories(d), "--seed", str(10**23), "--max-new-tokens", "2"],
        "seed must be an integer in [0, 4294967295], got 100000000000000000000000",
    ),
    "train seed": lambda d, t: (
        train(d, "--data", str(d / "rows.jsonl"), "--seed", str(10**23)),
        "--seed: must be at most 4294967295, got 100000000000000000000000",
    ),
    "train steps": lambda d, t: (
        train(d, "--data", str(d / "rows.jsonl"), "--steps", "3000000000"),
        "--steps: must be at most 2147483647, got 3000000000",
    ),
    "yaml steps": lambda d, t: (
        ["train", "--config", write(t, "big.yaml", f"model: m\ndata: d\nout: o\nsteps: {10**400}")],
        "big.yaml: steps: must be at most 2147483647, got an integer of 401 digits",
    ),
    "yaml int past str's limit": lambda d, t: (
        ["train", "--config", write(t, "huge.yaml", "steps: 1" + "0" * 5000)],
        "huge.yaml:1: an integer too long to read (over 4300 digits)",
    ),
    "json id past str's limit": lambda d, t: (
        train(d, "--data", write(t, "huge.jsonl", '{"input_ids": [1' + "0" * 5000 + "]}\n")),
        "huge.jsonl:1: an integer too long to read (over 4300 digits)",
    ),
    "json field past str's limit": lambda d, t: (
        alpaca(d, write(t, "huge.json", '[{"instruction": 1' + "0" * 5000 + ', "output": "b"}]')),
        "huge.json: an integer too long to read (over 4300 digits)",
    ),
    "shard size": lambda d, t: (
        ["export", str(d / "ckpt"), str(t / "out"), "--max-shard-size", "1e308"],
        "--max-shard-size: must be",
    ),
    # files that parse but are not what they should be
    "tokenizer.json not a tokenizer": lambda d, t: (
        [
            "generate",
            str(d / "ckpt"),
            "--tokenizer",
            os.path.dirname(write(t, "tokenizer.json", '{"version": "1.0", "model": 5}')),
        ],
        "cannot load tokenizer",
    ),
    "fifo as data": lambda d, t: (
        train(d, "--data", fifo(t)),
        "rows.jsonl: not a regular file (a named pipe)",
    ),
    "device as data": lambda d, t: (
        alpaca(d, "/dev/zero"),
        "/dev/zero: not a regular file (a character device)",
    ),
    "device as config": lambda d, t: (
        ["train", "--config", "/dev/zero"],
        "/dev/zero: not a regular file (a character device)",
    ),
    "duplicate yaml keys": lambda d, t: (
        ["train", "--config", write(t, "dup.yaml", "model: a\nlr: 0.1\nmodel: b\n")],
        "dup.yaml:3: duplicate key 'model' (first on line 1)",
    ),
}


def snapshot(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_one_line(inputs, tmp_path, capsys, case):
    argv, problem = CASES[case](inputs, tmp_path)
    before, mine = snapshot(inputs), snapshot(tmp_path)
    done = []
    worker = threading.Thread(target=lambda: done.append(main(argv)), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert done == [1], "still running" if not done else done
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err), "\n".join(err[-30:])
    assert err and err[-1].startswith("lomo-jax: error: ") and problem in err[-1], err[-5:]
    assert [line for line in err if line.startswith("lomo-jax")] == [err[-1]]
    assert snapshot(inputs) == before and snapshot(tmp_path) == mine  # nothing written


ARGPARSE = {
    "no command": ([], "the following arguments are required: command"),
    "unknown command": (["trian"], "argument command: invalid choice: 'trian'"),
    "unknown flag": (["train", "--bogus"], "unrecognized arguments: --bogus"),
    "not an int": (["train", "--steps", "x"], "train: argument --steps: invalid int value: 'x'"),
    "unknown choice": (
        ["train", "--optimizer", "sgdd"],
        "train: argument --optimizer: invalid choice: 'sgdd'",
    ),
    "missing value": (["generate", "m", "--prompt"], "generate: argument --prompt: expected one"),
    "missing positional": (["export", "m"], "export: the following arguments are required: out"),
    "missing option": (["eval", "m"], "eval: the following arguments are required: --data"),
    "parser's own range": (
        ["eval", "m", "--data", "d", "--batch-size", "0"],
        "eval: argument --batch-size: must be at least 1, got 0",
    ),
    "a plan on more devices than XLA builds at once": (  # 100000 took 19 GB and minutes
        ["plan", "--model", "llama-7b", "--devices", "100000"],
        "plan: argument --devices: must be at most 1024, got 100000",
    ),
}


@pytest.mark.parametrize("case", list(ARGPARSE))
def test_argparse_errors_are_one_line_and_exit_1(capsys, case):
    argv, problem = ARGPARSE[case]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lomo-jax: error: ") and problem in err[0], err


def test_help_still_prints_the_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0 and "--resume" in capsys.readouterr().out


def test_an_error_line_stays_one_line_whatever_the_path(tmp_path, capsys):
    missing = tmp_path / "two\nlines\x1b[31m"
    assert main(["export", str(missing), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "two\\nlines\\x1b[31m" in err, err


def test_generation_past_the_context_is_refused(inputs, capsys):
    model = stories(inputs)
    prompt = len(load_tokenizer(data_path("llama2c", "tok512.model")).encode("Once"))  # with BOS
    too_many = str(512 - prompt + 1)
    assert main(["generate", model, "--prompt", "Once", "--max-new-tokens", too_many]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"lomo-jax: error: max_new_tokens {too_many}: with the prompt's {prompt} token(s) that is "
        f"beyond the model's context (max_position_embeddings 512); at most {512 - prompt}"
    )
    assert main(["generate", model, "--prompt", "Once", "--max-new-tokens", "3"]) == 0


def test_the_cache_never_goes_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("LOMO_JAX_CACHE", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert cache_dir() == tmp_path / "home" / ".cache" / "lomo_jax"


def test_cached_rows_with_negative_ids_are_tokenized_anew(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LOMO_JAX_CACHE", str(tmp_path / "cache"))
    tok = load_tokenizer(data_path("llama2c", "tok512.model"))
    data = tmp_path / "a.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi there."}] * 4))
    rows = build_rows("alpaca", data, tok, 256, vocab_size=512)
    (cached,) = (tmp_path / "cache").iterdir()
    with np.load(cached) as z:
        arrays = dict(z)
    arrays["input_ids"][0, 0] = -7
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    cached.write_bytes(buffer.getvalue())
    with caplog.at_level(logging.WARNING, logger="lomo_jax"):
        again = build_rows("alpaca", data, tok, 256, vocab_size=512)
    assert np.array_equal(again.input_ids, rows.input_ids)
    assert "damaged cache file" in caplog.text


def test_a_broken_parquet_file_is_one_line(inputs, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"instruction": ["Say hi."] * 8, "output": ["Hi."] * 8})
    pq.write_table(table, tmp_path / "whole.parquet")
    (tmp_path / "broken.parquet").write_bytes((tmp_path / "whole.parquet").read_bytes()[:300])
    argv = alpaca(inputs, str(tmp_path / "broken.parquet"))
    argv[argv.index("--out") + 1] = str(tmp_path / "run")
    proc = subprocess.run(
        [sys.executable, "-m", "lomo_jax.cli", *argv],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=300,
    )
    errors = [
        line
        for line in proc.stderr.splitlines()
        if not line[:8].replace(":", "").isdigit()  # the log's own "HH:MM:SS message" lines
    ]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"lomo-jax: error: {tmp_path / 'broken.parquet'}: cannot read")
