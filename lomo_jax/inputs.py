"""Reading what a user hands in, within bounds: every problem is one line naming the file (and
the line), never a traceback, a hang or memory without end.

Python's parsers leave some of that to their callers: `json` and PyYAML recurse once per level of
nesting (RecursionError), `int()` refuses numbers longer than 4300 digits, PyYAML's anchors and
aliases let a few lines stand for a structure too large to print, its mappings take the last of
duplicate keys silently, and opening a named pipe or a device blocks or never ends. Here: a file
must be a regular one; small files (configs, templates, metadata) have a size limit; text must be
UTF-8; YAML has no aliases, no duplicate keys and at most `MAX_DEPTH` levels.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from lomo_jax.errors import UserError

MAX_DEPTH = 64  # of a YAML document (JSON's is what Python's parser recurses, about 1000)
SMALL_FILE = 16 * 2**20  # bytes of a JSON config or checkpoint metadata file, at most
YAML_FILE = 2**20  # bytes of a YAML config or template (PyYAML reads about 1 MB/s), at most
_KINDS = {
    stat.S_ISFIFO: "a named pipe",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISSOCK: "a socket",
}


class InputError(UserError, ValueError):
    """A file or value that cannot be read as what it should be; the message is the one line."""


def regular_file(path: str | Path, error: type[Exception] = InputError) -> Path:
    """PATH, if it is a regular file (or a link to one): a pipe or a device is refused, not read
    (it would block, or never end)."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise error(f"{p}: file not found") from None
    if stat.S_ISDIR(mode):
        raise error(f"{p}: a directory, not a file")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS.items() if test(mode)), "a special file")
        raise error(f"{p}: not a regular file ({kind})")
    return p


def read_text(
    path: str | Path, limit: int | None = None, error: type[Exception] = InputError
) -> str:
    """A regular file's UTF-8 text; with `limit`, at most that many bytes of it."""
    p = regular_file(path, error)
    with open(p, "rb") as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise error(f"{p}: larger than {limit / 2**20:g} MiB, too large for what it should be")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise error(f"{p}:{line}: not UTF-8 text") from None


def parse_json(
    text: str, where: str | Path, error: type[Exception] = InputError, line: int | None = None
) -> Any:
    """`json.loads`, its every failure one line naming `where` (the file) and the line: `line`
    for text that is one line of the file, else the parser's where it knows it."""
    at = f"{where}:{line}" if line is not None else str(where)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = at if line is not None else f"{where}:{e.lineno}"
        raise error(f"{at}: cannot read as json: {e.msg}") from None
    except RecursionError:
        raise error(f"{at}: nested deeper than a JSON reader follows") from None
    except ValueError as e:  # int()'s limit on digits
        raise error(f"{at}: {number_problem(e)}") from None


def number_problem(e: ValueError) -> str:
    """What a parser's ValueError means: mostly int()'s limit on the digits it reads."""
    if "digits" in str(e):
        return f"an integer too long to read (over {_max_digits()} digits)"
    return str(e).splitlines()[0]


def _max_digits() -> int:
    import sys

    return sys.get_int_max_str_digits()


def shown(value: Any, width: int = 60) -> str:
    """`repr(value)` for a message, cut to about `width` characters (a value may be a
    megabyte of YAML)."""
    if isinstance(value, int) and abs(value) >= 10**width:  # repr() of 5000 digits fails
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value) if not isinstance(value, list | dict | tuple | set) else _short(value)
    return text if len(text) <= width else f"{text[: width - 5]}...{text[-2:]}"


def _short(value: Any) -> str:
    kind = type(value).__name__
    return f"a {kind} of {len(value)} item(s)"


def is_unicode(value: str) -> bool:
    """Whether `value` is valid Unicode: no lone surrogates (JSON's "\\udcff" escapes, or the
    bytes of an argument or file name that is not UTF-8, as Python holds them)."""
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def text_problem(value: str) -> str | None:
    """What makes `value` unusable as a path, a prompt or an option: a NUL character, or bytes
    that are not UTF-8; None when it is fine."""
    if "\0" in value:
        return "holds a NUL character"
    if is_unicode(value):
        return None
    try:
        return f"{os.fsencode(value)!r} is not UTF-8"
    except UnicodeEncodeError:  # a surrogate no byte stands for
        return f"{ascii(value)} is not UTF-8 (it holds a lone surrogate)"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, bounded: no anchors or aliases, no duplicate keys, at most
    MAX_DEPTH levels, integers `int()` can read."""

    depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _Refused(self.peek_event().start_mark, "anchors and aliases are not supported")
        event = self.peek_event()
        if getattr(event, "anchor", None) is not None:
            raise _Refused(event.start_mark, "anchors and aliases are not supported")
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Refused(event.start_mark, f"nested deeper than {MAX_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        first: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict | set):
                raise _Refused(key_node.start_mark, "a key must be a single value")
            line = key_node.start_mark.line + 1
            if key in first:
                raise _Refused(
                    key_node.start_mark, f"duplicate key {key!r} (first on line {first[key]})"
                )
            first[key] = line
        return super().construct_mapping(node, deep)


def _construct_int(loader: _Loader, node):
    try:
        return yaml.SafeLoader.construct_yaml_int(loader, node)
    except ValueError as e:
        raise _Refused(node.start_mark, number_problem(e)) from None


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


class _Refused(yaml.YAMLError):
    def __init__(self, mark, problem: str):
        super().__init__(problem)
        self.mark, self.problem = mark, problem


def load_yaml(path: str | Path, error: type[Exception] = InputError) -> Any:
    """A small YAML file's content, bounded (see `_Loader`)."""
    text = read_text(path, YAML_FILE, error)
    try:
        return yaml.load(text, Loader=_Loader)
    except _Refused as e:
        raise error(f"{path}:{e.mark.line + 1}: {e.problem}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise error(f"{where}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise error(f"{path}: nested deeper than {MAX_DEPTH} levels") from None


def read_json(path: str | Path, limit: int = SMALL_FILE, error: type[Exception] = InputError):
    """A small JSON file's content (a config, checkpoint metadata)."""
    return parse_json(read_text(path, limit, error), path, error)
