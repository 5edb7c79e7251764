"""One step factory: `lomo-jax plan` compiles the very function `lomo-jax train` runs, for every
optimizer (the same jaxpr, shapes, shardings and compiler options: the same lowered module)."""

import pytest

import lomo_jax.memory
import lomo_jax.train
from lomo_jax.cli import main
from lomo_jax.train_step import OPTIMIZERS
from tests.conftest import CONFIGS, make_hf_dir, random_ids, train_args
from tests.test_train_cli import write_rows

CFG = CONFIGS["gqa"]
SLOW = pytest.mark.slow  # one case (the default optimizer, float32) runs in the inner loop


class _Compiled(Exception):
    """Stops a run once its step is lowered: the step is all this test wants of it."""


LORA = ["--lora-rank", "2"]  # `none` trains LoRA factors alone; lomo+lora is the hybrid
CASES = [(o, d) for o in (*OPTIMIZERS, "lomo+lora") for d in ("float32", "float16")]


@pytest.mark.parametrize(
    ("optimizer", "dtype"),
    [
        pytest.param(o, d, id=f"{o}-{d}", marks=() if (o, d) == ("adalomo", "float32") else SLOW)
        for o, d in CASES
        if not (d == "float16" and o in ("none", "lomo+lora"))  # LoRA refuses float16
    ],
)
def test_plan_compiles_the_step_train_runs(tmp_path, monkeypatch, optimizer, dtype):
    src = make_hf_dir(tmp_path / "hf", CFG)
    data = write_rows(tmp_path / "data.jsonl", random_ids(CFG, 4, 16))
    lowered = {}

    def train_compiles(step_fn, like, batch):
        lowered["train"] = step_fn.lower(like, batch).as_text()
        raise _Compiled

    plan_lower = lomo_jax.memory.lower

    def plan_compiles(*args, **kwargs):
        out = plan_lower(*args, **kwargs)
        lowered["plan"] = out[0].as_text()
        return out

    monkeypatch.setattr(lomo_jax.train, "_compile", train_compiles)
    monkeypatch.setattr(lomo_jax.memory, "lower", plan_compiles)
    optimizer, lora = optimizer.removesuffix("+lora"), optimizer in ("none", "lomo+lora")
    flags = ["--optimizer", optimizer, "--dtype", dtype, "--batch-size", "2", "--seq-len", "16"]
    flags += LORA if lora else []
    with pytest.raises(_Compiled):
        main(train_args(src, data, tmp_path / "run", *flags, "--steps", "1"))
    assert main(["plan", "--model", str(src), *flags, "--json"]) == 0
    assert lowered["plan"] == lowered["train"]
    assert "stablehlo.while" in lowered["train"]  # a real step: the layer scan
