"""`lomo-jax chat`: a conversation in the terminal. One KV cache lives across the turns: each turn
renders the whole conversation with the chat template, and only what the cache does not hold (the
new message, the template's headers, and whatever the template renders differently from what was
generated) runs through the model."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TextIO

from lomo_jax.chat import ChatError, Renderer, template_for
from lomo_jax.generate import MAX_SEED, Context, Sampling
from lomo_jax.pretrained import LlamaModel

HELP = "/reset starts a new conversation, /exit or Ctrl-D quits"


class _Printer:
    """Writes a reply as its tokens come: the text decoded so far, held back while it ends in
    an unfinished character."""

    def __init__(self, out: TextIO):
        self.out, self.shown = out, ""

    def show(self, text: str, final: bool = False) -> None:
        if (text.endswith("\ufffd") and not final) or not text.startswith(self.shown):
            return
        self.out.write(text[len(self.shown) :])
        self.out.flush()
        self.shown = text


def _piped_lines(stdin: TextIO) -> Iterator[str]:
    """The lines of a pipe or file, each decoded alone, so that a bad byte is named by its line
    (a text stream decodes ahead, in chunks)."""
    raw = getattr(stdin, "buffer", None)
    if raw is None:  # text already (io.StringIO)
        yield from (line.rstrip("\r\n") for line in iter(stdin.readline, ""))
        return
    for n, line in enumerate(iter(raw.readline, b""), 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise ChatError(f"stdin: line {n} is not UTF-8 text") from None
        yield text.rstrip("\r\n")


def _lines(stdin: TextIO, stdout: TextIO) -> Iterator[str]:
    """The user's lines; on a terminal after a prompt, with line editing and history."""
    if not (stdin is sys.stdin and stdin.isatty()):
        yield from _piped_lines(stdin)
        return
    import readline  # noqa: F401  (input() edits lines with it)

    while True:
        try:
            yield input("> ")
        except EOFError:
            stdout.write("\n")
            return


def chat_loop(
    model: LlamaModel,
    stdin: TextIO,
    stdout: TextIO,
    sampling: Sampling,
    max_new_tokens: int,
    system: str | None = None,
    template: str | None = None,
    seed: int = 0,
) -> int:
    """Reads a user message per line until EOF or /exit and writes each reply on its own line;
    returns the number of replies. Turn k samples with seed `seed + k`. `template`: the chat
    template's text, default the tokenizer's own."""
    tokenizer = model.require_tokenizer()
    if template is None:
        renderer = Renderer(tokenizer, *template_for(tokenizer))
    else:
        renderer = Renderer(tokenizer, template)
    start = [{"role": "system", "content": system}] if system is not None else []
    messages = list(start)
    context = Context(model.config, model.params)
    context_len = model.config.max_position_embeddings
    if stdin.isatty():
        print(f"chatting with {context_len} tokens of context; {HELP}", file=sys.stderr)
    replies = 0
    for line in _lines(stdin, stdout):
        command = line.strip()
        if command == "/exit":
            break
        if command == "/reset":
            messages = list(start)
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        ids = renderer.ids(messages, generation_prompt=True)
        room = context_len - len(ids)
        if room <= 0:
            messages.pop()
            print(
                f"the conversation would take {len(ids)} tokens, more than the model's "
                f"{context_len}; /reset starts a new one",
                file=sys.stderr,
            )
            continue
        tokens: list[int] = []
        printer = _Printer(stdout)
        n = min(max_new_tokens, room)
        turn_seed = (seed + replies) % (MAX_SEED + 1)  # a seed near the top wraps, as uint32s do
        for next_B in context.stream([ids], n, sampling, turn_seed, model.end_ids):
            tokens.append(int(next_B[0]))
            printer.show(model.reply_text(tokens))
        reply = model.reply_text(tokens)
        printer.show(reply, final=True)
        stdout.write("\n")
        stdout.flush()
        messages.append({"role": "assistant", "content": reply})
        replies += 1
    return replies
