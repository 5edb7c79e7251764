"""Training rows: Alpaca prompts carry no loss, packed documents stay apart, training on real
Alpaca data lowers the validation loss."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lomo_jax
from lomo_jax.cli import main
from lomo_jax.data import ALPACA_NO_INPUT, build_rows
from lomo_jax.engine import init_train_state, make_fused_step
from lomo_jax.loss import IGNORE
from lomo_jax.model import forward
from lomo_jax.optim import AdaLomo
from lomo_jax.schedule import Schedule
from tests.conftest import data_path


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    out = tmp_path_factory.mktemp("stories") / "ckpt"
    assert (
        main(
            [
                "import",
                str(data_path("llama2c", "stories260K.bin")),
                str(out),
                "--tokenizer",
                str(data_path("llama2c", "tok512.model")),
            ]
        )
        == 0
    )
    return out


def test_alpaca_prompt_tokens_carry_no_loss(stories, tmp_path):
    tok = lomo_jax.from_pretrained(stories).tokenizer
    rec = {"instruction": "Name a color.", "input": "", "output": "Blue is a color."}
    (tmp_path / "a.json").write_text(json.dumps([rec]))
    rows = build_rows("alpaca", tmp_path / "a.json", tok, 128)
    prompt = tok.encode(ALPACA_NO_INPUT.format(instruction=rec["instruction"]), bos=True)
    response = tok.encode(rec["output"], bos=False, eos=True)
    n = len(prompt) + len(response)
    assert rows.input_ids[0, :n].tolist() == prompt + response
    assert (rows.labels[0, : len(prompt)] == IGNORE).all()
    assert rows.labels[0, len(prompt) : n].tolist() == response
    assert (rows.labels[0, n:] == IGNORE).all() and (rows.segment_ids[0, n:] == 0).all()


def test_packed_documents_do_not_see_each_other(stories, tmp_path):
    model = lomo_jax.from_pretrained(stories)
    docs = ["Tom had a red ball.", "The cat sat on the mat and looked at the sun."]
    (tmp_path / "t.txt").write_text("\n".join(docs) + "\n")
    ids_a = model.tokenizer.encode(docs[0], bos=True, eos=True)
    ids_b = model.tokenizer.encode(docs[1], bos=True, eos=True)
    rows = build_rows("text", tmp_path / "t.txt", model.tokenizer, len(ids_a) + len(ids_b))
    assert rows.segment_ids[0].tolist() == [1] * len(ids_a) + [2] * len(ids_b)
    assert rows.positions[0, len(ids_a)] == 0 and rows.labels[0, len(ids_a)] == IGNORE
    packed = np.asarray(
        forward(model.config, model.params, rows.input_ids, rows.positions, rows.segment_ids)
    )
    alone = np.asarray(model(np.asarray([ids_b], np.int32)))
    np.testing.assert_allclose(packed[0, len(ids_a) :], alone[0], atol=1e-4)


@pytest.mark.slow
def test_alpaca_training_lowers_validation_loss(stories, tmp_path, capsys):
    records = json.loads(data_path("alpaca", "alpaca_data_1k.json").read_text())
    (tmp_path / "train.json").write_text(json.dumps(records[:900]))
    (tmp_path / "val.json").write_text(json.dumps(records[900:]))

    def val_loss(ckpt):
        assert (
            main(
                [
                    "eval",
                    str(ckpt),
                    "--data",
                    str(tmp_path / "val.json"),
                    "--format",
                    "alpaca",
                    "--seq-len",
                    "256",
                    "--json",
                ]
            )
            == 0
        )
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    before = val_loss(stories)
    assert (
        main(
            [
                "train",
                "--model",
                str(stories),
                "--data",
                str(tmp_path / "train.json"),
                "--format",
                "alpaca",
                "--optimizer",
                "adalomo",
                "--lr",
                "5e-3",
                "--steps",
                "40",
                "--batch-size",
                "8",
                "--seq-len",
                "256",
                "--out",
                str(tmp_path / "ft"),
            ]
        )
        == 0
    )
    after = val_loss(tmp_path / "ft")
    assert after["tokens"] == before["tokens"] > 0
    assert after["loss"] < before["loss"] - 0.2, (before, after)


@pytest.mark.slow
def test_stochastic_rounding_lets_bfloat16_adalomo_learn(stories):
    """benchmarks/bf16_quality.py in small: bfloat16 AdaLomo at lr 5e-4 rounded to nearest drops
    most updates (each is below half an ulp); rounded stochastically it learns. After 8 steps of
    8 x 128 the loss on 8 held-out rows is scored by a 9th step (its loss is taken before its
    update): 4.2 stochastic, 4.9 to nearest (float32: 4.2)."""
    model = lomo_jax.from_pretrained(stories)
    rows = build_rows("alpaca", data_path("alpaca", "alpaca_data_1k.json"), model.tokenizer, 128)
    rule = AdaLomo()

    def held_out_loss(rounding: str) -> float:
        step = make_fused_step(model.config, rule, Schedule(5e-4), rounding=rounding)
        bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), model.params)
        state = init_train_state(rule, bf16)
        for k in range(9):  # rows 64..71 are held out
            state, m = step(state, rows.take(np.arange(8 * k, 8 * k + 8)).batch())
        return float(m["loss"])

    nearest, stochastic = held_out_loss("nearest"), held_out_loss("stochastic")
    assert stochastic < nearest - 0.3, (stochastic, nearest)


def test_tokenized_rows_are_cached_and_invalidated(stories, tmp_path, monkeypatch):
    monkeypatch.setenv("LOMO_JAX_CACHE", str(tmp_path / "cache"))
    tok = lomo_jax.from_pretrained(stories).tokenizer
    data = tmp_path / "t.txt"
    data.write_text("Tom had a red ball.\n" * 40)
    first = build_rows("text", data, tok, 32)
    assert len(list((tmp_path / "cache").glob("rows-*.npz"))) == 1
    again = build_rows("text", data, tok, 32)
    assert (again.input_ids == first.input_ids).all() and (again.labels == first.labels).all()
    data.write_text("The cat sat on the mat.\n" * 40)  # a changed file is tokenized anew
    changed = build_rows("text", data, tok, 32)
    assert len(list((tmp_path / "cache").glob("rows-*.npz"))) == 2
    assert not (changed.input_ids[0] == first.input_ids[0]).all()


def truncate_file(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def flip_byte(f):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate_file, flip_byte])
def test_a_damaged_cache_file_is_rebuilt(stories, tmp_path, monkeypatch, caplog, damage):
    monkeypatch.setenv("LOMO_JAX_CACHE", str(tmp_path / "cache"))
    tok = lomo_jax.from_pretrained(stories).tokenizer
    data = tmp_path / "t.txt"
    data.write_text("Tom had a red ball.\n" * 40)
    first = build_rows("text", data, tok, 32)
    [cached] = (tmp_path / "cache").glob("rows-*.npz")
    damage(cached)
    again = build_rows("text", data, tok, 32)
    assert (again.input_ids == first.input_ids).all() and (again.labels == first.labels).all()
    assert f"{cached}: damaged cache file" in caplog.text
    assert build_rows("text", data, tok, 32).input_ids.tolist() == first.input_ids.tolist()


def test_an_unwritable_cache_is_skipped(stories, tmp_path, monkeypatch, caplog):
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("LOMO_JAX_CACHE", str(tmp_path / "file" / "cache"))
    tok = lomo_jax.from_pretrained(stories).tokenizer
    data = tmp_path / "t.txt"
    data.write_text("Tom had a red ball.\n" * 40)
    assert len(build_rows("text", data, tok, 32)) > 0
    assert "cannot write the cache" in caplog.text


def test_template_format_puts_loss_on_the_response_only(stories, tmp_path, monkeypatch):
    monkeypatch.setenv("LOMO_JAX_CACHE", str(tmp_path / "cache"))
    tok = lomo_jax.from_pretrained(stories).tokenizer
    (tmp_path / "t.yaml").write_text('prompt: "Q: {question}\\nA:"\nresponse: "{answer}"\n')
    (tmp_path / "d.jsonl").write_text(json.dumps({"question": "Who?", "answer": "Tom."}) + "\n")
    rows = build_rows("template", tmp_path / "d.jsonl", tok, 64, template=tmp_path / "t.yaml")
    prompt = tok.encode("Q: Who?\nA:", bos=True)
    answer = tok.encode("Tom.", bos=False, eos=True)
    assert rows.input_ids[0, : len(prompt) + len(answer)].tolist() == prompt + answer
    assert (rows.labels[0, : len(prompt)] == IGNORE).all()
    assert rows.labels[0, len(prompt) : len(prompt) + len(answer)].tolist() == answer
