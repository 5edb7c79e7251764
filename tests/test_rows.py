"""What training sees: truncation that keeps the answer, packing (best-fit decreasing; a fused
step on packed rows equals the same examples unpacked), `lomo-jax data`, and data by Hugging Face
dataset id from the datasets cache."""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lomo_jax
from lomo_jax import packing
from lomo_jax.cli import main
from lomo_jax.data import ALPACA_NO_INPUT, DataError, DataOptions, build_rows
from lomo_jax.engine import init_train_state, make_fused_step
from lomo_jax.loss import IGNORE
from lomo_jax.optim import Lomo
from lomo_jax.schedule import Schedule
from tests.conftest import data_path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "examples" / "chat_template.jinja"


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    out = tmp_path_factory.mktemp("stories") / "ckpt"
    model = data_path("llama2c", "stories260K.bin")
    tok = data_path("llama2c", "tok512.model")
    assert main(["import", str(model), str(out), "--tokenizer", str(tok)]) == 0
    return out


@pytest.fixture(scope="module")
def tok(stories):
    return lomo_jax.from_pretrained(stories).tokenizer


@pytest.fixture
def sharegpt(tmp_path):
    f = tmp_path / "sharegpt.json"
    f.write_text(
        json.dumps(json.loads(data_path("chat", "alpaca_sharegpt_multiturn.json").read_text())[:12])
    )
    return f


def test_left_truncation_keeps_the_answer(tok, tmp_path):
    rec = {"instruction": "Tell me a story about a cat. " * 30, "output": "The cat slept."}
    (tmp_path / "a.json").write_text(json.dumps([rec]))
    prompt = tok.encode(ALPACA_NO_INPUT.format(instruction=rec["instruction"]), bos=True)
    answer = tok.encode(rec["output"], bos=False, eos=True)
    seq_len = 64
    assert len(prompt) > seq_len
    with pytest.raises(DataError, match="raise --seq-len or pass --truncation-side left"):
        build_rows("alpaca", tmp_path / "a.json", tok, seq_len)
    rows = build_rows("alpaca", tmp_path / "a.json", tok, seq_len, options=DataOptions("left"))
    kept = prompt[len(prompt) + len(answer) - seq_len + 1 :]
    assert rows.input_ids[0].tolist() == [tok.bos_id, *kept, *answer]  # BOS stays
    assert rows.labels[0].tolist() == [IGNORE] * (1 + len(kept)) + answer
    assert "1 truncated (0 of them lost loss tokens, 0 kept none" in rows.summary


def test_train_on_all_puts_the_prompt_in_the_loss(tok, tmp_path):
    rec = {"instruction": "Name a color.", "output": "Blue."}
    (tmp_path / "a.json").write_text(json.dumps([rec]))
    rows = build_rows("alpaca", tmp_path / "a.json", tok, 64, options=DataOptions(train_on="all"))
    n = int(rows.segment_ids[0].sum())
    assert rows.labels[0, 1:n].tolist() == rows.input_ids[0, 1:n].tolist()


def test_packed_text_keeps_documents_whole(tok, tmp_path):
    docs = ["Tom had a red ball.", "The cat sat on the mat. " * 6, "Sun."]
    (tmp_path / "t.txt").write_text("\n".join(docs) + "\n")
    ids = [tok.encode(d, bos=True, eos=True) for d in docs]
    seq_len = 40
    assert len(ids[1]) > seq_len > len(ids[0]) + len(ids[2])
    rows = build_rows("text", tmp_path / "t.txt", tok, seq_len, options=DataOptions(pack=True))
    pieces = [ids[1][:seq_len], ids[1][seq_len:], ids[0], ids[2]]
    assert [ex for ex, _ in segments(rows)] == sorted(pieces)
    assert len(rows) == 2  # the long document's tail shares a row with the two short ones


def test_the_superglue_example_keeps_its_data(tok, tmp_path):
    """examples/superglue_finetune_eval.sh's settings turn every training record into a row."""
    script = (ROOT / "examples" / "superglue_finetune_eval.sh").read_text()
    seq_len = int(re.search(r"--seq-len (\d+)", script)[1])
    side = re.search(r"--truncation-side (\w+)", script)[1]
    records = data_path("superglue", "RTE", "train.jsonl").read_text().splitlines()[:1000]
    (tmp_path / "rte.jsonl").write_text("\n".join(records) + "\n")
    rows = build_rows(
        "superglue", tmp_path / "rte.jsonl", tok, seq_len, "rte", options=DataOptions(side)
    )
    assert len(rows) == 1000 and "0 kept none and are skipped" in rows.summary


def reference_best_fit_decreasing(lengths, capacity):
    """The rule written out: longest first, into the bin with the least room that still fits
    it (the first such bin on a tie), else a new bin."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (room[b], b))
            bins[b].append(i)
            room[b] -= lengths[i]
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def test_best_fit_decreasing_equals_the_rule():
    rng = np.random.default_rng(0)
    for capacity in (16, 100, 1024):
        lengths = rng.integers(1, capacity + 1, 300).tolist()
        bins = packing.best_fit_decreasing(lengths, capacity)
        assert bins == reference_best_fit_decreasing(lengths, capacity)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= capacity for b in bins)


def segments(rows):
    """Each example of the rows: (ids, labels after its first token), in a canonical order."""
    out = []
    for r in range(len(rows)):
        for s in range(1, rows.segment_ids[r].max() + 1):
            at = rows.segment_ids[r] == s
            assert rows.positions[r, at].tolist() == list(range(at.sum()))
            assert rows.labels[r, at][0] == IGNORE
            out.append((rows.input_ids[r, at].tolist(), rows.labels[r, at][1:].tolist()))
    return sorted(out)


def test_packed_rows_hold_the_same_examples(tok, sharegpt):
    options = DataOptions("left", chat_template=str(TEMPLATE))
    unpacked = build_rows("chat", sharegpt, tok, 256, options=options)
    packed = build_rows("chat", sharegpt, tok, 256, options=dataclasses.replace(options, pack=True))
    assert len(packed) < len(unpacked)
    assert segments(packed) == segments(unpacked)
    pad = (unpacked.segment_ids == 0).mean(), (packed.segment_ids == 0).mean()
    assert (
        f"padding {pad[1]:.1%} (unpacked: {pad[0]:.1%} in {len(unpacked)} rows)" in packed.summary
    )
    assert f"padding {pad[0]:.1%} (packed: {pad[1]:.1%} in {len(packed)} rows)" in unpacked.summary


@pytest.mark.slow
def test_a_fused_step_on_packed_rows_equals_the_unpacked_one(stories, tok, sharegpt):
    """LOMO (its update is the gradient times lr, so a wrong loss normalization would show)."""
    model = lomo_jax.from_pretrained(stories)
    options = DataOptions("left", chat_template=str(TEMPLATE))
    rows = {
        pack: build_rows(
            "chat", sharegpt, tok, 256, options=dataclasses.replace(options, pack=pack)
        )
        for pack in (False, True)
    }
    rule = Lomo()
    step = make_fused_step(model.config, rule, Schedule(1.0))
    out = {}
    for pack, r in rows.items():
        params = jax.tree.map(jnp.array, model.params)  # a copy: the step donates its state
        state, metrics = step(init_train_state(rule, params), r.batch())
        out[pack] = float(metrics["loss"]), jax.tree.map(np.asarray, state.params)
    assert abs(out[True][0] - out[False][0]) <= 1e-5
    before = jax.tree.map(np.asarray, model.params)
    for p, u, b in zip(*(jax.tree.leaves(t) for t in (out[True][1], out[False][1], before))):
        update = np.abs(u - b).max()
        assert update > 0 and np.abs(p - u).max() <= 1e-5 * max(1.0, update)


def test_data_command_shows_what_training_sees(stories, tok, sharegpt, capsys):
    args = ["data", "--model", str(stories), "--data", str(sharegpt), "--format", "chat"]
    args += ["--chat-template", str(TEMPLATE), "--seq-len", "256", "--truncation-side", "left"]
    for pack in (False, True):
        flags = ["--pack"] if pack else []
        assert main([*args, *flags, "--json"]) == 0
        objects = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        rows = build_rows(
            "chat",
            sharegpt,
            tok,
            256,
            options=DataOptions("left", pack, chat_template=str(TEMPLATE)),
        )
        assert len(objects) == len(rows)
        for r, o in enumerate(objects):
            real = rows.segment_ids[r] != 0
            assert o["input_ids"] == rows.input_ids[r, real].tolist()
            assert o["labels"] == rows.labels[r, real].tolist()
            assert ("position_ids" in o) == pack
    rows = build_rows(
        "chat", sharegpt, tok, 256, options=DataOptions("left", chat_template=str(TEMPLATE))
    )
    assert main(args) == 0
    shown = capsys.readouterr()
    assert "of them lost loss tokens" in rows.summary and rows.summary in shown.err
    first = json.loads(sharegpt.read_text())[0]["conversations"]
    assert f"Assistant:« {first[-1]['value']}</s>»" in shown.out


def write_dataset_cache(cache: Path, repo_id: str, splits: dict[str, Path]) -> None:
    """`repo_id` in a Hugging Face datasets cache as `load_dataset` leaves it after a download:
    <org>___<name>/default/<version>/<hash>/ with its arrow files and dataset_info.json."""
    from datasets.packaged_modules.json.json import Json

    name = repo_id.split("/")[1]
    work = cache.parent / "build"
    builder = Json(
        cache_dir=str(work),
        dataset_name=name,
        config_name="default",
        hash="0123abcd",
        data_files={k: str(v) for k, v in splits.items()},
    )
    builder.download_and_prepare()
    [built] = [p.parent for p in work.glob(f"{name}/*/*/*/dataset_info.json")]
    shutil.copytree(
        built, cache / repo_id.replace("/", "___") / "default" / built.parts[-2] / built.parts[-1]
    )


def test_a_dataset_id_reads_the_datasets_cache(tok, tmp_path, monkeypatch, capsys):
    import datasets

    assert datasets.config.HF_HUB_OFFLINE  # nothing is downloaded
    lines = data_path("chat", "alpaca_messages_1k.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:20]) + "\n")
    (tmp_path / "val.jsonl").write_text("\n".join(lines[20:25]) + "\n")
    cache = tmp_path / "datasets"
    write_dataset_cache(
        cache,
        "someone/chat-demo",
        {"train": tmp_path / "train.jsonl", "validation": tmp_path / "val.jsonl"},
    )
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    options = DataOptions(chat_template=str(TEMPLATE))
    for ref, f in [("someone/chat-demo", "train"), ("someone/chat-demo:validation", "val")]:
        by_id = build_rows("chat", ref, tok, 256, options=options)
        from_file = build_rows("chat", tmp_path / f"{f}.jsonl", tok, 256, options=options)
        assert by_id.input_ids.tolist() == from_file.input_ids.tolist()
        assert by_id.labels.tolist() == from_file.labels.tolist()
    with_config = DataOptions(chat_template=str(TEMPLATE), data_config="default")
    assert len(build_rows("chat", "someone/chat-demo", tok, 256, options=with_config)) == 20
    with pytest.raises(DataError, match="someone/chat-demo:test: Unknown split"):
        build_rows("chat", "someone/chat-demo:test", tok, 256, options=options)
    args = ["data", "--model", str(tok.files[0].parent), "--format", "chat", "--json"]
    assert main([*args, "--data", "someone/missing", "--chat-template", str(TEMPLATE)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(
        "lomo-jax: error: someone/missing: no such file, and not a dataset in the Hugging Face "
        f"datasets cache ({cache})"
    )
