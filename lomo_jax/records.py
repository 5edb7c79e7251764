"""Records from local data files (JSON, JSON lines, CSV, Parquet, or the lines of text files) or
from a Hugging Face dataset id (`org/name[:split]`, read through `datasets.load_dataset` from its
cache, offline as model ids are), each with the place it came from (file:line, or its record / row
number) for error messages.

What the records become is another module's: training rows (`lomo_jax.data`), a task's examples
(`lomo_jax.tasks`).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from lomo_jax import inputs
from lomo_jax.errors import UserError, first_line
from lomo_jax.hub import REPO_ID
from lomo_jax.inputs import is_unicode, parse_json, regular_file

SUFFIXES = (".json", ".jsonl", ".txt", ".csv", ".parquet")
_DATASET_ID = re.compile(rf"({REPO_ID.pattern})(?::(.+))?")  # a split may be a slice: train[:10%]


class DataError(UserError, ValueError):
    """Data files or records that cannot become training rows (the message names where)."""


def read_text(f: Path) -> str:
    """A regular file's UTF-8 text; otherwise an error naming the line of the first bad byte."""
    return inputs.read_text(f, error=DataError)


def data_files(path: Path) -> list[Path]:
    """`path` itself, or the data files of a directory, in name order; each a regular file (a
    pipe or a device would block, or never end)."""
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix in SUFFIXES)
        if not files:
            raise DataError(f"{path}: no {'/'.join(SUFFIXES)} files")
        return [regular_file(f, DataError) for f in files]
    return [regular_file(path, DataError)]


def _json_records(f: Path) -> tuple[list, list[str]]:
    """A .json file's array or object (else JSON lines), a .jsonl file's lines; each record with
    its place (file:line, or its number in an array) for error messages."""
    text = read_text(f)
    if f.suffix == ".json" and text.lstrip()[:1] in ("[", "{"):
        try:
            whole = parse_json(text, f, DataError)
        except DataError:
            if text.lstrip()[:1] == "[":
                raise
        else:
            records = whole if isinstance(whole, list) else [whole]
            return records, [f"{f}: record {n}" for n in range(1, len(records) + 1)]
    records, places = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            records.append(parse_json(line, f, DataError, line=n))
            places.append(f"{f}:{n}")
    return records, places


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """`datasets` without its progress bars or its log for the block (the log repeats a reading
    error in lines of its own), as the caller had them afterwards."""
    import datasets

    shown = datasets.is_progress_bar_enabled()
    logger = logging.getLogger("datasets")
    level = logger.level
    datasets.disable_progress_bars()
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)
        if shown:
            datasets.enable_progress_bars()


def _table_records(f: Path) -> tuple[list, list[str]]:
    """A CSV, Parquet or text file's rows through `datasets` ({"text": line} for text)."""
    import datasets

    kind = {".txt": "text"}.get(f.suffix, f.suffix.lstrip("."))
    try:
        with _quiet_datasets():
            got = datasets.load_dataset(kind, data_files=str(f), split="train").to_list()
    except Exception as e:  # datasets raises many types for malformed files
        while e.__cause__ is not None:  # the parser's own error says what is wrong
            e = e.__cause__
        raise DataError(f"{f}: cannot read as {kind}: {first_line(e)}") from None
    return got, [f"{f}:{n}" if kind == "text" else f"{f}: row {n}" for n in range(1, len(got) + 1)]


def is_dataset_id(ref: str | Path) -> bool:
    """`org/name` or `org/name:split` that is no local path."""
    return not Path(ref).exists() and _DATASET_ID.fullmatch(str(ref)) is not None


def _dataset_records(ref: str, config: str | None = None) -> tuple[list[dict], list[str]]:
    """The records of a dataset split (default `train`) and where each one is (`ref: row n`)."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    repo, split = _DATASET_ID.fullmatch(ref).groups()
    split = split or "train"
    try:
        with _quiet_datasets():
            ds = datasets.load_dataset(repo, config, split=split)
    except (ConnectionError, DatasetNotFoundError, FileNotFoundError) as e:
        raise DataError(
            f"{ref}: no such file, and not a dataset in the Hugging Face datasets cache "
            f"({datasets.config.HF_DATASETS_CACHE}) ({first_line(e)})"
        ) from None
    except ValueError as e:  # an unknown split or configuration: the lines name the known ones
        raise DataError(f"{ref}: {' '.join(str(e).split())}") from None
    places = [f"{repo}:{split}: row {n}" for n in range(1, len(ds) + 1)]
    return ds.to_list(), places


def load_records(path: str | Path, config: str | None = None) -> tuple[list[dict], list[str]]:
    """Records of JSON / JSON lines / CSV / Parquet files, or {"text": line} of text files, with
    where each one is (file:line, or the record / row number) for error messages; or of a
    Hugging Face dataset id (`org/name[:split]`, its configuration `config`) that is no local
    path."""
    if is_dataset_id(path):
        return _dataset_records(str(path), config)
    records, places = [], []
    for f in data_files(Path(path)):
        got, where = _json_records(f) if f.suffix in (".json", ".jsonl") else _table_records(f)
        for r, place in zip(got, where):
            if not isinstance(r, dict):
                raise DataError(f"{place}: expected an object of fields, got {type(r).__name__}")
            for field, value in r.items():
                if isinstance(value, str) and not (value.isascii() or is_unicode(value)):
                    raise DataError(
                        f"{place}: field {field!r} is not valid Unicode (a lone surrogate)"
                    )
        records += got
        places += where
    return records, places
