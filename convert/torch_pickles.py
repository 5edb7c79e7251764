"""PyTorch pickles (`pytorch_model.bin`, Meta's `consolidated.NN.pth`): the one part of lomo-jax
that needs torch, an optional extra (`pip install 'lomo-jax[torch]'`). Safetensors models are
read and written without it (`convert.safetensors_file`)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import ml_dtypes
import numpy as np

from convert.errors import ConversionError


def torch(path: str | Path) -> ModuleType:
    """The torch module, or one line saying that `path` (a pickle) needs the extra."""
    try:
        import torch
    except ImportError:
        raise ConversionError(
            path, "a PyTorch pickle needs torch: pip install 'lomo-jax[torch]'"
        ) from None
    return torch


def load(path: Path) -> dict:
    """The state dict in `path`, memory-mapped, as torch tensors."""
    t = torch(path)
    try:
        return t.load(path, map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError:
        raise ConversionError(path, "file not found") from None
    except Exception as e:  # torch raises many types for corrupt or truncated pickles
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(
            path, f"cannot read PyTorch checkpoint (truncated or corrupt?): {reason}"
        ) from None


def to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def from_numpy(a: np.ndarray):
    import torch

    # torch wants writable memory; copy only what is read-only (mmaps, jax buffers) or strided.
    a = np.ascontiguousarray(a) if a.flags.writeable else np.array(a, order="C")
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def save(path: Path, tensors: list[tuple[str, np.ndarray]]) -> None:
    torch(path).save({name: from_numpy(a) for name, a in tensors}, path)
