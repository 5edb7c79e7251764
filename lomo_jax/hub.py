"""Hugging Face Hub ids (`org/name`) as model paths, resolved through the local Hugging Face
cache the way transformers resolves them: huggingface_hub finds the cached snapshot (HF_HOME,
HF_HUB_CACHE), offline when HF_HUB_OFFLINE=1 (the command line's default), else it may download
the config, tokenizer and safetensors weights first."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

from lomo_jax.errors import first_line

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # also a dataset's (`lomo_jax.records`)
# What an import reads from a repository (not, e.g., Meta's original/*.pth beside the weights):
# configs (generation_config.json too), weights, tokenizer files and chat templates.
FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]


def is_repo_id(ref: str | Path) -> bool:
    """Whether `ref` reads as a Hub id (`org/name`); a local path of that form wins over it."""
    return REPO_ID.fullmatch(str(ref)) is not None


def resolve(ref: str | Path) -> Path:
    """A local path as it is; an `org/name` that is not one -> its snapshot directory."""
    path = Path(ref)
    if path.exists() or not is_repo_id(ref):
        return path
    from huggingface_hub import snapshot_download

    with _not_found(str(ref), f"`hf download {ref}`"):
        return Path(snapshot_download(str(ref), allow_patterns=FILES))


def file(repo_id: str, filename: str) -> Path:
    """One file of a repository, from the cache (downloaded alone unless HF_HUB_OFFLINE)."""
    from huggingface_hub import hf_hub_download

    with _not_found(repo_id, f"`hf download {repo_id} {filename}`", filename):
        return Path(hf_hub_download(repo_id, filename))


@contextlib.contextmanager
def _not_found(ref: str, fetch: str, filename: str | None = None) -> Iterator[None]:
    """huggingface_hub's errors as a FileNotFoundError of one line naming `ref`."""
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    what = f"{ref}: no {filename}" if filename else f"{ref}: no such path, and not"
    try:
        yield
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{what} in the Hugging Face cache ({constants.HF_HUB_CACHE}); fetch it with {fetch}"
        ) from None
    except EntryNotFoundError:
        raise FileNotFoundError(f"{ref}: the repository has no {filename}") from None
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"{ref}: the Hugging Face Hub says: {first_line(e)}") from None
