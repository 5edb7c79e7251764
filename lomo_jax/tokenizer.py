"""One small interface over the two tokenizer kinds LLaMA checkpoints ship: a SentencePiece
`tokenizer.model`, or a Hugging Face `tokenizer.json` directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class TokenizerError(ValueError):
    pass


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
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{directory}: cannot load tokenizer ({e})") from None
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


def load_tokenizer(path: str | Path) -> Tokenizer:
    """`path`: a SentencePiece `.model`, or a directory holding tokenizer files."""
    p = Path(path)
    if p.is_file():
        return Tokenizer.from_sentencepiece(p)
    if (p / "tokenizer.json").exists():
        return Tokenizer.from_hf(p)
    if (p / "tokenizer.model").exists():
        return Tokenizer.from_sentencepiece(p / "tokenizer.model")
    raise TokenizerError(f"{p}: no tokenizer.model or tokenizer.json found")
