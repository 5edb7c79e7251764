"""Every supported family against transformers' own class, on a tiny random model saved with
save_pretrained: logits (with padding), export back to the family's class, the fused AdaLomo step
against jax.grad + AdaLomo and sharded over 8 devices; Mistral's window in cached generation;
the parameter table against the tree the Flax model creates; Hub ids from a local cache.

The 8-device work and the Hub commands run in one subprocess (the device count and the cache
location are fixed when JAX and huggingface_hub start), started before this process computes
the single-device steps, so that the two run side by side."""

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax.traverse_util import flatten_dict, unflatten_dict

import lomo_jax
from convert import export_hf, import_checkpoint
from lomo_jax.baseline import unfused_step
from lomo_jax.cli import main
from lomo_jax.config import LlamaConfig
from lomo_jax.engine import fused_step, init_train_state
from lomo_jax.generate import generate
from lomo_jax.lora import TARGETS, LoraConfig
from lomo_jax.loss import Batch, batch_inputs
from lomo_jax.model import LAYER_BLOCKS, decoder_layer, layer_stage
from lomo_jax.optim import AdaLomo
from lomo_jax.parameters import LAYERS, TABLE, params_of, stage_weights
from lomo_jax.schedule import Schedule
from lomo_jax.sharding import RULES, Layout
from lomo_jax.tokenizer import TokenizerError
from tests.conftest import CONFIGS, TINY, needs_torch, random_ids
from tests.test_scale_out import REPO, TIMEOUT, _env
from tests.test_train_cli import write_rows

_TINY = dict(TINY, num_key_value_heads=2)
_LLAMA3 = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}
# The shapes people fine-tune, shrunk: (transformers config class, its arguments).
FAMILY_CONFIGS = {
    "llama3.2": (
        transformers.LlamaConfig,
        dict(
            tie_word_embeddings=True,
            rope_parameters={
                **_LLAMA3,
                "rope_theta": 500000.0,
                "factor": 32.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "mistral": (transformers.MistralConfig, dict(sliding_window=6)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32)),
}
STEPS, LR = 2, 1e-2
RULE = AdaLomo(weight_decay=0.1)


def save_tiny(path, family: str, seed: int = 0):
    """A random transformers model of `family`, saved with save_pretrained (float32). Biases and
    norm scales are drawn too, so none of them is a no-op."""
    torch = needs_torch()
    cls, kw = FAMILY_CONFIGS[family]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cls(**_TINY, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p)
            )
    model.save_pretrained(path)
    return path


REPO_ID = "tiny-org/tiny-qwen2"


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """(HF directory of each family, a Hugging Face cache holding REPO_ID, their folder)."""
    tmp = tmp_path_factory.mktemp("families")
    dirs = {f: save_tiny(tmp / f, f) for f in FAMILY_CONFIGS}
    write_rows(tmp / "data.jsonl", random_ids(LlamaConfig(**_TINY), 16, 16, seed=3))
    return dirs, _hub_cache(tmp, dirs["qwen2"], REPO_ID), tmp


@pytest.fixture(scope="module")
def hf_dirs(families):
    return families[0]


@pytest.fixture(scope="module")
def on_devices(families):
    """Starts the subprocess (8 devices, the fake cache); -> a function that waits for it and
    returns (its folder, its stdout lines): call it after this process's own work."""
    dirs, hub, tmp = families
    script = (
        "from tests.test_families import _fused_on_mesh, _hub_commands\n"
        f"_fused_on_mesh({ {f: str(d) for f, d in dirs.items()}!r}, {str(tmp)!r})\n"
        f"_hub_commands({str(tmp)!r})\n"
    )
    env = dict(_env(8), HF_HOME=str(tmp / "hf_home"), HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True
    )

    @functools.cache
    def wait():
        stdout, _ = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, stdout
        return tmp, stdout.strip().splitlines()

    yield wait
    proc.kill()
    proc.wait()


def hf_model(path):
    torch = needs_torch()
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(model, ids, mask=None):
    torch = needs_torch()
    with torch.no_grad():
        mask = None if mask is None else torch.from_numpy(mask)
        return model(torch.from_numpy(ids).long(), attention_mask=mask).logits.numpy()


def padded_batch(cfg, seed=1):
    ids = random_ids(cfg, 2, 20, seed=seed)
    mask = np.ones_like(ids)
    mask[1, 13:] = 0  # right padding in the second row
    return ids, mask


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_logits_match_transformers_with_padding(hf_dirs, family):
    model, reference = lomo_jax.from_pretrained(hf_dirs[family]), hf_model(hf_dirs[family])
    assert model.config.model_type == reference.config.model_type
    ids, mask = padded_batch(model.config)
    ours = np.asarray(model(ids, segment_ids_BT=mask))
    theirs = hf_logits(reference, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)


def test_sliding_window_generation_matches_full_forward(hf_dirs):
    """Greedy decoding through the KV cache, where Mistral's window applies to the cached keys,
    picks the argmax of an uncached forward pass; 11 positions outgrow the window of 6."""
    model = lomo_jax.from_pretrained(hf_dirs["mistral"])
    prompt = random_ids(model.config, 2, 1, seed=2)
    new = np.asarray(generate(model.config, model.params, prompt, 10, end_ids=()))
    logits = np.asarray(model(np.concatenate([prompt, new], axis=1)))
    np.testing.assert_array_equal(new, logits[:, :-1].argmax(-1))


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_export_reloads_as_the_family_class(hf_dirs, family, tmp_path):
    import_checkpoint(hf_dirs[family], tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "out")
    theirs, back = hf_model(hf_dirs[family]), hf_model(tmp_path / "out")
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["architectures"] == [type(theirs).__name__]
    assert type(back) is type(theirs)
    for key in ("sliding_window", "head_dim", "tie_word_embeddings", "rope_parameters"):
        assert getattr(back.config, key, None) == getattr(theirs.config, key, None), key
    ids, mask = padded_batch(LlamaConfig(**_TINY))
    np.testing.assert_allclose(hf_logits(back, ids, mask), hf_logits(theirs, ids, mask), atol=1e-6)


def batches(cfg, n=STEPS, seed=10):
    return [random_ids(cfg, 8, 16, seed + k) for k in range(n)]


def flat_numpy(params) -> dict:
    return {".".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}


def train_together(step, hf_dirs: dict, layout: Layout | None = None) -> dict:
    """{family: {leaf name: array}} after STEPS steps of `step(cfg, layout)` (a function of
    (TrainState, Batch)) on every family, all families in one compiled function: a tiny model's
    compile is mostly XLA's fixed cost, so one compile for four costs about half of four."""
    cfgs, states, inputs = [], [], []
    for hf_dir in hf_dirs.values():
        model = lomo_jax.from_pretrained(hf_dir, layout=layout)
        cfgs.append(model.config)
        states.append(init_train_state(RULE, model.params, layout=layout))
        rows = [Batch(ids, ids) for ids in batches(model.config)]
        inputs.append(
            [layout.put_batch(b) if layout else jax.tree.map(jnp.asarray, b) for b in rows]
        )
    fns = [step(cfg, layout) for cfg in cfgs]
    all_steps = jax.jit(lambda sts, bs: [f(s, b)[0] for f, s, b in zip(fns, sts, bs)])
    for k in range(STEPS):
        states = all_steps(states, [b[k] for b in inputs])
    return {f: flat_numpy(s.params) for f, s in zip(hf_dirs, states)}


def unfused(cfg, layout):
    """jax.grad + AdaLomo (optim.apply_updates, vmapped over the layer axis)."""
    return functools.partial(unfused_step, cfg, RULE, Schedule(LR))


def fused(cfg, layout):
    return functools.partial(fused_step, cfg, RULE, Schedule(LR), layout=layout)


@pytest.fixture(scope="module")
def jax_grad_weights(hf_dirs):
    return train_together(unfused, hf_dirs)


@pytest.fixture(scope="module")
def fused_weights(hf_dirs, on_devices):
    """(Starts the subprocess first, so that it runs meanwhile.)"""
    return train_together(fused, hf_dirs)


def assert_weights_close(ours: dict, ref: dict, rtol: float):
    assert set(ours) == set(ref)
    for k, a in ours.items():
        err = np.linalg.norm(a - ref[k]) / np.linalg.norm(ref[k])
        assert err <= rtol, (k, err)


def _fused_on_mesh(hf_dirs: dict, out: str) -> None:
    """(Runs on 8 devices.) Each family's fused AdaLomo steps with fsdp=8, saved to OUT/F.npz."""
    from lomo_jax.sharding import make_mesh

    weights = train_together(fused, hf_dirs, Layout(make_mesh("fsdp=8")))
    for family, flat in weights.items():
        np.savez(f"{out}/{family}.npz", **flat)


def _hub_cache(tmp, hf_dir, repo_id: str):
    """A Hugging Face cache holding `repo_id` as huggingface_hub lays it out (what
    `hf download` leaves): blobs linked from snapshots/<commit>/, refs/main naming the commit."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "once", "upon", "a"] + [f"w{i}" for i in range(6, 90)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    fast.save_pretrained(snapshot)
    (repo / "blobs").mkdir()
    for f in [*hf_dir.iterdir(), *snapshot.iterdir()]:
        blob = repo / "blobs" / f"{f.name}.blob"
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).unlink(missing_ok=True)
        (snapshot / f.name).symlink_to(f"../../blobs/{blob.name}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return tmp / "hub"


def _hub_commands(tmp: str) -> None:
    """(Runs with HF_HUB_CACHE on the fake cache, offline.) Every command reads the Hub id."""
    src, out = REPO_ID, f"{tmp}/hub-out"
    data = f"{tmp}/data.jsonl"
    assert main(["import", src, f"{out}/ckpt"]) == 0
    run = ["--out", f"{out}/run", "--optimizer", "adamw", "--lr", "1e-2", "--steps", "2"]
    shape = ["--batch-size", "8", "--seq-len", "16"]
    assert main(["train", "--model", src, "--data", data, *run, *shape, "--mesh", "fsdp=1"]) == 0
    assert main(["eval", src, "--data", data, "--seq-len", "16", "--json"]) == 0
    assert main(["generate", src, "--prompt", "once upon a", "--max-new-tokens", "4"]) == 0
    model = lomo_jax.from_pretrained(src)
    prompt = model.tokenizer.encode("once upon a")
    print(json.dumps([prompt, model.generate([prompt], 4)[0]]))


def test_missing_hub_id_is_one_line(tmp_path, capsys):
    assert main(["import", "no-such-org/no-such-model", str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("lomo-jax: error: no-such-org/no-such-model: ")
    assert "hf download no-such-org/no-such-model" in err
    assert not (tmp_path / "ckpt").exists()


def test_empty_prompt_without_bos_is_refused(families):
    """Qwen has no BOS token: generating from nothing is a clear error, not a crash."""
    snapshot = next(families[1].glob("models--*/snapshots/*"))
    model = lomo_jax.from_pretrained(snapshot)
    assert model.config.bos_token_id is None
    with pytest.raises(TokenizerError, match="no BOS token"):
        model.generate_text("", max_new_tokens=2)


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_table_is_the_tree_the_model_creates(hf_dirs, family):
    """parameters.TABLE names every leaf init_params (the Flax modules) creates, with its shape,
    for the family's switches; every axis has a sharding rule, every layer row a stage."""
    base = LlamaConfig.from_json_file(hf_dirs[family] / "config.json")
    for cfg in (base, base.replace(lora=LoraConfig(2, targets=TARGETS))):  # LoRA: every factor
        created = jax.eval_shape(lambda cfg=cfg: lomo_jax.init_params(cfg, jax.random.key(0)))
        shapes = {".".join(k): v.shape for k, v in flatten_dict(created).items()}
        assert shapes == {p.name: p.shape(cfg) for p in params_of(cfg)}
    assert all(a in RULES for p in TABLE for a in p.axes)
    assert {p.stage for p in TABLE if p.per_layer} == {s for block in LAYER_BLOCKS for s in block}


# Between them every optional row: q/k/v/o biases and q/k norms; q/k/v/o and MLP biases; the
# LoRA factors of every projection.
ALL_ROWS = {
    "qwen3-bias": LlamaConfig(**_TINY, model_type="qwen3", attention_bias=True, head_dim=32),
    "llama-bias": CONFIGS["head-dim-bias-linear"],
    "lora": CONFIGS["gqa"].replace(lora=LoraConfig(2, targets=TARGETS)),
}


@pytest.mark.parametrize("name", list(ALL_ROWS))
def test_each_layer_stage_runs_on_its_rows_alone(name):
    """Given only the weights whose rows name it, each stage of LAYER_BLOCKS runs (Flax refuses
    a stage missing a weight it reads), and the stages chain into the layer's output. (That they
    compute the layer is the fused step's test: it differentiates through the stages.)"""
    cfg = ALL_ROWS[name]
    ids = random_ids(cfg, 1, 8)
    positions, mask = batch_inputs(Batch(ids, ids))

    def stages_and_layer(key):
        layer = flatten_dict(lomo_jax.init_params(cfg, key)[LAYERS])
        layer = {k: v[0] for k, v in layer.items()}
        h = jax.random.normal(key, (1, 8, cfg.hidden_size))
        xs = (h,)
        for block in LAYER_BLOCKS:
            for stage in block:
                weights = {k: layer[k] for k in stage_weights(stage) if k in layer}
                xs = layer_stage(cfg, stage, positions, mask)(unflatten_dict(weights), xs)
        return xs, decoder_layer(cfg, unflatten_dict(layer), h, positions, mask)

    # Traced only (no compile): a missing weight fails while tracing.
    stages, layer = jax.eval_shape(stages_and_layer, jax.random.key(1))
    assert len(stages) == 1 and stages[0].shape == layer.shape == (1, 8, cfg.hidden_size)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_fused_adalomo_equals_jax_grad(hf_dirs, fused_weights, jax_grad_weights, family):
    """The engine walks the family's weights (biases, q/k norms; the window's mask)."""
    assert_weights_close(fused_weights[family], jax_grad_weights[family], rtol=1e-5)
    before = flat_numpy(lomo_jax.from_pretrained(hf_dirs[family]).params)
    assert all(np.any(before[k] != fused_weights[family][k]) for k in before)  # all moved


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_sharded_fused_step_equals_one_device(fused_weights, on_devices, family):
    """The sharding rules split the family's weights (fsdp=8 over 8 CPU devices)."""
    with np.load(on_devices()[0] / f"{family}.npz") as sharded:
        assert_weights_close(dict(sharded), fused_weights[family], rtol=1e-5)


@pytest.mark.slow
def test_hub_id_works_for_every_command(hf_dirs, on_devices):
    tmp, lines = on_devices()
    out = tmp / "hub-out"
    model = lomo_jax.from_pretrained(hf_dirs["qwen2"])
    imported = lomo_jax.from_pretrained(out / "ckpt")
    for a, b in zip(jax.tree.leaves(imported.params), jax.tree.leaves(model.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    trained = lomo_jax.from_pretrained(out / "run")
    moved = zip(jax.tree.leaves(trained.params), jax.tree.leaves(model.params), strict=True)
    assert all(np.any(np.asarray(a) != np.asarray(b)) for a, b in moved)
    # eval's JSON line, generate's text, then from_pretrained's tokens, in that order
    evaluated, text, (prompt, tokens) = json.loads(lines[-3]), lines[-2], json.loads(lines[-1])
    assert evaluated["tokens"] == 16 * 15 and np.isfinite(evaluated["loss"])
    assert tokens == generate(model.config, model.params, [prompt], 4)[0]
    assert text == imported.tokenizer.decode(tokens)
