"""Small byte-level BPE tokenizers built here (no Hub), holding the special tokens of the Llama 3
and Qwen chat templates, pre-tokenized as those models are: what transformers'
`apply_chat_template` is run on to give the reference ids and assistant masks."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend
from transformers import PreTrainedTokenizerFast

# Llama 3's and Qwen2's pre-tokenizer split (transformers' converters write this pattern).
SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
FAMILIES = {
    "llama3": dict(
        special=[
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        added=[],
        names=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
    ),
    "qwen": dict(  # Qwen2.5 and Qwen3: no BOS; <think> tokens are added, not special
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        added=["<think>", "</think>"],
        names=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
    ),
}
TEMPLATE_FAMILY = {"llama3": "llama3", "qwen2_5": "qwen", "qwen3": "qwen"}


def build(family: str, texts: Iterable[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    f = FAMILIES[family]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=f["special"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **f["names"])
    tok.add_tokens(f["added"])
    return tok
