"""One small interface over the tokenizer kinds LLaMA checkpoints ship: a SentencePiece
`tokenizer.model` (Llama 1/2), a tiktoken `tokenizer.model` (Llama 3), or a Hugging Face
`tokenizer.json` directory."""

from __future__ import annotations

import base64
import functools
import re
from collections.abc import Sequence
from pathlib import Path

from lomo_jax.errors import UserError
from lomo_jax.inputs import SMALL_FILE, is_unicode, read_json, read_text


class TokenizerError(UserError, ValueError):
    """A tokenizer file that cannot be read, or a tokenizer missing where one is needed."""


# A Hugging Face tokenizer's files as transformers 5 saves them: its chat template in
# chat_template.jinja (older ones keep it in tokenizer_config.json), named extra templates
# (e.g. `tool_use`) as additional_chat_templates/NAME.jinja.
CHAT_TEMPLATE_FILE = "chat_template.jinja"
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    CHAT_TEMPLATE_FILE,
)
CHAT_TEMPLATE_DIR = "additional_chat_templates"


def tokenizer_files(directory: Path) -> list[Path]:
    """The tokenizer files (chat templates included) a model directory holds."""
    files = [directory / n for n in HF_TOKENIZER_FILES if (directory / n).is_file()]
    return files + sorted((directory / CHAT_TEMPLATE_DIR).glob("*.jinja"))


def saved_name(f: Path) -> str:
    """A tokenizer file's path in a model directory: a SentencePiece model under the name
    Hugging Face looks for, a named chat template in its folder."""
    if f.parent.name == CHAT_TEMPLATE_DIR:
        return f"{CHAT_TEMPLATE_DIR}/{f.name}"
    return "tokenizer.model" if f.suffix == ".model" else f.name


# Meta's names of Llama 3's 256 special tokens, numbered after the BPE ranks (its tokenizer.py
# from 3.1 on; 3.0 had the same ids for the tokens it used and left the others reserved).
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 256 - 8)]
LLAMA3_BOS, LLAMA3_EOS = LLAMA3_SPECIAL_TOKENS[:2]
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+")


def is_tiktoken(path: Path) -> bool:
    """A tiktoken BPE file is text, `base64(token) rank` a line; SentencePiece is a protobuf."""
    with open(path, "rb") as f:
        return _TIKTOKEN_LINE.fullmatch(f.readline(1024).rstrip(b"\r\n")) is not None


def llama3_backend(path: Path):
    """Llama 3's tiktoken file as the `tokenizers` BPE transformers' converter makes of it
    (convert_llama_weights_to_hf.py's Llama3Converter): byte-level BPE, Meta's special tokens,
    BOS prepended on encode. Cached by content: converting 128k ranks takes seconds."""
    try:
        return _llama3_backend(path.read_bytes())
    except _BadLine as e:
        raise TokenizerError(f"{path}: line {e} is not a tiktoken `base64 rank` line") from None


class _BadLine(ValueError):
    pass


def _tiktoken_ranks(data: bytes) -> dict[bytes, int]:
    """tiktoken's file format, read here: tiktoken's own loader caches local files by name."""
    ranks = {}
    for n, line in enumerate(data.splitlines(), 1):
        if line:
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:  # binascii.Error is one
                raise _BadLine(n) from None
    return ranks


@functools.lru_cache(maxsize=1)
def _llama3_backend(data: bytes):
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = _tiktoken_ranks(data)

    class Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(_):
            return ranks

    backend = Converter(extra_special_tokens=LLAMA3_SPECIAL_TOKENS).converted()
    bos = (LLAMA3_BOS, backend.token_to_id(LLAMA3_BOS))
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos[0]} $A", pair=f"{bos[0]}:0 $A:0 {bos[0]}:1 $B:1", special_tokens=[bos]
            ),
        ]
    )
    return backend


class Tokenizer:
    def __init__(
        self,
        encode,
        decode,
        vocab_size: int,
        bos_id: int | None,
        eos_id: int | None,
        files: list[Path],
        special_tokens: dict | None = None,
        control: dict[str, int] | None = None,
    ):
        """`decode(ids, skip_special)`; `special_tokens`: what a chat template calls them
        (bos_token, eos_token, ...); `control`: special tokens' text that `encode` reads as plain
        text (SentencePiece's <s>, </s>), mapped to their ids."""
        self._encode, self._decode = encode, decode
        self.vocab_size, self.bos_id, self.eos_id, self.files = vocab_size, bos_id, eos_id, files
        self.special_tokens = special_tokens or {}
        self._control = control or {}
        self._control_re = re.compile("(" + "|".join(map(re.escape, self._control)) + ")")

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not (text.isascii() or is_unicode(text)):
            raise TokenizerError(f"cannot tokenize {ascii(text[:40])}...: not valid Unicode")
        ids = list(self._encode(text))
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def encode_rendered(self, text: str) -> list[int]:
        """A rendered chat template's text, tokenized as `apply_chat_template` does: the special
        tokens the text spells (BOS, <|im_end|>, ...) become their ids, and nothing is added."""
        if not self._control:
            return list(self._encode(text))
        ids = []
        for piece in self._control_re.split(text):  # the separators are kept: odd pieces
            if piece in self._control:
                ids.append(self._control[piece])
            elif piece:
                ids += self._encode(piece)
        return ids

    def decode(self, ids: Sequence[int], special: bool = False) -> str:
        """The text of `ids`; with `special`, special tokens are spelled out rather than dropped."""
        ids = [int(i) for i in ids]
        if special:
            return self._decode(ids, False)
        return self._decode([i for i in ids if i not in (self.bos_id, self.eos_id)], True)

    @property
    def chat_template(self) -> str | None:
        """The chat template beside the tokenizer's files (`chat_template_of`), or None."""
        return chat_template_of(self.files[0].parent) if self.files else None

    def own_chat_template(self) -> str:
        """`chat_template`, or an error saying where it was looked for."""
        template = self.chat_template
        if template is None:
            where = self.files[0].parent if self.files else "the tokenizer"
            raise TokenizerError(
                f"{where}: no chat template (neither chat_template.jinja nor a chat_template in "
                "tokenizer_config.json); pass --chat-template FILE"
            )
        return template

    def render_chat(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = False,
        template: str | None = None,
    ) -> str:
        """What `apply_chat_template(messages, tokenize=False)` gives with the chat template
        (`template`, else the tokenizer's own). A template's own refusal (`raise_exception`, a
        Jinja error) is jinja2's TemplateError, for the caller to say where."""
        from transformers.utils.chat_template_utils import render_jinja_template

        template = template if template is not None else self.own_chat_template()
        conversations, _ = render_jinja_template(
            [list(messages)],
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )
        return conversations[0]

    def encode_chat(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = True,
        template: str | None = None,
    ) -> list[int]:
        """A conversation's token ids as `apply_chat_template(..., tokenize=True)` gives them:
        rendered with the chat template (`template`, else the tokenizer's own), the template
        writing any BOS and the tokenizer adding none; `add_generation_prompt` ends it with the
        assistant's header."""
        from jinja2 import TemplateError

        try:
            text = self.render_chat(messages, add_generation_prompt, template)
        except TemplateError as e:
            raise TokenizerError(f"the chat template refuses the conversation: {e}") from None
        return self.encode_rendered(text)

    @classmethod
    def from_sentencepiece(cls, path: Path) -> Tokenizer:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from None
        opt = lambda i: i if i >= 0 else None  # noqa: E731
        control = {sp.IdToPiece(i): i for i in range(sp.GetPieceSize()) if sp.IsControl(i)}
        names = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "unk_token": sp.unk_id()}
        return cls(
            sp.EncodeAsIds,
            functools.partial(_sentencepiece_decode, sp),
            sp.GetPieceSize(),
            opt(sp.bos_id()),
            opt(sp.eos_id()),
            [path],
            {name: sp.IdToPiece(i) for name, i in names.items() if i >= 0},
            control,
        )

    @classmethod
    def from_hf(cls, directory: Path) -> Tokenizer:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as e:  # transformers raises many types for files that are no tokenizer
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TokenizerError(f"{directory}: cannot load tokenizer ({why})") from None
        return cls(
            lambda s: tok.encode(s, add_special_tokens=False),
            lambda ids, skip: tok.decode(ids, skip_special_tokens=skip),
            len(tok),
            tok.bos_token_id,
            tok.eos_token_id,
            tokenizer_files(directory),
            dict(tok.special_tokens_map),
        )

    @classmethod
    def from_tiktoken(cls, path: Path) -> Tokenizer:
        """Llama 3's `tokenizer.model`; BOS <|begin_of_text|>, EOS <|end_of_text|>."""
        backend = llama3_backend(path)
        return cls(
            lambda s: backend.encode(s, add_special_tokens=False).ids,
            lambda ids, skip: backend.decode(ids, skip_special_tokens=skip),
            backend.get_vocab_size(),
            backend.token_to_id(LLAMA3_BOS),
            backend.token_to_id(LLAMA3_EOS),
            [path],
            {"bos_token": LLAMA3_BOS, "eos_token": LLAMA3_EOS},
        )


def _sentencepiece_decode(sp, ids: list[int], skip_special: bool) -> str:
    """SentencePiece drops control tokens (<s>, </s>) when it decodes; spelled out unless
    `skip_special`."""
    if skip_special:
        return sp.DecodeIds(ids)
    out, run = [], []
    for i in ids:
        if sp.IsControl(i):
            out += [sp.DecodeIds(run), sp.IdToPiece(i)]
            run = []
        else:
            run.append(i)
    return "".join(out) + sp.DecodeIds(run)


def chat_template_of(directory: str | Path) -> str | None:
    """The chat template a tokenizer directory carries, where transformers looks for it:
    `chat_template.jinja` (what transformers 5 saves), else `tokenizer_config.json`'s
    `chat_template` (text, or a list of named templates: the "default" one). None without one."""
    d = Path(directory)
    if (d / CHAT_TEMPLATE_FILE).is_file():
        return read_text(d / CHAT_TEMPLATE_FILE, SMALL_FILE, TokenizerError)
    f = d / "tokenizer_config.json"
    if not f.is_file():
        return None
    config = read_json(f, error=TokenizerError)
    if not isinstance(config, dict):
        raise TokenizerError(f"{f}: not a JSON object")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{f}: chat_template must be text, got {type(template).__name__}")
    return template


def load_tokenizer(path: str | Path) -> Tokenizer:
    """`path`: a SentencePiece or tiktoken `.model`, or a directory holding tokenizer files."""
    p = Path(path)
    if p.is_file():
        return Tokenizer.from_tiktoken(p) if is_tiktoken(p) else Tokenizer.from_sentencepiece(p)
    if (p / "tokenizer.json").exists():
        return Tokenizer.from_hf(p)
    if (p / "tokenizer.model").exists():
        return load_tokenizer(p / "tokenizer.model")
    raise TokenizerError(f"{p}: no tokenizer.model or tokenizer.json found")


_HF_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def tokenizer_from(files: list[Path]) -> Tokenizer | None:
    """The tokenizer a checkpoint's tokenizer files make (None without files)."""
    names = {f.name: f for f in files}
    if "tokenizer.json" in names:
        return load_tokenizer(names["tokenizer.json"].parent)
    # Else a SentencePiece or tiktoken model (what is not a Hugging Face config or template).
    models = [f for f in files if f.name not in _HF_SIDE_FILES and f.suffix != ".jinja"]
    return load_tokenizer(models[0]) if models else None
