"""`lomo-jax plan --max-seq-len`: the search against every length, and the command against plans
of the lengths around its answer."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from lomo_jax import longest
from lomo_jax.cli import main
from lomo_jax.longest import search
from lomo_jax.memory import plan
from tests.conftest import CONFIGS


def _peaks(rng):
    """Peak-of-length functions of the shapes plans take: a line, a line with a jump (a loop
    that starts chunking), a parabola (dense attention), a concave curve."""
    a, b = rng.uniform(1e9, 2e10), rng.uniform(1e4, 1e6)
    c, jump, at = rng.uniform(0, 0.03), rng.uniform(0, 5e9), rng.integers(1, 200_000)
    return [
        lambda n: int(a + b * n),
        lambda n: int(a + b * n + (jump if n > at else 0)),
        lambda n: int(a + b * n + c * n * n),
        lambda n: int(a + 150 * b * math.sqrt(n)),
    ]


@pytest.mark.parametrize("seed", range(4))
def test_search_finds_the_longest_length_that_fits(seed):
    rng = np.random.default_rng(seed)
    for _ in range(50):
        for peak_at in _peaks(rng):
            budget = rng.uniform(1e9, 8e10)
            limit = int(rng.choice([1024, 5000, 8192, 131072, 1 << 20]))
            found = search(peak_at, budget, limit)
            every = [n for n in range(1024, limit + 1, 1024) if peak_at(n) <= budget]
            assert found.longest == max(every, default=0)
            assert found.peaks == {n: peak_at(n) for n in found.peaks}


def test_search_compiles_a_handful_of_lengths_on_a_line():
    """A plan's peak is nearly a line in the length: the search extrapolates along it."""
    rng = np.random.default_rng(7)
    for _ in range(100):
        a, b = rng.uniform(1e9, 2e10), rng.uniform(1e4, 1e6)
        line = lambda n, a=a, b=b: int(a + b * n)  # noqa: E731
        found = search(line, rng.uniform(2e10, 8e10), 1 << 20)
        assert len(found.peaks) <= 4, found.peaks


def test_max_seq_len_command_against_plans_around_its_answer(tmp_path, monkeypatch, capsys):
    """Lengths in steps of 64 (1024 in use) for a tiny model, on a device that holds more than
    192 tokens' plan and less than 256 tokens': the command finds 192."""
    cfg = CONFIGS["gqa"]
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    monkeypatch.setattr(longest, "STEP", 64)
    peaks = {t: plan(cfg, "fused-lomo", 2, t, jnp.float32)["peak_bytes"] for t in (192, 256)}
    budget = (peaks[192] + peaks[256]) // 2
    monkeypatch.setattr(longest, "device_memory", lambda target, devices: budget)
    args = ["plan", "--model", str(tmp_path), "--optimizer", "lomo", "--dtype", "float32"]
    assert main([*args, "--batch-size", "2", "--max-seq-len", "512", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert (row["max_seq_len"], row["seq_len"], row["limit"]) == (192, 192, 512)
    assert row["peak_bytes"] == peaks[192] and row["peaks"]["256"] == peaks[256]
    assert main([*args, "--batch-size", "2", "--max-seq-len", "64"]) == 0  # one length to try
    out = capsys.readouterr().out
    assert "the longest sequence that fits: 64 tokens (the search's limit)" in out
