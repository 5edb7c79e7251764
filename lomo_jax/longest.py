"""The longest sequence a training step fits on a target (`lomo-jax plan --max-seq-len`): a search
over lengths that are multiples of 1024, each length one compiled plan (lomo_jax.memory).

A plan's peak grows with the length nearly along a line (the saved layer inputs, the per-layer
working set), so the search extrapolates along the line through the lengths it has compiled, then
closes the bracket by regula falsi (bisecting when one side keeps moving): a handful of compiles
instead of a doubling and a bisection's dozen. It assumes what holds for these steps: a longer
sequence never needs less memory.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import jax.numpy as jnp

from lomo_jax.config import LlamaConfig
from lomo_jax.memory import MAX_TOKENS, device_memory, plan

log = logging.getLogger("lomo_jax")

STEP = 1024


@dataclasses.dataclass
class Search:
    longest: int  # the longest length that fits (0: not even `step`)
    peaks: dict[int, int]  # every length compiled -> its peak bytes


def search(peak_at: Callable[[int], int], budget: int, limit: int, step: int = STEP) -> Search:
    """The longest multiple of `step` up to `limit` whose `peak_at(length)` is within `budget`."""
    peaks: dict[int, int] = {}  # in units of `step`

    def fits(n: int) -> bool:
        if n not in peaks:
            peaks[n] = peak_at(n * step)
        return peaks[n] <= budget

    top = limit // step
    if top < 1 or not fits(1):
        return Search(0, _lengths(peaks, step))
    lo, hi, sides = 1, None, ""  # lo fits, hi does not (None: no length failed yet)
    while lo < top if hi is None else hi - lo > 1:
        if hi is None:  # along the line through the two longest lengths compiled
            a, b = sorted(peaks)[-2:] if len(peaks) > 1 else (lo, lo)
            n = _crossing(peaks, a, b, budget, default=2 * lo)
        elif sides[-2:] in ("ll", "hh"):  # one side moved twice: halve the bracket instead
            n = (lo + hi) // 2
        else:
            n = _crossing(peaks, lo, hi, budget, default=(lo + hi) // 2)
        n = min(n, top if hi is None else hi - 1)
        n = max(n, lo + 1)
        if fits(n):
            lo, sides = n, sides + "l"
        else:
            hi, sides = n, sides + "h"
    return Search(lo * step, _lengths(peaks, step))


def _crossing(peaks: dict[int, int], a: int, b: int, budget: int, default: int) -> int:
    """Where the line through (a, peak a) and (b, peak b) reaches `budget`, rounded down."""
    if b <= a or peaks[b] <= peaks[a]:
        return default
    slope = (peaks[b] - peaks[a]) / (b - a)
    return a + int((budget - peaks[a]) // slope)


def _lengths(peaks: dict[int, int], step: int) -> dict[int, int]:
    return {n * step: p for n, p in sorted(peaks.items())}


def max_seq_len(
    cfg: LlamaConfig, method: str, batch_size: int, limit: int | None = None, **on
) -> dict:
    """`memory.plan` of the longest sequence (a multiple of STEP, at most `limit`, by default the
    model's context, and at most memory.MAX_TOKENS a step; a limit below STEP is the only length)
    that fits one device of the target, plus "max_seq_len" (0 when not even the shortest fits:
    then the plan is the shortest's), "limit" and "peaks" (every length compiled -> its peak).
    `on`: `memory.plan`'s dtype, target, devices, offload and mesh (by default bfloat16, this
    CPU)."""
    on = {"dtype": jnp.bfloat16, **on}
    rows: dict[int, dict] = {}

    def peak_at(length: int) -> int:
        rows[length] = plan(cfg, method, batch_size, length, **on)
        log.info("%d tokens: peak %.2f GiB", length, rows[length]["peak_bytes"] / 2**30)
        return rows[length]["peak_bytes"]

    limit = min(limit or cfg.max_position_embeddings, MAX_TOKENS // batch_size)  # int32 tokens
    budget = device_memory(on.get("target", "cpu"), on.get("devices", 1))
    found = search(peak_at, budget, limit, min(STEP, limit))
    row = rows[found.longest or min(rows)]
    return {**row, "max_seq_len": found.longest, "limit": limit, "peaks": found.peaks}
