"""Examples into rows of `seq_len` tokens: truncation (the end, or the start keeping BOS), then
one example per padded row, or several per row, packed best-fit decreasing.

In a packed row each example is its own segment (ids 1, 2, ...; 0 is padding), so attention stays
inside it, its positions start again at 0, and its first token is nobody's target: a step on
packed rows computes the loss and gradients of the same examples unpacked.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence

import numpy as np

from lomo_jax.loss import IGNORE

SIDES = ("right", "left")


@dataclasses.dataclass
class Example:
    """Token ids and their labels (IGNORE: no loss), and the loss tokens truncation removed."""

    ids: list[int]
    labels: list[int]
    truncated: bool = False
    lost: int = 0

    @property
    def loss_tokens(self) -> int:
        """Labels that are some position's target (the first token never is)."""
        return sum(t != IGNORE for t in self.labels[1:])


def truncate(ex: Example, seq_len: int, side: str = "right", keep: int = 0) -> Example:
    """`ex` cut to `seq_len` tokens: its end dropped, or (`left`) its start after the first
    `keep` tokens (a BOS), so the answer stays."""
    if len(ex.ids) <= seq_len:
        return ex
    if side == "right":
        cut = slice(0, seq_len)
        ids, labels = ex.ids[cut], ex.labels[cut]
    else:
        tail = seq_len - keep
        ids = ex.ids[:keep] + ex.ids[len(ex.ids) - tail :]
        labels = ex.labels[:keep] + ex.labels[len(ex.labels) - tail :]
    out = Example(ids, labels, truncated=True)
    out.lost = ex.lost + ex.loss_tokens - out.loss_tokens
    return out


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each bin's lengths summing to at most `capacity`: the items, longest
    first, each go into the fullest bin that still has room, else into a new bin."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            bins.append([i])
            room, b = capacity - lengths[i], len(bins) - 1
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def padding_fraction(lengths: Sequence[int], n_rows: int, seq_len: int) -> float:
    return 1.0 - sum(lengths) / max(1, n_rows * seq_len)


def packed_rows(lengths: Sequence[int], seq_len: int) -> int:
    """How many rows packing makes of examples of these lengths."""
    return len(best_fit_decreasing(lengths, seq_len))


def to_rows(
    examples: Sequence[Example], seq_len: int, pack: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, labels, segment_ids, positions), each [rows, seq_len] int32; every example
    must fit a row."""
    lengths = [len(ex.ids) for ex in examples]
    groups = best_fit_decreasing(lengths, seq_len) if pack else [[i] for i in range(len(lengths))]
    n = len(groups)
    ids = np.zeros((n, seq_len), np.int32)
    labels = np.full((n, seq_len), IGNORE, np.int32)
    seg = np.zeros((n, seq_len), np.int32)
    pos = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy()
    for r, group in enumerate(groups):
        at = 0
        for s, i in enumerate(group, 1):
            ex, end = examples[i], at + lengths[i]
            ids[r, at:end], labels[r, at:end], seg[r, at:end] = ex.ids, ex.labels, s
            labels[r, at] = IGNORE  # no prediction across examples
            pos[r, at:end] = np.arange(lengths[i])
            at = end
    return ids, labels, seg, pos
