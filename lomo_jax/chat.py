"""Conversations as training examples: records holding OpenAI-style `messages` (role / content) or
ShareGPT `conversations` (from / value), rendered with the model's own chat template exactly as
transformers' `apply_chat_template` renders them, with the loss on what the assistant says.

The assistant's tokens are found without `{% generation %}` tags (which few shipped templates
have), the way torchtune and axolotl find them: the conversation up to an assistant turn is
rendered with the generation prompt, then up to the end of the turn; what lies between, taken in
the whole conversation's rendering, is the turn's, its end-of-turn token included. What a
template adds only at the end of a conversation (a final EOS) belongs to the last turn. A template
that renders a turn differently once later turns follow (Qwen3's drops earlier <think> blocks)
has no such boundaries, and is refused for the turns that need them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lomo_jax.errors import UserError
from lomo_jax.inputs import SMALL_FILE, read_text
from lomo_jax.loss import IGNORE
from lomo_jax.packing import Example, truncate
from lomo_jax.tokenizer import CHAT_TEMPLATE_FILE, Tokenizer

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}
FIELDS = ("messages", "conversations")  # looked for in this order
TRAIN_ON = ("assistant", "last", "all")


class ChatError(UserError, ValueError):
    """A conversation, or a chat template, that cannot be rendered (the message names where)."""


def read_template(path: str | Path) -> str:
    """A chat template file's text (`--chat-template FILE`)."""
    p = Path(path)
    if not p.exists():
        raise ChatError(f"{p}: chat template file not found")
    return read_text(p, SMALL_FILE, ChatError)


def template_for(tok: Tokenizer, path: str | Path | None = None) -> tuple[str, str]:
    """(template, where it is): the file `path`, else the one beside the tokenizer's files."""
    if path is not None:
        return read_template(path), str(path)
    template = tok.own_chat_template()
    where = tok.files[0].parent
    jinja = where / CHAT_TEMPLATE_FILE
    return template, str(jinja) if jinja.is_file() else f"{where}/tokenizer_config.json's template"


def messages_of(record: dict, place: str, field: str | None = None) -> list[dict]:
    """The record's conversation as role / content messages (ShareGPT's from / value mapped to
    them), checked; keys whose value is None are dropped, as `apply_chat_template` drops them."""
    if field is None:
        field = next((f for f in FIELDS if f in record), None)
        if field is None:
            raise ChatError(f"{place}: record has no field 'messages' or 'conversations'")
    elif field not in record:
        raise ChatError(f"{place}: record has no field {field!r}")
    turns = record[field]
    if not isinstance(turns, list) or not turns:
        raise ChatError(f"{place}: {field!r} must be a non-empty list of messages")
    messages = [_message(m, f"{place}: message {k}") for k, m in enumerate(turns, 1)]
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatError(f"{place}: the conversation has no assistant turn (nothing to learn)")
    return messages


def _message(m, where: str) -> dict:
    if not isinstance(m, dict):
        raise ChatError(f"{where} is not an object ({type(m).__name__})")
    m = {key: value for key, value in m.items() if value is not None}
    if "role" not in m and "from" in m:  # ShareGPT
        if m["from"] not in SHAREGPT_ROLES:
            raise ChatError(
                f"{where}: unknown 'from' {m['from']!r} (expected {', '.join(SHAREGPT_ROLES)})"
            )
        m["role"] = SHAREGPT_ROLES[m.pop("from")]
        if "value" in m:
            m["content"] = m.pop("value")
    if "role" not in m:
        raise ChatError(f"{where} has neither 'role' nor 'from'")
    if m["role"] not in ROLES:
        raise ChatError(f"{where}: unknown role {m['role']!r} (expected {', '.join(ROLES)})")
    content = m.get("content")
    if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
        got = "no content" if content is None else f"content of type {type(content).__name__}"
        raise ChatError(f"{where} ({m['role']}): {got}; content must be text")
    return m


class Renderer:
    """A chat template with a tokenizer: text and token ids of conversations."""

    def __init__(self, tok: Tokenizer, template: str, source: str = "the chat template"):
        import jinja2
        from transformers.utils.chat_template_utils import _compile_jinja_template

        try:
            _compile_jinja_template(template)
        except jinja2.TemplateSyntaxError as e:
            raise ChatError(
                f"{source}:{e.lineno}: not a chat template: {' '.join(str(e.message).split())}"
            ) from None
        self.tok, self.template, self.source = tok, template, source

    def text(
        self, messages: Sequence[dict], generation_prompt: bool = False, place: str | None = None
    ) -> str:
        """What `apply_chat_template(messages, tokenize=False)` gives; a conversation the
        template refuses is a ChatError naming `place` (the record) and the template."""
        import jinja2

        try:
            return self.tok.render_chat(messages, generation_prompt, self.template)
        except jinja2.TemplateError as e:
            where = f"{place}: " if place else ""
            raise ChatError(f"{where}{self.source} refuses the conversation: {e}") from None

    def ids(self, messages: Sequence[dict], generation_prompt: bool = False) -> list[int]:
        """What `apply_chat_template(messages, tokenize=True)` gives: the template's BOS is the
        only one (the tokenizer adds none)."""
        return self.tok.encode_chat(messages, generation_prompt, self.template)


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)


def conversation_tokens(
    r: Renderer, messages: Sequence[dict], train_on: str, place: str
) -> tuple[list[int], list[bool]]:
    """Token ids of the whole conversation and which of them carry the loss: every assistant
    turn's (`assistant`), the last one's (`last`) or all of them (`all`)."""

    def text(msgs, generation_prompt=False):
        return r.text(msgs, generation_prompt, place)

    full = text(messages)
    ids = r.tok.encode_rendered(full)
    if train_on == "all":
        return ids, [True] * len(ids)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    mask = [False] * len(ids)
    for i in turns[-1:] if train_on == "last" else turns:
        before = text(messages[:i], generation_prompt=True)
        upto = full if i == len(messages) - 1 else text(messages[: i + 1])
        same = _common_prefix(upto, full)
        # What `upto` has beyond the whole conversation's text must be what the template adds
        # at a conversation's end, and so end the whole conversation too.
        if not full.startswith(before) or same < len(before) or not full.endswith(upto[same:]):
            instead = "--train-on last, or " if train_on != "last" else ""
            raise ChatError(
                f"{place}: {r.source} renders message {i + 1} ({messages[i]['role']}) differently "
                "once later messages follow (e.g. Qwen3's drops earlier <think> blocks), so its "
                f"turns cannot be told apart; use {instead}a template that keeps earlier turns as "
                "they were (e.g. a *_training.jinja)"
            )
        start = _common_prefix(r.tok.encode_rendered(before), ids)
        end = len(ids) if upto is full else _common_prefix(r.tok.encode_rendered(upto[:same]), ids)
        mask[start:end] = [True] * (end - start)
    return ids, mask


def _shorter(messages: Sequence[dict]):
    """The conversation without its earliest turns, one more turn dropped each time (a turn
    starts at a user message; leading system messages stay)."""
    first = next(k for k, m in enumerate(messages) if m["role"] != "system")
    for k in range(first + 1, len(messages)):
        if messages[k]["role"] == "user":
            yield [*messages[:first], *messages[k:]]


def _example(r: Renderer, messages: Sequence[dict], train_on: str, place: str) -> Example:
    ids, mask = conversation_tokens(r, messages, train_on, place)
    return Example(ids, [t if m else IGNORE for t, m in zip(ids, mask)])


def fit(
    r: Renderer, messages: Sequence[dict], train_on: str, place: str, seq_len: int, side: str
) -> Example:
    """The conversation as one example of at most `seq_len` tokens: cut at the end (`right`), or
    (`left`) without as many of its earliest turns as it takes, then cut at the start (keeping
    BOS) if the last turn alone is too long."""
    whole = ex = _example(r, messages, train_on, place)
    if len(ex.ids) <= seq_len:
        return ex
    if side == "left":
        for fewer in _shorter(messages):
            ex = _example(r, fewer, train_on, place)
            if len(ex.ids) <= seq_len:
                break
    keep = int(bool(ex.ids) and ex.ids[0] == r.tok.bos_id)
    out = truncate(ex, seq_len, side, keep)
    out.truncated, out.lost = True, max(0, whole.loss_tokens - out.loss_tokens)
    return out


def examples(
    records: Sequence[dict],
    places: Sequence[str],
    r: Renderer,
    seq_len: int,
    train_on: str = "assistant",
    side: str = "right",
    field: str | None = None,
) -> list[Example]:
    return [
        fit(r, messages_of(record, place, field), train_on, place, seq_len, side)
        for record, place in zip(records, places)
    ]
