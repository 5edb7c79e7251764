"""Multiple-choice evaluation as in the LOMO paper (which follows MeZO): every candidate is put
into the task's prompt and scored by its average token log-likelihood; the best one wins.

Prompts are MeZO's for the SuperGLUE tasks; records use the official jsonl field names (and the
Hugging Face exports' integer labels).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lomo_jax.compiler import jit
from lomo_jax.config import LlamaConfig
from lomo_jax.errors import UserError
from lomo_jax.model import forward
from lomo_jax.records import load_records
from lomo_jax.tokenizer import Tokenizer


class TaskError(UserError, ValueError):
    """An unknown task, or a record that is not one of its examples."""


@dataclasses.dataclass(frozen=True)
class Example:
    context: str
    candidates: tuple[str, ...]
    label: int


def _yes_no(label, yes_values=(True, 1, "true", "True", "entailment")) -> int:
    """Index into ("Yes", "No"): 0 when the label means yes."""
    return 0 if label in yes_values else 1


def _copa(r: dict) -> Example:
    joiner = " because" if r["question"] == "cause" else " so"
    lower = lambda s: s[0].lower() + s[1:]  # noqa: E731
    return Example(
        r["premise"].rstrip(".") + joiner,
        (lower(r["choice1"]), lower(r["choice2"])),
        int(r["label"]),
    )


def _rte(r: dict) -> Example:
    return Example(
        f'{r["premise"]}\nDoes this mean that "{r["hypothesis"]}" is true? Yes or No?\n',
        ("Yes", "No"),
        _yes_no(r["label"], ("entailment", 0)),
    )


def _cb(r: dict) -> Example:
    label = {"entailment": 0, "contradiction": 1, "neutral": 2}.get(r["label"], r["label"])
    return Example(
        f'Suppose {r["premise"]} Can we infer that "{r["hypothesis"]}"? Yes, No, or Maybe?\n',
        ("Yes", "No", "Maybe"),
        int(label),
    )


def _boolq(r: dict) -> Example:
    label = r["label"] if "label" in r else r["answer"]
    return Example(f"{r['passage']} {r['question']}?", ("Yes", "No"), _yes_no(label))


def _wic(r: dict) -> Example:
    return Example(
        f'Does the word "{r["word"]}" have the same meaning in these two sentences? '
        f"Yes, No?\n{r['sentence1']}\n{r['sentence2']}\n",
        ("Yes", "No"),
        _yes_no(r["label"]),
    )


def _wsc(r: dict) -> Example:
    t = r["target"]
    return Example(
        f"{r['text']}\nIn the previous sentence, does the pronoun "
        f'"{t["span2_text"].lower()}" refer to {t["span1_text"]}? Yes or No?\n',
        ("Yes", "No"),
        _yes_no(r["label"]),
    )


def _multirc(r: dict) -> Example:
    return Example(
        f"{r['paragraph']}\nQuestion: {r['question']}\nI found this answer "
        f'"{r["answer"]}". Is that correct? Yes or No?\n',
        ("Yes", "No"),
        _yes_no(r["label"]),
    )


TASKS: dict[str, tuple[Callable[[dict], Example], tuple[str, ...]]] = {
    "copa": (_copa, ("premise", "choice1", "choice2", "question", "label")),
    "rte": (_rte, ("premise", "hypothesis", "label")),
    "cb": (_cb, ("premise", "hypothesis", "label")),
    "boolq": (_boolq, ("passage", "question")),
    "wic": (_wic, ("word", "sentence1", "sentence2", "label")),
    "wsc": (_wsc, ("text", "target", "label")),
    "multirc": (_multirc, ("paragraph", "question", "answer", "label")),
}


def _lookup(task: str) -> tuple[Callable[[dict], Example], tuple[str, ...]]:
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return TASKS[task]


def examples_from_records(
    task: str, records: Sequence[dict], path, places: Sequence[str] | None = None
) -> list[Example]:
    """`places[i]` says where record i is (file:line) in error messages."""
    make, fields = _lookup(task)
    places = places or [f"{path}:{n}" for n in range(1, len(records) + 1)]
    out = []
    for r, place in zip(records, places):
        missing = [f for f in fields if f not in r]
        if task == "boolq" and "label" not in r and "answer" not in r:
            missing.append("label")
        if missing:
            raise TaskError(f"{place}: missing field {missing[0]!r} for task {task}")
        try:
            ex = make(r)
            if not (isinstance(ex.context, str) and 0 <= ex.label < len(ex.candidates)):
                raise ValueError(f"label {r.get('label', r.get('answer'))!r} is not a choice")
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
            raise TaskError(f"{place}: not a {task} record ({e})") from None
        out.append(ex)
    if not out:
        raise TaskError(f"{path}: no examples")
    return out


def read_examples(task: str, path: str | Path) -> list[Example]:
    """Examples of a task's file (jsonl, or any format `records.load_records` reads)."""
    _lookup(task)  # an unknown task is reported before the file is read
    records, places = load_records(path)
    return examples_from_records(task, records, path, places)


@functools.partial(jit, static_argnums=0)
def _token_logprobs(cfg: LlamaConfig, params, ids_BT, segment_ids_BT):
    logits = forward(cfg, params, ids_BT, segment_ids_BT=segment_ids_BT)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return jnp.take_along_axis(logp, ids_BT[:, 1:, None], axis=-1)[..., 0]


def candidate_scores(
    cfg: LlamaConfig, params, tok: Tokenizer, examples: Sequence[Example], batch_size: int = 16
) -> list[list[float]]:
    """Average log-likelihood of each candidate's tokens after BOS + the prompt."""
    seqs, spans = [], []
    for ex in examples:
        ctx = tok.encode(ex.context, bos=True)
        for cand in ex.candidates:
            c = tok.encode(cand, bos=False)
            seqs.append(ctx + c)
            spans.append((len(ctx), len(ctx) + len(c)))
    scores = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        width = max(len(s) for s in chunk)
        width = 1 << (width - 1).bit_length()  # few distinct shapes, few compilations
        ids = np.zeros((len(chunk), width), np.int32)
        seg = np.zeros((len(chunk), width), np.int32)
        for k, s in enumerate(chunk):
            ids[k, : len(s)], seg[k, : len(s)] = s, 1
        lp = np.asarray(_token_logprobs(cfg, params, jnp.asarray(ids), jnp.asarray(seg)))
        for k, (a, b) in enumerate(spans[start : start + batch_size]):
            scores.append(float(lp[k, a - 1 : b - 1].mean()))  # logits at t-1 score token t
    out, i = [], 0
    for ex in examples:
        out.append(scores[i : i + len(ex.candidates)])
        i += len(ex.candidates)
    return out


def accuracy(examples: Sequence[Example], scores: Sequence[Sequence[float]]) -> float:
    return float(np.mean([int(np.argmax(s)) == ex.label for ex, s in zip(examples, scores)]))
