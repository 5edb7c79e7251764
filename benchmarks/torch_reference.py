"""The paper authors' PyTorch LOMO / AdaLomo (`lomo-optim`) on transformers' LlamaForCausalLM: the
reference the benchmarks time and the tests compare with. Needs torch and lomo-optim
(`pip install -e '.[reference]'`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def cuda_is_identity() -> Iterator[None]:
    """lomo-optim's AdaLomo calls `.cuda()` in its constructor: off a GPU that must do nothing."""
    import torch

    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def make_optimizer(model, method: str, lr: float, **kw):
    """`lomo_optim.Lomo` (method "lomo") or `lomo_optim.AdaLomo` ("adalomo") over `model`."""
    import lomo_optim

    cls = {"lomo": lomo_optim.Lomo, "adalomo": lomo_optim.AdaLomo}[method]
    with cuda_is_identity():
        return cls(model, lr=lr, **kw)


def random_model(cfg, dtype: str = "float32", device: str = "cpu", checkpointing: bool = True):
    """A randomly initialized LlamaForCausalLM of lomo-jax config `cfg`, training, with sdpa
    attention and (as the authors' trainer) gradient checkpointing."""
    import torch
    import transformers

    hf = dict(cfg.to_hf_dict(), use_cache=False)
    hf_cfg = transformers.LlamaConfig(
        **{k: v for k, v in hf.items() if k not in ("architectures", "model_type")}
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            hf_cfg, attn_implementation="sdpa", dtype=getattr(torch, dtype)
        )
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    return model
