"""One exception type whose message is the one line a user sees: the file, then the problem."""

from __future__ import annotations

from pathlib import Path

from lomo_jax.errors import UserError


class ConversionError(UserError):
    def __init__(self, path: str | Path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")
