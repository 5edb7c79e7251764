"""Training rows from local files or Hugging Face dataset ids in the formats of `FORMATS`:
pre-tokenized rows, packed plain text, Alpaca instructions, SuperGLUE tasks rendered with their
evaluation prompts, prompt / response templates over any records, or conversations rendered with
the model's chat template (`lomo_jax.chat`). A format is a function from a `Source` (the files and
the options) to `Rows`; a new format is one entry of `FORMATS`.

Every format becomes the same four [N, T] int32 arrays: input_ids, labels (-100 = no loss),
segment_ids (0 = padding; packed documents get 1, 2, ...) and positions (restarting per
document), which is what `loss.Batch` carries. The records come from `lomo_jax.records`;
tokenized rows are cached (`cache_dir()`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lomo_jax import chat, packing
from lomo_jax.atomic import write_file
from lomo_jax.inputs import load_yaml, parse_json
from lomo_jax.loss import IGNORE, Batch
from lomo_jax.packing import Example, truncate
from lomo_jax.records import DataError, data_files, load_records, read_text
from lomo_jax.tasks import TaskError, examples_from_records
from lomo_jax.tokenizer import Tokenizer

log = logging.getLogger("lomo_jax")

MAX_WIDTH = 1000  # of a template's format spec ({instruction:>20})
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """How records become rows beyond their format (all of it part of the cache key)."""

    truncation_side: str = "right"  # or "left": drop the start of the prompt, keep the answer
    pack: bool = False  # several examples per row, best-fit decreasing
    train_on: str = "assistant"  # chat: every assistant turn, the "last" one, or "all" tokens
    chat_template: str | None = None  # a Jinja file; default: the tokenizer's own
    messages_field: str | None = None  # default: "messages", else "conversations"
    data_config: str | None = None  # of a Hugging Face dataset id

    def __post_init__(self):
        for name, choices in (("truncation_side", packing.SIDES), ("train_on", chat.TRAIN_ON)):
            if getattr(self, name) not in choices:
                raise DataError(f"{name} {getattr(self, name)!r}: choose from {', '.join(choices)}")

    @classmethod
    def of(cls, options) -> DataOptions:
        """The options an object (a TrainConfig, parsed flags) has, and not as None."""
        given = {f.name: getattr(options, f.name, None) for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in given.items() if v is not None})


@dataclasses.dataclass
class Rows:
    input_ids: np.ndarray
    labels: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    summary: str = ""  # what building them logged: truncation, padding

    def __len__(self) -> int:
        return len(self.input_ids)

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.input_ids, self.labels, self.segment_ids, self.positions

    def take(self, idx: np.ndarray) -> Rows:
        return Rows(*(a[idx] for a in self.arrays()))

    def batch(self) -> Batch:
        """The rows as the engine's batch (same field order), still in host memory."""
        return Batch(*self.arrays())


def read_pretokenized(path: str | Path, seq_len: int, vocab_size: int | None = None) -> np.ndarray:
    """Rows of exactly `seq_len` token ids from JSON lines {"input_ids": [...]}."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p}: a directory; --format pretokenized reads one JSON-lines file")
    top = vocab_size if vocab_size is not None else np.iinfo(np.int32).max + 1
    rows = []
    for n, line in enumerate(read_text(p).splitlines(), 1):
        if not line.strip():
            continue
        record = parse_json(line, p, DataError, line=n)
        try:
            ids = np.asarray(record["input_ids"])
        except (KeyError, TypeError, ValueError, OverflowError):
            raise DataError(f"{p}:{n}: expected a JSON object with 'input_ids'") from None
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise DataError(f"{p}:{n}: 'input_ids' must be a list of integer token ids")
        if len(ids) != seq_len:
            raise DataError(f"{p}:{n}: row has {len(ids)} tokens, --seq-len is {seq_len}")
        if ids.min() < 0 or ids.max() >= top:
            bad = int(ids.min() if ids.min() < 0 else ids.max())
            fit = f"the model's vocab_size {vocab_size}" if vocab_size is not None else "int32"
            raise DataError(f"{p}:{n}: token id {bad} does not fit {fit}")
        rows.append(ids)
    if not rows:
        raise DataError(f"{p}: no rows")
    return np.stack(rows).astype(np.int32)


def _require(
    records: list[dict], places: list[str], fmt: str, text: tuple[str, ...], optional=()
) -> None:
    """Every record has the `text` fields as strings (None = empty) and `optional` ones, if
    present, as strings too."""
    for r, place in zip(records, places):
        for field in text + optional:
            if field not in r and field not in optional:
                raise DataError(f"{place}: record has no field {field!r} (format {fmt})")
            if r.get(field) is not None and not isinstance(r[field], str):
                raise DataError(
                    f"{place}: field {field!r} must be text, got {type(r[field]).__name__} "
                    f"(format {fmt})"
                )


def _prompt_response(
    tok: Tokenizer, prompts: list[str], responses: list[str], seq_len: int, path, o: DataOptions
) -> Rows:
    """BOS + prompt + response + EOS; only the response (and EOS) carries loss, unless
    --train-on all."""
    examples, empty = [], 0
    for prompt, response in zip(prompts, responses):
        if not response.strip():
            empty += 1
            continue
        p = tok.encode(prompt, bos=True)
        r = tok.encode(response, bos=False, eos=True)
        labels = (p if o.train_on == "all" else [IGNORE] * len(p)) + r
        keep = int(tok.bos_id is not None)
        examples.append(truncate(Example(p + r, labels), seq_len, o.truncation_side, keep))
    return _rows(examples, seq_len, path, o, empty)


def _rows(examples: list[Example], seq_len: int, path, o: DataOptions, empty: int = 0) -> Rows:
    """The examples that keep a loss token, in rows (packed with --pack); the log says what
    truncation cost and how much of the rows is padding, packed and not."""
    usable = [ex for ex in examples if ex.loss_tokens]
    lengths = [len(ex.ids) for ex in usable]
    truncated = sum(ex.truncated for ex in examples)
    lost = sum(ex.lost > 0 for ex in usable)
    rows = {False: len(usable), True: packing.packed_rows(lengths, seq_len)}
    pad = {k: packing.padding_fraction(lengths, n, seq_len) for k, n in rows.items()}
    summary = (
        f"{path}: {rows[o.pack]} rows of {seq_len} tokens from {len(usable)} examples, "
        f"{truncated} truncated ({lost} of them lost loss tokens, {len(examples) - len(usable)} "
        f"kept none and are skipped), {empty} empty skipped; padding {pad[o.pack]:.1%} "
        f"({'unpacked' if o.pack else 'packed'}: {pad[not o.pack]:.1%} in {rows[not o.pack]} rows)"
    )
    log.info("%s", summary)
    if not usable:
        if not examples:
            raise DataError(f"{path}: no usable row ({empty} records with an empty response)")
        raise DataError(
            f"{path}: no usable row: truncation to --seq-len {seq_len} left no example a loss "
            "token; raise --seq-len"
            + (" or pass --truncation-side left" if o.truncation_side == "right" else "")
        )
    return Rows(*packing.to_rows(usable, seq_len, o.pack), summary=summary)


def _whole_documents(tok: Tokenizer, docs: list[str], seq_len: int, path, o: DataOptions) -> Rows:
    """Documents as BOS + text + EOS, each whole in a row (cut into rows when longer than one),
    packed best-fit decreasing."""
    pieces = [
        ids[k : k + seq_len]
        for ids in (tok.encode(d, bos=True, eos=True) for d in docs if d.strip())
        for k in range(0, len(ids), seq_len)
    ]
    empty = sum(not d.strip() for d in docs)
    return _rows([Example(ids, ids) for ids in pieces], seq_len, path, o, empty)


def _packed_text(tok: Tokenizer, docs: list[str], seq_len: int, path) -> Rows:
    """Documents as BOS + text + EOS, packed into rows; attention stays inside each document."""
    stream, seg_stream = [], []
    empty = 0
    for d, text in enumerate(docs, 1):
        if not text.strip():
            empty += 1
            continue
        ids = tok.encode(text, bos=True, eos=True)
        stream += ids
        seg_stream += [d] * len(ids)
    n = len(stream) // seq_len
    log.info(
        "%s: %d documents packed into %d rows of %d, %d empty skipped",
        path,
        len(docs) - empty,
        n,
        seq_len,
        empty,
    )
    if n == 0:
        raise DataError(f"{path}: no usable row (fewer than {seq_len} tokens)")
    ids = np.asarray(stream[: n * seq_len], np.int32).reshape(n, seq_len)
    seg_raw = np.asarray(seg_stream[: n * seq_len], np.int32).reshape(n, seq_len)
    # Renumber segments 1, 2, ... within each row; positions restart at each document start.
    starts = np.ones_like(seg_raw, bool)
    starts[:, 1:] = seg_raw[:, 1:] != seg_raw[:, :-1]
    seg = np.cumsum(starts, axis=1).astype(np.int32)
    idx = np.arange(seq_len)[None, :].repeat(n, 0)
    start_idx = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    pos = (idx - start_idx).astype(np.int32)
    labels = np.where(starts, IGNORE, ids).astype(np.int32)  # no prediction across documents
    return Rows(ids, labels, seg, pos)


def _template(path: str | Path) -> tuple[str, str]:
    """A YAML file with `prompt` and `response`: format strings over each record's fields (a
    format spec's widths bounded, so a template cannot ask for gigabytes of padding)."""
    import string

    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: template file not found")
    t = load_yaml(p, DataError)
    if not isinstance(t, dict) or not {"prompt", "response"} <= set(t):
        raise DataError(f"{p}: a template needs 'prompt' and 'response' entries")
    for key in ("prompt", "response"):
        if not isinstance(t[key], str):
            raise DataError(f"{p}: {key} must be text, got {type(t[key]).__name__}")
        try:
            parts = [
                (f, spec) for _, f, spec, _ in string.Formatter().parse(t[key]) if f is not None
            ]
        except ValueError as e:
            raise DataError(f"{p}: {key}: {e} (write {{{{ and }}}} for literal braces)") from None
        if any(f == "" or f.isdigit() for f, _ in parts):
            raise DataError(f"{p}: {key}: every {{}} needs a field name, e.g. {{instruction}}")
        for f, spec in parts:
            if "{" in spec or any(int(n) > MAX_WIDTH for n in re.findall(r"\d+", spec)):
                raise DataError(
                    f"{p}: {key}: {{{f}:{spec}}}: a format spec takes no fields and widths "
                    f"up to {MAX_WIDTH}"
                )
    return t["prompt"], t["response"]


def _fill(template: str, records: list[dict], places: list[str], path) -> list[str]:
    out = []
    for r, place in zip(records, places):
        try:
            out.append(template.format(**r))
        except KeyError as e:
            raise DataError(
                f"{place}: record has no field {e.args[0]!r} that {path} uses"
            ) from None
        except (AttributeError, IndexError, TypeError, ValueError) as e:
            raise DataError(f"{place}: cannot fill in {path}: {e}") from None
        except RecursionError:
            raise DataError(f"{place}: cannot fill in {path}: a field nested too deeply") from None
    return out


def _cache_key(src: Source) -> str:
    """The rows' identity: the format and its options, and every input file's path, size and
    mtime (the data, the tokenizer's, a template's)."""
    tok, o = src.tokenizer, src.options
    chat_template = _renderer(src).template if src.fmt == "chat" else None
    h = hashlib.sha256(
        json.dumps([src.fmt, src.seq_len, src.task, dataclasses.astuple(o), chat_template]).encode()
    )
    template = src.template
    extra = [Path(template)] if template and Path(template).is_file() else []
    for f in data_files(Path(src.path)) + (tok.files if tok else []) + extra:
        st = f.stat()  # a file name's bytes as they are, UTF-8 or not
        h.update(os.fsencode(f.resolve()) + f"|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def cache_dir() -> Path:
    """LOMO_JAX_CACHE, or ~/.cache/lomo_jax when it is unset or empty (as XDG's variables)."""
    return Path(os.environ.get("LOMO_JAX_CACHE") or Path.home() / ".cache" / "lomo_jax")


def _read_cache(f: Path, seq_len: int) -> Rows | None:
    """Cached rows, or None when there are none or they are damaged (then they are rebuilt:
    the zip members' CRCs catch a flipped byte)."""
    if not f.exists():
        return None
    try:
        with np.load(f) as z:
            names = [field.name for field in dataclasses.fields(Rows)]
            rows = Rows(*(z[name] for name in names[:-1]), summary=str(z[names[-1]]))
        shapes = {(a.shape, a.dtype) for a in rows.arrays()}
        if shapes != {((len(rows), seq_len), np.dtype(np.int32))} or not len(rows):
            raise ValueError("unexpected shapes")
        if not _plausible(rows, seq_len):
            raise ValueError("values no tokenizer gives")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.warning("%s: damaged cache file (%s); tokenizing again", f, e)
        return None
    return rows


def _plausible(rows: Rows, seq_len: int) -> bool:
    """Values tokenized rows can hold: ids >= 0, labels an id or IGNORE, segments >= 0 and
    positions within the row (the model's vocabulary is checked by `build_rows`)."""
    labels = rows.labels
    return bool(
        rows.input_ids.min() >= 0
        and ((labels >= 0) | (labels == IGNORE)).all()
        and rows.segment_ids.min() >= 0
        and rows.positions.min() >= 0
        and rows.positions.max() < seq_len
    )


def _write_cache(f: Path, rows: Rows) -> None:
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **dataclasses.asdict(rows))
        write_file(f, buffer.getvalue())
    except OSError as e:
        log.warning("%s: cannot write the cache (%s); going on without it", f, e.strerror or e)


@dataclasses.dataclass(frozen=True)
class Source:
    """What a format reads (`path`) and what shapes its rows: the tokenizer, the row length,
    and the options some formats take."""

    fmt: str  # the format's name, for messages
    path: str | Path  # as given: messages name it so
    tokenizer: Tokenizer | None
    seq_len: int
    task: str | None = None  # superglue
    template: str | None = None  # template: the YAML file
    vocab_size: int | None = None  # pretokenized: every id checked as it is read
    options: DataOptions = DataOptions()

    def needed_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise DataError(
                f"{self.path}: format {self.fmt} needs a tokenizer (the checkpoint has none; "
                f"pass --tokenizer)"
            )
        return self.tokenizer


def _pretokenized(src: Source) -> Rows:
    ids = read_pretokenized(src.path, src.seq_len, src.vocab_size)
    pos = np.broadcast_to(np.arange(src.seq_len, dtype=np.int32), ids.shape).copy()
    return Rows(ids, ids.copy(), np.ones_like(ids), pos)


def _records(src: Source) -> tuple[list[dict], list[str]]:
    return load_records(src.path, src.options.data_config)


def _text(src: Source) -> Rows:
    records, places = _records(src)  # the file's own problems are reported first
    _require(records, places, src.fmt, ("text",))
    docs = [r["text"] or "" for r in records]
    if src.options.pack:
        return _whole_documents(src.needed_tokenizer(), docs, src.seq_len, src.path, src.options)
    return _packed_text(src.needed_tokenizer(), docs, src.seq_len, src.path)


def _alpaca(src: Source) -> Rows:
    records, places = _records(src)
    _require(records, places, src.fmt, ("instruction", "output"), optional=("input",))
    tok = src.needed_tokenizer()
    prompts = [
        (ALPACA_WITH_INPUT if r.get("input") else ALPACA_NO_INPUT).format(
            **{"instruction": r["instruction"] or "", "input": r.get("input") or ""}
        )
        for r in records
    ]
    responses = [r["output"] or "" for r in records]
    return _prompt_response(tok, prompts, responses, src.seq_len, src.path, src.options)


def _templated(src: Source) -> Rows:
    records, places = _records(src)
    if src.template is None:
        raise DataError("format template needs --template FILE")
    prompt, response = _template(src.template)
    prompts = _fill(prompt, records, places, src.template)
    responses = _fill(response, records, places, src.template)
    tok = src.needed_tokenizer()
    return _prompt_response(tok, prompts, responses, src.seq_len, src.path, src.options)


def _superglue(src: Source) -> Rows:
    records, places = _records(src)
    if src.task is None:
        raise DataError("format superglue needs --task")
    try:
        examples = examples_from_records(src.task, records, src.path, places)
    except TaskError as e:
        raise DataError(str(e)) from None
    tok = src.needed_tokenizer()
    prompts = [ex.context for ex in examples]
    answers = [ex.candidates[ex.label] for ex in examples]
    return _prompt_response(tok, prompts, answers, src.seq_len, src.path, src.options)


def _renderer(src: Source) -> chat.Renderer:
    """The chat template (--chat-template, else the tokenizer's own) with the tokenizer."""
    tok = src.needed_tokenizer()
    return chat.Renderer(tok, *chat.template_for(tok, src.options.chat_template))


def _chat(src: Source) -> Rows:
    records, places = _records(src)
    o = src.options
    renderer = _renderer(src)
    examples = chat.examples(
        records, places, renderer, src.seq_len, o.train_on, o.truncation_side, o.messages_field
    )
    return _rows(examples, src.seq_len, src.path, o)


@dataclasses.dataclass(frozen=True)
class Format:
    build: Callable[[Source], Rows]
    cached: bool = True  # its tokenized rows are kept in `cache_dir()` for the next run


# The formats `--format` takes; a new one is one entry.
FORMATS: dict[str, Format] = {
    "pretokenized": Format(_pretokenized, cached=False),  # nothing to tokenize
    "text": Format(_text),
    "alpaca": Format(_alpaca),
    "superglue": Format(_superglue),
    "template": Format(_templated),
    "chat": Format(_chat),
}


def build_rows(
    fmt: str,
    path: str | Path,
    tok: Tokenizer | None,
    seq_len: int,
    task: str | None = None,
    template: str | None = None,
    vocab_size: int | None = None,
    options: DataOptions = DataOptions(),
) -> Rows:
    """Tokenized rows, cached by file identity (path, size, mtime), format, options and
    tokenizer, so a second run over the same data starts at once; with `vocab_size`, every id is
    checked to fit."""
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    src = Source(fmt, path, tok, seq_len, task, template, vocab_size, options)
    if not FORMATS[fmt].cached or not Path(path).exists():
        rows = FORMATS[fmt].build(src)
    else:
        cached = cache_dir() / f"rows-{_cache_key(src)}.npz"
        rows = _read_cache(cached, seq_len)
        if rows is not None:
            log.info("%s: %d tokenized rows from the cache %s", path, len(rows), cached)
            if rows.summary:
                log.info("%s", rows.summary)
        else:
            rows = FORMATS[fmt].build(src)
            _write_cache(cached, rows)
    low, high = int(rows.input_ids.min()), int(rows.input_ids.max())
    if vocab_size is not None and not (low >= 0 and high < vocab_size):
        raise DataError(
            f"{path}: token id {low if low < 0 else high} does not fit the model's vocab_size "
            f"{vocab_size} (wrong tokenizer?)"
        )
    return rows


def check_seq_len(seq_len: int, cfg, model: str | Path) -> None:
    """Rows no longer than the positions the model was trained for."""
    if seq_len > cfg.max_position_embeddings:
        raise DataError(
            f"{model}: --seq-len {seq_len} is beyond the model's context "
            f"(max_position_embeddings {cfg.max_position_embeddings})"
        )


def check_tokenizer(tok: Tokenizer | None, vocab_size: int) -> None:
    if tok is not None and tok.vocab_size > vocab_size:
        raise DataError(
            f"{tok.files[0] if tok.files else 'tokenizer'}: {tok.vocab_size} tokens "
            f"do not fit the model's vocab_size {vocab_size} (wrong tokenizer?)"
        )
