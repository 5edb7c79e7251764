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
from lomo_jax.inputs import is_unicode


class TokenizerError(UserError, ValueError):
    """A tokenizer file that cannot be read, or a tokenizer missing where one is needed."""


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
    ):
        self._encode, self._decode = encode, decode
        self.vocab_size, self.bos_id, self.eos_id, self.files = vocab_size, bos_id, eos_id, files

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not (text.isascii() or is_unicode(text)):
            raise TokenizerError(f"cannot tokenize {ascii(text[:40])}...: not valid Unicode")
        ids = list(self._encode(text))
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode([int(i) for i in ids if i not in (self.bos_id, self.eos_id)])

    @classmethod
    def from_sentencepiece(cls, path: Path) -> Tokenizer:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from None
        opt = lambda i: i if i >= 0 else None  # noqa: E731
        return cls(
            sp.EncodeAsIds,
            sp.DecodeIds,
            sp.GetPieceSize(),
            opt(sp.bos_id()),
            opt(sp.eos_id()),
            [path],
        )

    @classmethod
    def from_hf(cls, directory: Path) -> Tokenizer:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as e:  # transformers raises many types for files that are no tokenizer
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TokenizerError(f"{directory}: cannot load tokenizer ({why})") from None
        files = [
            p for p in directory.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))
        ]
        return cls(
            lambda s: tok.encode(s, add_special_tokens=False),
            lambda ids: tok.decode(ids, skip_special_tokens=True),
            len(tok),
            tok.bos_token_id,
            tok.eos_token_id,
            files,
        )

    @classmethod
    def from_tiktoken(cls, path: Path) -> Tokenizer:
        """Llama 3's `tokenizer.model`; BOS <|begin_of_text|>, EOS <|end_of_text|>."""
        backend = llama3_backend(path)
        return cls(
            lambda s: backend.encode(s, add_special_tokens=False).ids,
            lambda ids: backend.decode(ids, skip_special_tokens=True),
            backend.get_vocab_size(),
            backend.token_to_id(LLAMA3_BOS),
            backend.token_to_id(LLAMA3_EOS),
            [path],
        )


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


def tokenizer_from(files: list[Path]) -> Tokenizer | None:
    """The tokenizer a checkpoint's tokenizer files make (None without files)."""
    names = {f.name: f for f in files}
    if "tokenizer.json" in names:
        return load_tokenizer(names["tokenizer.json"].parent)
    if files:
        return load_tokenizer(names.get("tokenizer.model", files[0]))
    return None
