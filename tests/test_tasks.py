"""Multiple-choice scoring (SuperGLUE prompts) agrees with transformers' PyTorch model."""

import json

import numpy as np
import pytest
import transformers

import lomo_jax
from lomo_jax.cli import main
from lomo_jax.tasks import TASKS, candidate_scores, read_examples
from tests.conftest import data_path, needs_torch

FILES = {
    "copa": ("COPA", "copa_validation.jsonl"),
    "rte": ("RTE", "val.jsonl"),
    "cb": ("CB_hf", "cb_validation.jsonl"),
    "boolq": ("BoolQ_hf", "boolq_validation.jsonl"),
    "wic": ("WiC", "val.jsonl"),
    "wsc": ("WSC", "val.jsonl"),
}


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    out = tmp_path_factory.mktemp("stories")
    assert (
        main(
            [
                "import",
                str(data_path("llama2c", "stories260K.bin")),
                str(out / "ckpt"),
                "--tokenizer",
                str(data_path("llama2c", "tok512.model")),
            ]
        )
        == 0
    )
    assert main(["export", str(out / "ckpt"), str(out / "hf")]) == 0
    return out


def hf_scores(hf_dir, tok, examples):
    torch = needs_torch()
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    out = []
    for ex in examples:
        ctx = tok.encode(ex.context, bos=True)
        row = []
        for cand in ex.candidates:
            c = tok.encode(cand, bos=False)
            ids = torch.tensor([ctx + c])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0], -1)
            row.append(float(np.mean([logp[len(ctx) + j - 1, t] for j, t in enumerate(c)])))
        out.append(row)
    return out


def test_copa_accuracy_and_scores_match_transformers(stories, capsys):
    path = data_path("superglue", "COPA", "copa_validation.jsonl")
    assert (
        main(["eval", str(stories / "ckpt"), "--task", "copa", "--data", str(path), "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["task"] == "copa" and result["n"] == 100 and 0.0 <= result["accuracy"] <= 1.0

    examples = read_examples("copa", path)
    model = lomo_jax.from_pretrained(stories / "ckpt")
    ours = candidate_scores(model.config, model.params, model.tokenizer, examples)
    theirs = hf_scores(stories / "hf", model.tokenizer, examples)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    acc = np.mean([int(np.argmax(s)) == ex.label for ex, s in zip(examples, ours)])
    assert acc == result["accuracy"]


@pytest.mark.parametrize("task", list(FILES))
def test_prompts_read_the_official_files(task):
    examples = read_examples(task, data_path("superglue", *FILES[task]))
    assert examples and all(0 <= ex.label < len(ex.candidates) for ex in examples)
    assert len({ex.label for ex in examples}) > 1  # labels are really mapped, not constant


def test_every_task_has_a_prompt():
    assert set(TASKS) == {"copa", "rte", "cb", "boolq", "wic", "wsc", "multirc"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "nope"], "unknown task 'nope'"),
        (["--task", "rte"], "missing field 'hypothesis' for task rte"),
    ],
)
def test_eval_bad_input(tmp_path, capsys, args, message):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"premise": "p", "label": 0}) + "\n")
    assert main(["eval", str(tmp_path / "unused"), "--data", str(data), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err
