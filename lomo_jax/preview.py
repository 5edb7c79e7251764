"""What training sees (`lomo-jax data`): each row's tokens with its loss mask, readable on a
terminal, or one JSON object per row in the Hugging Face convention."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

import numpy as np

from lomo_jax.data import Rows
from lomo_jax.loss import IGNORE
from lomo_jax.tokenizer import Tokenizer

LOSS_ON, LOSS_OFF = "\x1b[1;32m", "\x1b[0m"  # bold green on a terminal
MARK_ON, MARK_OFF = "«", "»"  # elsewhere


def row_json(rows: Rows, r: int, packed: bool = False) -> dict:
    """`input_ids` and `labels` aligned with them (-100: no loss; the shift to the next token is
    the loss's), padding left out; packed rows add `position_ids`, which restart per example."""
    keep = rows.segment_ids[r] != 0
    out = {"input_ids": rows.input_ids[r, keep].tolist(), "labels": rows.labels[r, keep].tolist()}
    if packed:
        out["position_ids"] = rows.positions[r, keep].tolist()
    return out


def _spans(tok: Tokenizer, ids: list[int], loss: list[bool]) -> Iterator[tuple[str, bool]]:
    """(text, in the loss) of each run of tokens with the same mask, special tokens spelled out.
    Each run's text is its share of the decoded prefix: decoded alone, a run would lose the
    space that SentencePiece strips from the start of a text."""
    done, start = "", 0
    for flag, run in itertools.groupby(loss):
        end = start + len(list(run))
        text = tok.decode(ids[:end], special=True)
        alone = text[len(done) :] if text.startswith(done) else tok.decode(ids[start:end], True)
        yield alone, flag
        done, start = text, end


def show_row(tok: Tokenizer, rows: Rows, r: int, color: bool) -> str:
    """A header line, then each example of the row with its loss tokens highlighted."""
    seg = rows.segment_ids[r]
    n = int(seg.max())
    loss = rows.labels[r] != IGNORE
    head = (
        f"── row {r + 1}/{len(rows)}: {n} example{'s' if n != 1 else ''}, "
        f"{int((seg != 0).sum())} tokens ({int(loss.sum())} in the loss), "
        f"{int((seg == 0).sum())} padding"
    )
    on, off = (LOSS_ON, LOSS_OFF) if color else (MARK_ON, MARK_OFF)
    parts = [head]
    for s in range(1, n + 1):
        idx = np.flatnonzero(seg == s)
        if n > 1:
            parts.append(f"── example {s}")
        text = "".join(
            on + t + off if flag else t
            for t, flag in _spans(tok, rows.input_ids[r, idx].tolist(), loss[idx].tolist())
        )
        parts.append(text)
    return "\n".join(parts)


def legend(color: bool) -> str:
    return (
        f"{LOSS_ON}tokens in the loss{LOSS_OFF} are bold green"
        if color
        else f"tokens in the loss are {MARK_ON}marked{MARK_OFF}"
    )


def lines(tok: Tokenizer, rows: Rows, as_json: bool, packed: bool, color: bool) -> Iterator[str]:
    """What `lomo-jax data` prints, a row at a time."""
    if as_json:
        for r in range(len(rows)):
            yield json.dumps(row_json(rows, r, packed))
        return
    yield legend(color)
    for r in range(len(rows)):
        yield show_row(tok, rows, r, color)
