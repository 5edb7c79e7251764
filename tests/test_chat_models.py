"""An instruct model keeps what makes it chat, against transformers as the reference: its chat
template (chat_template.jinja, a named one in additional_chat_templates/, or inside
tokenizer_config.json) and generation_config.json come out of import, train and export as they
went in (AutoTokenizer's chat_template, GenerationConfig); `generate` stops at every end id and
prints none; `generate --chat` renders as apply_chat_template does; `chat` keeps its KV cache
across turns and replies as transformers' generate does on the whole conversation.

The instruct model is a tiny Qwen2 whose weights make greedy decoding follow a chain of tokens
after the assistant's header: "fine thanks", then <|endoftext|> (its second end id, an ordinary
token: decoding would show it), then " bye". A random one of the same shape chats."""

import io
import json
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, processors, trainers
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

import lomo_jax
from convert import export_hf, import_checkpoint
from convert.synthetic import random_hf_tensors, write_llama2c, write_meta
from lomo_jax.cli import main
from lomo_jax.generate import Context, Sampling, generate, warp
from lomo_jax.generation_config import GenerationConfig, GenerationConfigError
from tests.conftest import CONFIGS, TINY, needs_torch, random_ids, train_args

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEMPLATES = {"default": CHATML, "tool_use": "{# tools go here #}" + CHATML}
CORPUS = ["hello how are you", "fine thanks and you", "the cat sat on the mat", "bye for now"]
VOCAB = 320
REPLY, AFTER_END = "fine thanks", " bye"
USER = [{"role": "user", "content": "hello how are you"}]
GENERATION = dict(do_sample=True, temperature=0.6, top_p=0.9, top_k=20)


def qwen2_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """Qwen2's tokenizer class on a byte-level BPE trained here; <|im_start|> and <|im_end|> are
    special, <|endoftext|> an ordinary added token."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator(CORPUS * 10, trainer)
    model = json.loads(bpe.to_str())["model"]
    tok = transformers.Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(m) for m in model["merges"]],
        eos_token="<|im_end|>",
        pad_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.add_tokens([AddedToken("<|endoftext|>", special=False)])
    tok.chat_template = dict(TEMPLATES)
    return tok


def save_instruct_model(path, chain: bool, **generation):
    """A tiny Qwen2 saved with save_pretrained, its tokenizer's templates in chat_template.jinja
    and additional_chat_templates/; end ids [<|im_end|>, <|endoftext|>], pad <|endoftext|>."""
    torch = needs_torch()
    tok = qwen2_tokenizer()
    im_end, eot = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = transformers.Qwen2Config(
        **dict(TINY, vocab_size=VOCAB),
        num_key_value_heads=2,
        tie_word_embeddings=False,
        eos_token_id=im_end,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p)
            )
        if chain:  # the last token's embedding points the head at the next token of the chain
            emb = model.model.embed_tokens.weight
            emb.copy_(torch.randn_like(emb))
            prompt = tok.apply_chat_template(USER, add_generation_prompt=True, return_dict=False)
            seq = prompt[-1:] + tok.encode(REPLY) + [eot] + tok.encode(AFTER_END)
            assert len(set(seq)) == len(seq)
            for a, b in zip(seq, seq[1:]):
                model.lm_head.weight[b] += 1.5 * emb[a] / emb[a].norm()
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=[im_end, eot], pad_token_id=eot, **generation
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    return save_instruct_model(tmp_path_factory.mktemp("instruct") / "src", True, **GENERATION)


@pytest.fixture(scope="module")
def chatty(tmp_path_factory):
    """Random weights, greedy by default (no do_sample)."""
    return save_instruct_model(tmp_path_factory.mktemp("chatty") / "src", False)


def hf_tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(path)


def assert_keeps_chat(out, src):
    """`out`'s chat templates and generation config are `src`'s (its file byte for byte)."""
    assert hf_tokenizer(out).chat_template == hf_tokenizer(src).chat_template
    assert transformers.GenerationConfig.from_pretrained(
        out
    ) == transformers.GenerationConfig.from_pretrained(src)
    name = "generation_config.json"
    assert (out / name).read_text() == (src / name).read_text()


@pytest.mark.slow
def test_instruct_model_round_trip_keeps_template_and_end_ids(instruct, tmp_path, capsys):
    """import -> train 2 steps on conversations (`--format chat`, the model's own template) ->
    export."""
    torch = needs_torch()
    ckpt, run, out = tmp_path / "ckpt", tmp_path / "run", tmp_path / "out"
    data = tmp_path / "chats.jsonl"
    turns = [("the cat sat on the mat", "bye for now"), ("bye for now", "the cat sat on the mat")]
    conversations = [  # none about the chain the weights hold after "hello how are you"
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in turns * 2
    ]
    data.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    assert main(["import", str(instruct), str(ckpt)]) == 0
    flags = ["--format", "chat", "--steps", "2", "--batch-size", "2", "--seq-len", "64"]
    assert main(train_args(ckpt, data, run, *flags, "--lr", "1e-3")) == 0
    assert main(["export", str(run), str(out)]) == 0
    assert isinstance(hf_tokenizer(instruct).chat_template, dict)  # both places are exercised
    for model in (ckpt, run, out):
        assert_keeps_chat(model, instruct)

    tok = hf_tokenizer(out)
    im_end, eot = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    prompt = tok.apply_chat_template(USER, add_generation_prompt=True, return_tensors="pt")
    prompt = prompt["input_ids"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        stopped = hf.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1] :]
        first_end_only = hf.generate(
            prompt, max_new_tokens=12, do_sample=False, eos_token_id=im_end
        )[0, prompt.shape[1] :]
    stopped = stopped.tolist()
    assert stopped[-1] == eot and im_end not in stopped
    assert first_end_only.tolist()[: len(stopped)] == stopped  # without it: no stop there
    assert len(first_end_only) > len(stopped)

    capsys.readouterr()
    generate = ["generate", str(out), "--chat", USER[0]["content"], "--max-new-tokens", "12"]
    assert main([*generate, "--temperature", "0"]) == 0
    printed, log = capsys.readouterr()
    assert printed == tok.decode(stopped[:-1]) + "\n" == REPLY + "\n"
    assert f"greedy, at most 12 new tokens, ending at ids [{im_end}, {eot}]" in log


@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json"])
def test_template_survives_save_pretrained_and_import(instruct, tmp_path, where):
    """from_pretrained -> save_pretrained -> export, and import -> export, with the templates in
    either place transformers keeps them."""
    src = tmp_path / "src"
    shutil.copytree(instruct, src)
    if where == "tokenizer_config.json":
        shutil.rmtree(src / "additional_chat_templates")
        (src / "chat_template.jinja").unlink()
        hf_tokenizer(instruct).save_pretrained(src, save_jinja_files=False)
        assert "chat_template" in json.loads((src / where).read_text())
    assert hf_tokenizer(src).chat_template == TEMPLATES
    lomo_jax.from_pretrained(src).save_pretrained(tmp_path / "saved")
    import_checkpoint(src, tmp_path / "imported")
    for ckpt in ("saved", "imported"):
        export_hf(tmp_path / ckpt, tmp_path / f"{ckpt}-hf")
        for model in (tmp_path / ckpt, tmp_path / f"{ckpt}-hf"):
            assert_keeps_chat(model, src)


def test_hub_id_brings_template_and_generation_config(instruct, tmp_path, monkeypatch):
    """An `org/name` in the Hugging Face cache (the layout `hf download` leaves, offline)."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--instruct"
    shutil.copytree(instruct, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["import", "tiny-org/instruct", str(tmp_path / "ckpt")]) == 0
    assert_keeps_chat(tmp_path / "ckpt", instruct)


def test_meta_and_llama2c_get_a_generation_config_of_their_end_ids(tmp_path):
    """Llama 3 stops at each of Meta's end ids; a llama2.c model at its EOS."""
    needs_torch()  # Meta's checkpoints are PyTorch pickles
    cfg = CONFIGS["gqa"]
    llama3 = cfg.replace(vocab_size=128256, rope_theta=500000.0)
    write_meta(tmp_path / "meta", llama3, random_hf_tensors(llama3), multiple_of=32)
    write_llama2c(tmp_path / "l2c.bin", cfg, random_hf_tensors(cfg))
    expected = {"meta": ([128001, 128008, 128009], 128000), "l2c.bin": (2, 1)}
    for src, (eos, bos) in expected.items():
        import_checkpoint(tmp_path / src, tmp_path / f"{src}-ckpt")
        export_hf(tmp_path / f"{src}-ckpt", tmp_path / f"{src}-hf")
        for model in (f"{src}-ckpt", f"{src}-hf"):
            theirs = transformers.GenerationConfig.from_pretrained(tmp_path / model)
            assert (theirs.eos_token_id, theirs.bos_token_id) == (eos, bos)


def test_next_turn_prefills_only_its_new_tokens(chatty):
    """Turn 2 through the cache of turn 1 = a fresh generation from the whole conversation."""
    model = lomo_jax.from_pretrained(chatty)
    tok, ends, n = model.tokenizer, model.end_ids, 8
    context = Context(model.config, model.params)
    turn1 = tok.encode_chat(USER)
    reply = context.generate([turn1], n, end_ids=ends)[0]
    assert context.prefilled == len(turn1)
    messages = [*USER, {"role": "assistant", "content": model.reply_text(reply)}]
    turn2 = tok.encode_chat([*messages, {"role": "user", "content": "the cat sat"}])
    read = turn1 + reply[:-1]  # the last token drawn was never run through the model
    shared = next(i for i, (a, b) in enumerate(zip(read + [-1], turn2)) if a != b)
    assert shared > len(turn1)
    again = context.generate([turn2], n, end_ids=ends)[0]
    assert context.prefilled == len(turn2) - shared
    assert again == generate(model.config, model.params, [turn2], n, end_ids=ends)[0]


def test_context_runs_what_differs_from_the_shared_prefix(chatty):
    """A conversation the template renders otherwise than it was read (Qwen3 drops earlier
    <think> blocks) diverges mid-cache: the cache keeps the shared prefix, runs the rest."""
    model = lomo_jax.from_pretrained(chatty)
    first = random_ids(model.config, 1, 20, seed=4)
    second = np.concatenate([first[:, :7], random_ids(model.config, 1, 15, seed=5)], axis=1)
    assert first[0, 7] != second[0, 7]
    context = Context(model.config, model.params)
    context.generate(first, 4, end_ids=())
    again = context.generate(second, 4, end_ids=())
    assert context.prefilled == second.shape[1] - 7
    assert again == generate(model.config, model.params, second, 4, end_ids=())


def test_chat_over_stdin_replies_as_transformers_does(chatty, monkeypatch, capsys):
    """Each reply is transformers' greedy generation on the whole conversation so far; /reset
    starts over (the same first reply), /exit ends before the last line; a message the model's
    context cannot hold is refused with one line, and the conversation goes on without it."""
    torch = needs_torch()
    lines = ["hello how are you", "the cat sat", "/reset", "hello how are you", "/exit", "bye"]
    too_long = " ".join(["the cat sat on the mat"] * 30)
    text = "\n".join(lines[:2] + [too_long] + lines[2:]) + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    n, system = 6, "you are a cat"
    assert main(["chat", str(chatty), "--max-new-tokens", str(n), "--system", system]) == 0

    tok = hf_tokenizer(chatty)
    hf = transformers.AutoModelForCausalLM.from_pretrained(chatty, dtype=torch.float32)
    replies, messages = [], [{"role": "system", "content": system}]
    for user in [lines[0], lines[1], None, lines[3]]:
        if user is None:
            messages = messages[:1]
            continue
        messages.append({"role": "user", "content": user})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"]
        with torch.no_grad():
            new = hf.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1] :].tolist()
        if new[-1] in hf.generation_config.eos_token_id:
            new = new[:-1]
        replies.append(tok.decode(new, skip_special_tokens=True))
        messages.append({"role": "assistant", "content": replies[-1]})
    out, err = capsys.readouterr()
    assert out == "".join(r + "\n" for r in replies)
    assert replies[0] == replies[2]
    assert "more than the model's 128; /reset starts a new one" in err


def test_sampling_defaults_come_from_the_generation_config(instruct, chatty):
    """do_sample's temperature / top_p / top_k unless given; greedy without do_sample."""
    model = lomo_jax.from_pretrained(instruct)
    assert model.generation_config.sampling() == Sampling(0.6, 0.9, 20)
    assert model.generation_config.sampling(temperature=0.0) == Sampling(0.0, 0.9, 20)
    assert model.generation_config.sampling(top_k=0) == Sampling(0.6, 0.9, 0)
    assert lomo_jax.from_pretrained(chatty).generation_config.sampling() == Sampling()
    prompt = [model.tokenizer.encode_chat(USER)]
    ours = model.generate(prompt, 6, seed=3)
    sampled = Sampling(0.6, 0.9, 20)
    assert ours == generate(model.config, model.params, prompt, 6, sampled, 3, model.end_ids)


@pytest.mark.parametrize(
    "sampling", [Sampling(0.7, 0.9, 20), Sampling(1.3, 0.5), Sampling(0.5, 1.0, 3)]
)
def test_warp_matches_transformers_logits_warpers(sampling):
    torch = needs_torch()
    logits = np.random.default_rng(0).normal(0, 3, (3, VOCAB)).astype(np.float32)
    theirs = torch.from_numpy(logits)
    theirs = transformers.TemperatureLogitsWarper(sampling.temperature)(None, theirs)
    if sampling.top_k:
        theirs = transformers.TopKLogitsWarper(sampling.top_k)(None, theirs)
    theirs = transformers.TopPLogitsWarper(sampling.top_p)(None, theirs).numpy()
    ours = np.asarray(warp(jnp.asarray(logits), sampling))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    assert np.isinf(ours).any()
    np.testing.assert_allclose(ours[~np.isinf(ours)], theirs[~np.isinf(theirs)], rtol=1e-6)


LLAMA3_TEMPLATE = (
    "{% for m in messages %}{% set content = '<|start_header_id|>' + m['role'] + "
    "'<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


def test_chat_prompt_has_one_bos_where_the_template_writes_it(tmp_path):
    """Llama 3's template writes <|begin_of_text|> and its tokenizer adds one to any text: the
    chat prompt is apply_chat_template's, with one BOS (the text encoded again has two)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    special = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=special,
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS * 10, trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )
    fast.chat_template = LLAMA3_TEMPLATE
    fast.save_pretrained(tmp_path)
    ours = lomo_jax.load_tokenizer(tmp_path).encode_chat(USER)
    theirs = hf_tokenizer(tmp_path)
    assert ours == theirs.apply_chat_template(USER, add_generation_prompt=True, return_dict=False)
    assert ours.count(0) == 1
    assert theirs(theirs.apply_chat_template(USER, tokenize=False))["input_ids"].count(0) == 2


def test_bad_chat_inputs_are_one_line(chatty, tmp_path, capsys, monkeypatch):
    plain = tmp_path / "plain"
    shutil.copytree(chatty, plain)
    (plain / "chat_template.jinja").unlink()
    shutil.rmtree(plain / "additional_chat_templates")
    bad_config = tmp_path / "bad"
    shutil.copytree(chatty, bad_config)
    (bad_config / "generation_config.json").write_text('{"eos_token_id": [2], "top_p": 2}')
    cases = [
        (["generate", str(plain), "--chat", "hi"], f"{plain}: no chat template (neither"),
        (["generate", str(chatty), "--system", "x"], "--system and --chat-template go with --chat"),
        (
            ["import", str(bad_config), str(tmp_path / "out")],
            f"{bad_config / 'generation_config.json'}: top_p must be a number in (0, 1], got 2",
        ),
        (["generate", str(chatty), "--chat", "hi", "--top-k", "-1"], "top_k must be an integer"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"lomo-jax: error: {message}"), err
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hello\n\xff\n"), "utf-8"))
    assert main(["chat", str(chatty), "--max-new-tokens", "2"]) == 1
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1  # the first line's reply
    assert err.strip().splitlines()[-1] == "lomo-jax: error: stdin: line 2 is not UTF-8 text"
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    given = ["--chat-template", str(template), "--max-new-tokens", "8"]
    assert main(["generate", str(plain), "--chat", "hi", *given]) == 0
    expected = lomo_jax.from_pretrained(chatty).chat([{"role": "user", "content": "hi"}], 8)
    assert capsys.readouterr().out == expected + "\n"


def test_unreadable_generation_configs_are_one_line(tmp_path):
    f = tmp_path / "generation_config.json"
    cases = {
        b"[" * 100_000: "nested deeper than a JSON reader follows",
        b'{"eos_token_id": 2,\n "top_p": "\xff"}': ":2: not UTF-8 text",
        b"{oops": ":1: cannot read as json",
        b"[2]": "not a JSON object",
    }
    for content, message in cases.items():
        f.write_bytes(content)
        with pytest.raises(GenerationConfigError, match=re.escape(message)):
            GenerationConfig.read(f)


def test_generation_config_is_derived_where_there_is_none(chatty, tmp_path):
    """transformers' from_model_config on the model's config: its BOS, end and pad ids."""
    src = tmp_path / "src"
    shutil.copytree(chatty, src)
    (src / "generation_config.json").unlink()
    import_checkpoint(src, tmp_path / "ckpt")
    ours = transformers.GenerationConfig.from_pretrained(tmp_path / "ckpt")
    theirs = transformers.GenerationConfig.from_model_config(
        transformers.AutoConfig.from_pretrained(src)
    )
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours, key) == getattr(theirs, key), key
