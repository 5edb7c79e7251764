"""Conversations: token ids equal transformers' `apply_chat_template` with the real Llama 3, Qwen2.5
and Qwen3 templates, the loss mask equals `return_assistant_tokens_mask` of their `{% generation
%}` variants, one BOS, turns dropped whole by left truncation, bad conversations refused."""

import json
import re

import pytest
import transformers
import yaml

from lomo_jax import chat
from lomo_jax.cli import main
from lomo_jax.config import LlamaConfig
from lomo_jax.data import DataOptions, build_rows
from lomo_jax.errors import UserError
from lomo_jax.loss import IGNORE
from lomo_jax.tokenizer import TokenizerError, chat_template_of, load_tokenizer
from tests import chat_tokenizers
from tests.conftest import TINY, data_path, make_hf_dir, train_args


def templates(name: str) -> tuple[str, str]:
    """(the template the model ships, its `{% generation %}` variant)."""
    d = data_path("chat_templates")
    return (d / f"{name}.jinja").read_text(), (d / f"{name}_training.jinja").read_text()


@pytest.fixture(scope="module")
def conversations():
    """Real ones (multi-turn ShareGPT with and without a system message, single-turn messages)
    and a few edges: whitespace around the content, an empty answer, a tool result."""
    sharegpt = json.loads(data_path("chat", "alpaca_sharegpt_multiturn.json").read_text())
    lines = data_path("chat", "alpaca_messages_1k.jsonl").read_text().splitlines()[:12]
    out = [chat.messages_of(r, "r") for r in sharegpt[:24]]
    out += [chat.messages_of(json.loads(line), "r") for line in lines]
    out += [
        [
            {"role": "user", "content": "  Hi there\n"},
            {"role": "assistant", "content": "\nHello!  "},
            {"role": "user", "content": "And?"},
            {"role": "assistant", "content": ""},
        ],
        [
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "Let me look."},
            {"role": "tool", "content": "Sunny, 21 C"},
            {"role": "assistant", "content": "It is sunny."},
        ],
    ]
    assert any(c[0]["role"] == "system" for c in out) and any(len(c) > 4 for c in out)
    return out


@pytest.fixture(scope="module")
def hf_tokenizers(conversations, tmp_path_factory):
    """family -> (transformers tokenizer, the same loaded as lomo-jax loads a tokenizer)."""
    texts = [m["content"] for c in conversations for m in c]
    out = {}
    for family in chat_tokenizers.FAMILIES:
        hf = chat_tokenizers.build(family, texts)
        d = tmp_path_factory.mktemp(family)
        hf.save_pretrained(d)
        out[family] = hf, load_tokenizer(d)
    return out


def edge_whitespace(k: int, ref: list[int], text: str) -> bool:
    """Token k is whitespace at the edge of a reference span (the templates disagree on whether
    the newline after the assistant's header is the assistant's)."""
    edge = (k > 0 and ref[k - 1] != ref[k]) or (k + 1 < len(ref) and ref[k + 1] != ref[k])
    return edge and not text.strip()


@pytest.mark.parametrize("name", ["llama3", "qwen2_5", "qwen3"])
def test_ids_and_mask_equal_apply_chat_template(name, conversations, hf_tokenizers):
    hf, tok = hf_tokenizers[chat_tokenizers.TEMPLATE_FAMILY[name]]
    original, training = templates(name)
    end_of_turn = tok.encode_rendered("<|eot_id|>" if name == "llama3" else "<|im_end|>")
    checked = 0
    for c in conversations:
        ref = hf.apply_chat_template(
            c, chat_template=training, return_dict=True, return_assistant_tokens_mask=True
        )
        turns = sum(m["role"] == "assistant" for m in c)
        for template in (original, training):
            expected = hf.apply_chat_template(c, chat_template=template)["input_ids"]
            r = chat.Renderer(tok, template)
            assert r.ids(c) == expected
            if name == "qwen3" and template is original and turns > 1:
                # Not prefix-preserving: only the last turn can be found.
                with pytest.raises(chat.ChatError, match="differently once later messages"):
                    chat.conversation_tokens(r, c, "assistant", "f:1")
                ids, mask = chat.conversation_tokens(r, c, "last", "f:1")
                assert ids == expected
                last = tok.decode([t for t, m in zip(ids, mask) if m], special=True)
                assert last == f"<think>\n\n</think>\n\n{c[-1]['content']}<|im_end|>\n"
                continue
            ids, mask = chat.conversation_tokens(r, c, "assistant", "f:1")
            assert ids == expected
            if ids != ref["input_ids"]:
                continue
            checked += 1
            wanted = [bool(m) for m in ref["assistant_masks"]]
            for k in (k for k in range(len(ids)) if mask[k] != wanted[k]):
                assert edge_whitespace(k, wanted, hf.decode(ids[k])), (k, hf.decode(ids[k]))
            eot = [k for k in range(len(ids)) if ids[k : k + 1] == end_of_turn]
            assert sum(mask[k] for k in eot) == turns  # every end-of-turn in the loss
    assert checked >= len(conversations)


@pytest.mark.parametrize("name", ["llama3", "qwen2_5", "qwen3"])
def test_one_bos_through_the_rows(name, conversations, hf_tokenizers, tmp_path):
    """The template's BOS is the only one: the tokenizer adds none (Qwen has none at all)."""
    hf, tok = hf_tokenizers[chat_tokenizers.TEMPLATE_FAMILY[name]]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    (tmp_path / "t.jinja").write_text(templates(name)[1])
    options = DataOptions(chat_template=str(tmp_path / "t.jinja"))
    rows = build_rows("chat", data, tok, 1024, options=options)
    assert len(rows) == len(conversations)
    for r, c in zip(range(len(rows)), conversations):
        ids = rows.input_ids[r, rows.segment_ids[r] != 0].tolist()
        assert ids == hf.apply_chat_template(c, chat_template=templates(name)[1])["input_ids"]
        assert ids.count(tok.bos_id) == (1 if name == "llama3" else 0)
        if name == "llama3":
            assert ids[0] == tok.bos_id


def test_sharegpt_and_messages_give_the_same_rows(hf_tokenizers, tmp_path):
    _, tok = hf_tokenizers["qwen"]
    sharegpt = json.loads(data_path("chat", "alpaca_sharegpt_multiturn.json").read_text())[:10]
    names = {"human": "user", "gpt": "assistant", "system": "system"}
    messages = [
        {"dialog": [{"role": names[t["from"]], "content": t["value"]} for t in r["conversations"]]}
        for r in sharegpt
    ]
    (tmp_path / "sharegpt.json").write_text(json.dumps(sharegpt))
    (tmp_path / "dialog.jsonl").write_text("".join(json.dumps(m) + "\n" for m in messages))
    (tmp_path / "t.jinja").write_text(templates("qwen2_5")[0])
    template = str(tmp_path / "t.jinja")
    a = build_rows(
        "chat", tmp_path / "sharegpt.json", tok, 512, options=DataOptions(chat_template=template)
    )
    b = build_rows(
        "chat",
        tmp_path / "dialog.jsonl",
        tok,
        512,
        options=DataOptions(chat_template=template, messages_field="dialog"),
    )
    assert (a.input_ids == b.input_ids).all() and (a.labels == b.labels).all()
    with pytest.raises(chat.ChatError, match=r"dialog.jsonl:1: record has no field 'messages' or"):
        build_rows(
            "chat", tmp_path / "dialog.jsonl", tok, 512, options=DataOptions(chat_template=template)
        )


def test_train_on_last_and_all(hf_tokenizers):
    _, tok = hf_tokenizers["llama3"]
    r = chat.Renderer(tok, templates("llama3")[0])
    c = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    ids, every = chat.conversation_tokens(r, c, "assistant", "f:1")
    _, last = chat.conversation_tokens(r, c, "last", "f:1")
    _, everything = chat.conversation_tokens(r, c, "all", "f:1")
    spoken = lambda mask: tok.decode([t for t, m in zip(ids, mask) if m], special=True)  # noqa: E731
    assert spoken(every) == "Hello<|eot_id|>Goodbye<|eot_id|>"
    assert spoken(last) == "Goodbye<|eot_id|>"
    assert all(everything)


def test_left_truncation_drops_whole_earliest_turns(hf_tokenizers, tmp_path):
    _, tok = hf_tokenizers["qwen"]
    (tmp_path / "t.jinja").write_text(templates("qwen2_5")[0])
    r = chat.Renderer(tok, templates("qwen2_5")[0])
    system = {"role": "system", "content": "Be brief."}
    turns = [
        [{"role": "user", "content": f"Question {k}?"}, {"role": "assistant", "content": a}]
        for k, a in enumerate(["First answer.", "Second answer, longer.", "Third."])
    ]
    whole = [system, *turns[0], *turns[1], *turns[2]]
    kept = [system, *turns[1], *turns[2]]
    seq_len = len(r.ids(kept))
    assert len(r.ids(whole)) > seq_len > len(r.ids([system, *turns[2]]))
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": whole}) + "\n")
    template = str(tmp_path / "t.jinja")
    left = build_rows(
        "chat",
        tmp_path / "c.jsonl",
        tok,
        seq_len,
        options=DataOptions("left", chat_template=template),
    )
    assert left.input_ids[0].tolist() == r.ids(kept)
    ids, mask = chat.conversation_tokens(r, kept, "assistant", "f:1")
    assert left.labels[0, 1:].tolist() == [t if m else IGNORE for t, m in zip(ids, mask)][1:]
    assert "1 truncated (1 of them lost loss tokens, 0 kept none" in left.summary
    right = build_rows(
        "chat", tmp_path / "c.jsonl", tok, seq_len, options=DataOptions(chat_template=template)
    )
    assert right.input_ids[0].tolist() == r.ids(whole)[:seq_len]


def test_chat_template_of_reads_both_places(tmp_path):
    assert chat_template_of(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ a }}"}))
    assert chat_template_of(tmp_path) == "{{ a }}"
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert chat_template_of(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("{{ b }}")  # transformers 5: it wins
    assert chat_template_of(tmp_path) == "{{ b }}"
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(TokenizerError, match="tokenizer_config.json:1: cannot read as json"):
        chat_template_of(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[" * 100_000)
    with pytest.raises(TokenizerError, match="nested deeper than a JSON reader follows"):
        chat_template_of(tmp_path)
    (tmp_path / "chat_template.jinja").write_bytes(b"{{ a }}\n\xff")
    with pytest.raises(TokenizerError, match="chat_template.jinja:2: not UTF-8 text"):
        chat_template_of(tmp_path)


def test_bad_templates_are_one_line(hf_tokenizers, tmp_path):
    _, tok = hf_tokenizers["qwen"]  # its directory has no chat template
    (tmp_path / "c.jsonl").write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Yo"},
                ]
            }
        )
        + "\n"
    )
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m.content }}")
    cases = {
        None: f"{tok.files[0].parent}: no chat template (neither chat_template.jinja nor",
        str(tmp_path / "nope.jinja"): "nope.jinja: chat template file not found",
        str(
            tmp_path / "broken.jinja"
        ): "broken.jinja:1: not a chat template: Unexpected end of template",
    }
    for template, message in cases.items():
        with pytest.raises(UserError, match=re.escape(message)):
            build_rows(
                "chat", tmp_path / "c.jsonl", tok, 64, options=DataOptions(chat_template=template)
            )


@pytest.fixture(scope="module")
def chat_model(hf_tokenizers, tmp_path_factory):
    """A tiny Hugging Face model directory with the Qwen tokenizer and Qwen2.5's template in
    chat_template.jinja, as transformers 5 saves them."""
    hf, _ = hf_tokenizers["qwen"]
    d = make_hf_dir(
        tmp_path_factory.mktemp("model") / "m", LlamaConfig(**TINY | {"vocab_size": 512})
    )
    hf.chat_template = templates("qwen2_5")[0]
    hf.save_pretrained(d)
    assert (d / "chat_template.jinja").is_file()
    return d


BAD = {
    "no assistant": (
        [{"role": "user", "content": "Hi"}],
        "bad.jsonl:2: the conversation has no assistant turn",
    ),
    "content not text": (
        [
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": "Yo"},
        ],
        "bad.jsonl:2: message 1 (user): content of type list; content must be text",
    ),
    "unknown role": (
        [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}],
        "bad.jsonl:2: message 2: unknown role 'bot'",
    ),
    "unknown sharegpt role": (
        [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Yo"}],
        "bad.jsonl:2: message 2: unknown 'from' 'robot'",
    ),
    "not prefix-preserving": (
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Ciao"},
        ],
        "bad.jsonl:2: {template} renders message 2 (assistant) differently once later",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_conversation_is_one_line_and_nothing_is_written(
    chat_model, tmp_path, capsys, monkeypatch, case
):
    monkeypatch.setenv("LOMO_JAX_CACHE", str(tmp_path / "cache"))
    conversation, message = BAD[case]
    good = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    key = "conversations" if "sharegpt" in case else "messages"
    (tmp_path / "bad.jsonl").write_text(
        json.dumps({"messages": good}) + "\n" + json.dumps({key: conversation}) + "\n"
    )
    template = tmp_path / "qwen3.jinja"
    template.write_text(templates("qwen3")[0])
    flags = ["--format", "chat", "--seq-len", "64", "--steps", "1", "--batch-size", "1"]
    if case == "not prefix-preserving":
        flags += ["--chat-template", str(template)]
    out = tmp_path / "run"
    assert main(train_args(chat_model, tmp_path / "bad.jsonl", out, *flags)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    expected = message.format(template=template).replace("bad.jsonl", str(tmp_path / "bad.jsonl"))
    assert err.startswith(f"lomo-jax: error: {expected}"), err
    assert not out.exists()
    assert not (tmp_path / "cache").exists()  # nothing cached either


@pytest.mark.slow
def test_train_and_eval_read_conversations(chat_model, tmp_path, capsys):
    """Packed rows; the template given to train (`--chat-template`, here Qwen2.5's training
    variant) is the trained model's own afterwards: eval reads it from the run, and the export
    carries it as transformers loads it."""
    c = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    (tmp_path / "c.jsonl").write_text((json.dumps({"messages": c}) + "\n") * 6)
    flags = ["--format", "chat", "--seq-len", "128", "--pack", "--train-on", "last"]
    trained_with = tmp_path / "trained_with.jinja"
    trained_with.write_text(templates("qwen2_5")[1])
    assert trained_with.read_text() != (chat_model / "chat_template.jinja").read_text()
    out = tmp_path / "run"
    steps = ["--steps", "2", "--batch-size", "1", "--optimizer", "adalomo"]
    given = ["--chat-template", str(trained_with)]
    assert main(train_args(chat_model, tmp_path / "c.jsonl", out, *flags, *given, *steps)) == 0
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["format"] == "chat" and saved["pack"] and saved["train_on"] == "last"
    assert (out / "chat_template.jinja").read_text() == trained_with.read_text()
    capsys.readouterr()
    eval_args = ["eval", str(out), "--data", str(tmp_path / "c.jsonl"), *flags]
    assert main([*eval_args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tokens"] == 6 * len(tok_spoken(out, c))
    assert main(["export", str(out), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.chat_template == trained_with.read_text()


def tok_spoken(model_dir, c):
    """The tokens of the assistant's turn in the rendering of conversation `c`."""
    tok = load_tokenizer(model_dir)
    r = chat.Renderer(tok, chat_template_of(model_dir))
    ids, mask = chat.conversation_tokens(r, c, "assistant", "f:1")
    return [t for t, m in zip(ids, mask) if m]
