"""Learning-rate schedules equal the Hugging Face Trainer's."""

import numpy as np
import pytest
import transformers

from lomo_jax.schedule import Schedule
from tests.conftest import needs_torch


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_schedule_matches_transformers(kind):
    torch = needs_torch()
    lr, warmup, total = 0.03, 5, 40
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    make = {
        "constant": transformers.get_constant_schedule_with_warmup,
        "linear": transformers.get_linear_schedule_with_warmup,
        "cosine": transformers.get_cosine_schedule_with_warmup,
    }[kind]
    sched = make(opt, warmup) if kind == "constant" else make(opt, warmup, total)
    theirs = []
    for _ in range(total):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [float(Schedule(lr, kind, warmup, total)(step)) for step in range(total)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-9)
