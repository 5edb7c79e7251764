"""`lomo-jax` command line: results on stdout, logs on stderr, a bad input is one line + exit 1.

Only the standard library is imported before `main` starts catching Ctrl-C and SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import lomo_jax
from lomo_jax import cuda_plugin, host_memory, interrupt
from lomo_jax.errors import UserError

log = logging.getLogger("lomo_jax")


def _cmd_import(a: argparse.Namespace) -> None:
    from convert import import_checkpoint

    out = import_checkpoint(a.src, a.out, a.tokenizer, a.dtype, a.overwrite)
    log.info("imported %s -> %s", a.src, out)


def _cmd_export(a: argparse.Namespace) -> None:
    from convert import export_hf
    from convert.errors import ConversionError
    from lomo_jax.checkpoint import is_checkpoint

    if not is_checkpoint(a.ckpt):
        raise ConversionError(a.ckpt, "not a lomo-jax checkpoint (no config.json and params/)")
    shard = round(a.max_shard_size * 2**20) if a.max_shard_size else None
    out = export_hf(
        a.ckpt,
        a.out,
        **({"max_shard_bytes": shard} if shard else {}),
        overwrite=a.overwrite,
        peft=a.peft,
    )
    log.info("exported %s -> %s", a.ckpt, out)


def _layout(a: argparse.Namespace):
    """`--mesh` of eval / generate: the model sharded over this process's devices, or None."""
    from lomo_jax.sharding import Layout

    return Layout.of(a.mesh) if a.mesh else None


def _generation_inputs(a: argparse.Namespace):
    """(model, sampling, max new tokens, chat template text or None) of generate / chat."""
    from lomo_jax.chat import read_template
    from lomo_jax.pretrained import from_pretrained
    from lomo_jax.tokenizer import TokenizerError

    template = read_template(a.chat_template) if a.chat_template else None
    model = from_pretrained(a.ckpt, a.tokenizer, layout=_layout(a))
    if model.tokenizer is None:
        raise TokenizerError(f"{a.ckpt}: no tokenizer; pass --tokenizer")
    sampling = model.generation_config.sampling(a.temperature, a.top_p, a.top_k)
    n = model.generation_config.max_new_tokens(a.max_new_tokens)
    log.info("%s, at most %d new tokens, ending at ids %s", sampling, n, list(model.end_ids))
    return model, sampling, n, template


def _cmd_generate(a: argparse.Namespace) -> None:
    from lomo_jax.generate import GenerateError

    if a.chat is None and (a.system is not None or a.chat_template):
        raise GenerateError("--system and --chat-template go with --chat")
    model, sampling, n, template = _generation_inputs(a)
    settings = dict(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    if a.chat is None:
        text = model.generate_text(a.prompt, n, **settings, seed=a.seed)
    else:
        system = [{"role": "system", "content": a.system}] if a.system is not None else []
        messages = [*system, {"role": "user", "content": a.chat}]
        text = model.chat(messages, n, template=template, **settings, seed=a.seed)
    sys.stdout.write(text + "\n")


def _cmd_chat(a: argparse.Namespace) -> None:
    from lomo_jax.chat_session import chat_loop

    model, sampling, n, template = _generation_inputs(a)
    chat_loop(model, sys.stdin, sys.stdout, sampling, n, a.system, template, a.seed)


def _cmd_train(a: argparse.Namespace) -> None:
    from lomo_jax.distributed import initialize
    from lomo_jax.resume import checkpoint_of
    from lomo_jax.train import TrainConfig, train

    initialize(
        getattr(a, "coordinator_address", None),
        getattr(a, "num_processes", None),
        getattr(a, "process_id", None),
    )

    given = {k: v for k, v in vars(a).items() if k in TrainConfig.__dataclass_fields__}
    if "no_shuffle" in vars(a):
        given["shuffle"] = not a.no_shuffle
    origin = given.pop("from_checkpoint", None)
    if not (a.resume or origin):
        train(TrainConfig.from_sources(a.config, given), False, _hand_back_memory)
        return
    if not a.resume:  # a checkpoint of a run: RUN/checkpoints/step_N
        a.resume = str(checkpoint_of(origin, None).parent.parent)
    c, changes = TrainConfig.resumed(a.resume, a.config, given, origin)
    if changes:
        log.info("%s with %s", "branching" if origin else "resuming", ", ".join(changes))
    train(c, origin is None, _hand_back_memory)


def _hand_back_memory(phase: str) -> None:
    """Between a training run's phases, the memory the one before left behind
    (`host_memory.release`); once the weights are read, also the readers' executables and
    orbax's host copies of whole tensors in reference cycles (`jax.clear_caches`, then the
    collection). At LLaMA-7B on a 24 GB machine they decide the run's peak (README)."""
    if phase == "loaded":
        import jax

        jax.clear_caches()
    host_memory.release()


def _cmd_eval(a: argparse.Namespace) -> None:
    import json

    from lomo_jax.data import DataOptions, build_rows, check_seq_len, check_tokenizer
    from lomo_jax.evaluate import evaluate_loss
    from lomo_jax.pretrained import from_pretrained
    from lomo_jax.tasks import TaskError, accuracy, candidate_scores, read_examples

    layout = _layout(a)
    if a.format == "superglue" or (a.task and not a.format):
        examples = read_examples(a.task, a.data)  # bad input fails before the model loads
        model = from_pretrained(a.ckpt, a.tokenizer, layout=layout)
        if model.tokenizer is None:
            raise TaskError(f"{a.ckpt}: no tokenizer; pass --tokenizer")
        check_tokenizer(model.tokenizer, model.config.vocab_size)
        scores = candidate_scores(
            model.config, model.params, model.tokenizer, examples, a.batch_size
        )
        result = {"task": a.task, "accuracy": accuracy(examples, scores), "n": len(examples)}
        text = f"{a.task}: accuracy {result['accuracy']:.4f} over {result['n']} examples"
    else:
        model = from_pretrained(a.ckpt, a.tokenizer, layout=layout)
        check_seq_len(a.seq_len, model.config, a.ckpt)
        check_tokenizer(model.tokenizer, model.config.vocab_size)
        fmt = a.format or "pretokenized"
        vocab = model.config.vocab_size
        rows = build_rows(
            fmt,
            a.data,
            model.tokenizer,
            a.seq_len,
            template=a.template,
            vocab_size=vocab,
            options=DataOptions.of(a),
        )
        result = evaluate_loss(model.config, model.params, rows, a.batch_size, layout)
        text = (
            f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
            f"over {result['tokens']} tokens"
        )
    print(json.dumps(result) if a.json else text)


def _cmd_data(a: argparse.Namespace) -> None:
    import numpy as np

    from lomo_jax import preview
    from lomo_jax.data import DataOptions, build_rows, check_seq_len, check_tokenizer
    from lomo_jax.pretrained import from_pretrained
    from lomo_jax.tokenizer import TokenizerError

    model = from_pretrained(a.model, a.tokenizer, np.float32, weights=False)
    if model.tokenizer is None:
        raise TokenizerError(f"{a.model}: no tokenizer; pass --tokenizer")
    check_seq_len(a.seq_len, model.config, a.model)
    check_tokenizer(model.tokenizer, model.config.vocab_size)
    options = DataOptions.of(a)
    rows = build_rows(
        a.format or "pretokenized",
        a.data,
        model.tokenizer,
        a.seq_len,
        a.task,
        a.template,
        model.config.vocab_size,
        options,
    )
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    try:
        for line in preview.lines(model.tokenizer, rows, a.json, options.pack, color):
            print(line)
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _cmd_plan(a: argparse.Namespace) -> None:
    import json

    import jax

    from lomo_jax.longest import max_seq_len
    from lomo_jax.lora import LoraConfig
    from lomo_jax.memory import GPUS, plan
    from lomo_jax.presets import find_config
    from lomo_jax.train_step import DTYPES

    cfg = find_config(a.model).replace(attention=a.attention)
    if a.lora_rank:
        targets = tuple(a.lora_targets.split(","))
        cfg = cfg.replace(lora=LoraConfig(a.lora_rank, targets=targets))
    if a.target == "cpu" and a.devices > 1:  # read when the CPU backend starts (not yet)
        jax.config.update("jax_num_cpu_devices", a.devices)
    method = {"lomo": "fused-lomo", "adalomo": "fused-adalomo", "none": "lora"}.get(
        a.optimizer, a.optimizer
    )
    on = {"dtype": DTYPES[a.dtype], "target": a.target, "devices": a.devices}
    on |= {"offload": a.offload_activations, "mesh": a.mesh}
    if a.max_seq_len is None:
        row = plan(cfg, method, a.batch_size, a.seq_len, **on)
    else:
        row = max_seq_len(cfg, method, a.batch_size, a.max_seq_len or None, **on)
    if a.json:
        print(json.dumps(row))
        return
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    device = GPUS[a.target].name if a.target in GPUS else "CPU"
    shape = f"batch {a.batch_size}" + ("" if a.max_seq_len is not None else f" x {a.seq_len}")
    lora = f" + LoRA rank {cfg.lora.rank} on {','.join(cfg.lora.targets)}" if cfg.lora else ""
    peak = (
        f"peak {gib(row['peak_bytes'])} ({row['peak_over_params']:.3f} x parameters) of "
        f"{gib(row['device_bytes'])}"
    )
    print(
        f"{a.model}: {method}{lora}, {shape}, {a.dtype}, on {a.devices} x {device}, per device: "
        f"parameters {gib(row['param_bytes'])}, ",
        end="",
    )
    if row["offload"]:
        peak += f", {gib(row['host_bytes'])} in host memory (layer inputs offloaded)"
    if a.max_seq_len is None:
        print(f"{peak}: " + ("fits" if row["fits"] else "does NOT fit"))
    elif row["max_seq_len"]:
        limit = " (the search's limit)" if row["max_seq_len"] == row["limit"] else ""
        print(f"the longest sequence that fits: {row['max_seq_len']} tokens{limit}, {peak}")
    else:
        print(f"not even {row['seq_len']} tokens fit: {peak}")


def _cmd_demo(a: argparse.Namespace) -> None:
    from lomo_jax.demo import run_demo

    run_demo(a.out)


MESH_HELP = (
    "shard the model over devices: fsdp=8, data=2,fsdp=4, ...; a batch smaller than data x fsdp "
    "has each sequence split over fsdp (length=fsdp forces it, length=none never)"
)
INT32 = 2**31 - 1  # the largest count or size a step takes
MAX_DEVICES = 1024  # of a plan: XLA builds a device per shard (100k CPU devices took minutes)


class UsageError(UserError):
    """A command line argparse refuses (one line and exit status 1, like every other error)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors raised (argparse prints the usage and exits with status 2);
    its subcommands' parsers are of this class too."""

    def error(self, message: str):
        command = self.prog.removeprefix("lomo-jax").strip()
        raise UsageError(f"{command}: {message}" if command else message)


def _checked(kind: type, ok, requirement: str):
    """An argparse type: a `kind` number for which `ok` holds."""

    def parse(text: str):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {value}")
        return value

    parse.__name__ = kind.__name__  # argparse says "invalid int value" for text that is none
    return parse


def _int(low: int, high: int = INT32):
    """An int in [low, high] (the range its consumer takes: an int32 count, a uint32 seed)."""

    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            bound = f"at least {low}" if value < low else f"at most {high}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def _generation_flags(s: argparse.ArgumentParser) -> None:
    """The flags generate and chat share; None: from the model's generation_config.json."""
    s.add_argument("--system", help="a system message before the conversation")
    s.add_argument(
        "--chat-template", metavar="FILE", help="a Jinja chat template instead of the tokenizer's"
    )
    s.add_argument(
        "--max-new-tokens",
        type=int,
        help="default: generation_config.json's, else 128; at most what the prompt leaves of "
        "the context",
    )
    s.add_argument("--temperature", type=float, help="0 = greedy")
    s.add_argument("--top-p", type=float)
    s.add_argument("--top-k", type=int, help="0 = no limit")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tokenizer", help="override the checkpoint's tokenizer")
    s.add_argument("--mesh", help=MESH_HELP)


def _data_flags(s: argparse.ArgumentParser) -> None:
    """How records become rows, beyond --format: train, eval and data take the same flags."""
    from lomo_jax.chat import TRAIN_ON
    from lomo_jax.packing import SIDES

    s.add_argument(
        "--chat-template",
        help="with --format chat: a Jinja chat template file (default: the tokenizer's own, "
        "from chat_template.jinja or tokenizer_config.json)",
    )
    s.add_argument(
        "--messages-field",
        help="with --format chat: the field holding each conversation (default: messages, "
        "else conversations)",
    )
    s.add_argument(
        "--train-on",
        choices=TRAIN_ON,
        help="loss on every assistant turn (default), the last one, or all tokens",
    )
    s.add_argument(
        "--truncation-side",
        choices=SIDES,
        help="right (default): cut a long example's end; left: cut its start (chat: its "
        "earliest whole turns) and keep the answer",
    )
    s.add_argument(
        "--pack",
        action="store_true",
        help="several examples per row, best-fit decreasing; attention stays inside each",
    )
    s.add_argument("--data-config", help="the configuration of a Hugging Face dataset --data")


def _rows_flags(s: argparse.ArgumentParser, data: str, format: str, task: str | None = None):
    """The data a command reads as rows (eval, data): the file and its format, as train takes
    them; the helps say what each command does with them."""
    from lomo_jax.data import FORMATS

    s.add_argument("--data", required=True, help=data)
    s.add_argument("--format", choices=FORMATS, help=format)
    s.add_argument("--task", help=task or "with --format superglue")
    s.add_argument("--template", help="with --format template: the prompt / response YAML")
    _data_flags(s)
    s.add_argument("--seq-len", type=_int(2), default=512)


def _parser() -> argparse.ArgumentParser:
    from lomo_jax.attention import IMPLEMENTATIONS
    from lomo_jax.data import FORMATS
    from lomo_jax.memory import OFFLOAD, TARGETS
    from lomo_jax.rounding import ROUNDINGS
    from lomo_jax.schedule import SCHEDULES
    from lomo_jax.train_step import DTYPES, OPTIMIZERS

    p = _Parser(prog="lomo-jax", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("import", help="convert a HF / Meta / llama2.c checkpoint to lomo-jax")
    s.add_argument("src", help="HF directory, Meta directory (params.json), or llama2.c .bin")
    s.add_argument("out", help="output lomo-jax checkpoint directory")
    s.add_argument("--tokenizer", help="SentencePiece .model or HF tokenizer directory")
    s.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="cast weights (default: keep the source dtype)",
    )
    s.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    s.set_defaults(func=_cmd_import)

    s = sub.add_parser("export", help="convert a lomo-jax checkpoint to a HF directory")
    s.add_argument("ckpt")
    s.add_argument("out")
    s.add_argument(
        "--max-shard-size",
        type=_checked(float, lambda v: 0 < v <= 2**20, "positive and at most 1048576 (1 TiB)"),
        help="MiB per safetensors shard (default 5 GiB)",
    )
    s.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    s.add_argument(
        "--peft",
        action="store_true",
        help="a model with LoRA factors: its base weights in OUT and a peft adapter in "
        "OUT/adapter (default: the factors merged into the weights)",
    )
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser(
        "generate",
        help="print a continuation of BOS + prompt, or the reply to a chat message",
        description="Stops at every end id of the model's generation_config.json and config. "
        "Sampling settings not given come from generation_config.json: its temperature, top_p "
        "and top_k if it says do_sample, else greedy.",
    )
    s.add_argument("ckpt", help="anything from_pretrained reads")
    what = s.add_mutually_exclusive_group()
    what.add_argument("--prompt", default="", help="text after BOS (default: BOS alone)")
    what.add_argument(
        "--chat", metavar="MESSAGE", help="a user message, rendered with the chat template"
    )
    _generation_flags(s)
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser(
        "chat",
        help="a conversation in the terminal (one user message a line)",
        description="Each line on stdin is a user message; each reply goes to stdout, ended by "
        "a newline. The KV cache lives across turns. /reset starts a new conversation, /exit or "
        "Ctrl-D quits. Sampling as in generate.",
    )
    s.add_argument("ckpt", help="anything from_pretrained reads")
    _generation_flags(s)
    s.set_defaults(func=_cmd_chat)

    s = sub.add_parser(
        "train",
        help="full-parameter fine-tuning with fused LOMO / AdaLomo",
        argument_default=argparse.SUPPRESS,
    )
    s.add_argument("--config", default=None, help="YAML file of options; flags override it")
    s.add_argument(
        "--resume",
        default=None,
        help="continue the run in this directory (options that may change: see README)",
    )
    s.add_argument(
        "--from-checkpoint",
        help="with --resume RUN and --out NEW: a new run from RUN's checkpoint "
        "(step_00000200), with RUN's options and its history up to that step",
    )
    s.add_argument("--model", help="anything from_pretrained reads")
    s.add_argument(
        "--data",
        help="file or directory (json, jsonl, csv, parquet, txt), or a Hugging Face dataset id "
        "org/name[:split] (default split train) from the datasets cache",
    )
    s.add_argument(
        "--format",
        choices=FORMATS,
        help='default pretokenized: jsonl {"input_ids": [...]} of seq-len tokens',
    )
    s.add_argument(
        "--task", help="with --format superglue: copa, rte, cb, boolq, wic, wsc, multirc"
    )
    s.add_argument(
        "--template",
        help="with --format template: YAML with prompt and response "
        "format strings over the record fields (loss on the response)",
    )
    _data_flags(s)
    s.add_argument("--out", help="run directory; it ends up holding the trained model")
    s.add_argument("--optimizer", choices=OPTIMIZERS, help="default adalomo")
    s.add_argument("--lr", type=float)
    s.add_argument("--steps", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--seq-len", type=int)
    s.add_argument("--weight-decay", type=float)
    s.add_argument("--clip-grad-norm", type=float)
    s.add_argument("--clip-grad-value", type=float)
    s.add_argument("--schedule", choices=SCHEDULES)
    s.add_argument("--warmup-steps", type=int)
    s.add_argument("--no-shuffle", action="store_true", help="step k uses rows k*B..k*B+B-1")
    s.add_argument("--seed", type=int)
    s.add_argument("--dtype", choices=list(DTYPES))
    s.add_argument(
        "--rounding",
        choices=ROUNDINGS,
        help="16-bit weights after a fused update: stochastic (default; unbiased, seeded by "
        "--seed) or nearest (the paper's; drops changes below half an ulp)",
    )
    s.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        help="only for sgd/adamw: fused optimizers keep no gradients to accumulate",
    )
    s.add_argument("--eval-data", help="validation data, same format")
    s.add_argument("--eval-fraction", type=float, help="or hold out this share of --data")
    s.add_argument("--eval-every", type=int, help="validate every N steps (and at the end)")
    s.add_argument("--save-every", type=int, help="checkpoint every N steps (the last always)")
    s.add_argument("--keep-checkpoints", type=int, help="keep the last K (default 2)")
    s.add_argument("--tokenizer", help="override the checkpoint's tokenizer")
    s.add_argument("--mesh", help=MESH_HELP + " (default: every visible device on fsdp)")
    s.add_argument(
        "--offload-activations",
        action="store_true",
        help="fused optimizers: keep the saved layer inputs in host memory (a GPU's pinned host "
        "memory; `lomo-jax plan --offload-activations auto` says whether a run needs it)",
    )
    g = s.add_argument_group(
        "LoRA",
        "factors beside the projections, trained by AdamW after the fused backward: with "
        "--optimizer lomo/adalomo the base trains too (the LOMO paper's hybrid), with "
        "--optimizer none it is frozen",
    )
    g.add_argument(
        "--lora-rank", type=_int(0), help="fresh factors of this rank (peft's init; 0: none)"
    )
    g.add_argument("--lora-alpha", type=float, help="scaling alpha / rank (default 2 x rank)")
    g.add_argument("--lora-targets", help="projections to adapt (default q_proj,v_proj)")
    g.add_argument("--lora-dropout", type=float, help="dropout on the LoRA path's input")
    g.add_argument("--adapter", help="start from this peft adapter directory instead")
    g.add_argument("--lora-lr", type=float, help="the factors' AdamW learning rate (5e-4)")
    g.add_argument("--lora-schedule", choices=SCHEDULES, help="default: --schedule")
    g.add_argument("--lora-warmup-steps", type=_int(0), help="default: --warmup-steps")
    g.add_argument("--lora-weight-decay", type=float, help="AdamW's decoupled decay (0)")
    g = s.add_argument_group(
        "several processes (hosts)",
        "start one process per host with the same command; jax.distributed joins them. "
        "Each flag defaults to JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID",
    )
    g.add_argument("--coordinator-address", help="HOST:PORT of process 0")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("eval", help="loss / perplexity, or SuperGLUE multiple-choice accuracy")
    s.add_argument("ckpt", help="anything from_pretrained reads")
    _rows_flags(
        s,
        data="what train takes, or a task's jsonl",
        format="loss and perplexity on this format",
        task="accuracy on copa, rte, cb, boolq, wic, wsc or multirc",
    )
    s.add_argument("--batch-size", type=_int(1), default=16)
    s.add_argument("--tokenizer", help="override the checkpoint's tokenizer")
    s.add_argument("--json", action="store_true", help='last line: {"task", "accuracy", "n"}')
    s.add_argument("--mesh", help=MESH_HELP)
    s.set_defaults(func=_cmd_eval)

    s = sub.add_parser(
        "data",
        help="show the rows training would see: tokens and loss mask",
        description="Each row's tokens as text, the tokens in the loss highlighted (or, with "
        '--json, one {"input_ids", "labels"} object per row: -100 = no loss, padding left '
        "out); what truncation cost goes to stderr.",
    )
    s.add_argument("--model", required=True, help="anything from_pretrained reads (its tokenizer)")
    _rows_flags(s, data="what train takes", format="default pretokenized")
    s.add_argument("--tokenizer", help="override the model's tokenizer")
    s.add_argument("--json", action="store_true", help="one JSON object per row")
    s.set_defaults(func=_cmd_data)

    s = sub.add_parser(
        "plan",
        help="compile one training step for a target (no GPU needed) and say if it fits",
        description="Per-device peak memory of one step, from XLA's compile-time analysis "
        "(nothing is allocated); a GPU's usable memory is 95%% of what CUDA reports (set "
        "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95: JAX takes 75%% by default).",
    )
    s.add_argument(
        "--model",
        required=True,
        help="a preset (llama3.1-8b, ...), a Hub id (its config.json alone is read) or a "
        "directory (config.json alone will do)",
    )
    s.add_argument("--target", choices=TARGETS, default="cpu")
    s.add_argument(
        "--devices", type=_int(1, MAX_DEVICES), default=1, help="shard over N devices (fsdp=N)"
    )
    s.add_argument("--batch-size", type=_int(1), default=1)
    s.add_argument("--seq-len", type=_int(1), default=1024)
    s.add_argument(
        "--max-seq-len",
        nargs="?",
        const=0,
        type=_int(1),
        metavar="LIMIT",
        help="instead of --seq-len: find the longest sequence (a multiple of 1024, up to LIMIT, "
        "by default the model's context) that fits",
    )
    s.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    s.add_argument("--optimizer", choices=OPTIMIZERS, default="adalomo")
    s.add_argument("--attention", choices=IMPLEMENTATIONS, default="auto")
    s.add_argument(
        "--mesh",
        help=MESH_HELP + " (default: fsdp=DEVICES)",
    )
    s.add_argument(
        "--offload-activations",
        nargs="?",
        const="on",
        default="off",
        choices=OFFLOAD,
        help="keep the fused step's saved layer inputs in host memory (auto: only when the "
        "step would not fit without)",
    )
    s.add_argument(
        "--lora-rank",
        type=_int(1),
        help="LoRA factors of this rank: lomo / adalomo plan the hybrid, none plain LoRA",
    )
    s.add_argument("--lora-targets", default="q_proj,v_proj", help="default q_proj,v_proj")
    s.add_argument("--json", action="store_true", help="one JSON object")
    s.set_defaults(func=_cmd_plan)

    s = sub.add_parser("demo", help="the main job on an embedded default model")
    s.add_argument("--out", default="demo_out", help="where the demo writes its files")
    s.set_defaults(func=_cmd_demo)
    return p


def _one_line(e: BaseException) -> str:
    """The error's message on one line: what would break it or the terminal (a newline or an
    escape sequence in a path) is shown escaped."""
    text = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _out_of_memory(e: Exception) -> bool:
    """An allocation the machine could not make, by numpy or by XLA."""
    if isinstance(e, MemoryError):
        return True
    return type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and str(e).startswith(
        "RESOURCE_EXHAUSTED"
    )


_PATHS = ("src", "ckpt", "out", "model", "data", "eval_data", "tokenizer", "template")
_PATHS += ("config", "resume", "from_checkpoint", "adapter")


def _check_paths(args: argparse.Namespace) -> None:
    """No path is empty (an empty path would mean the working directory)."""
    for name in _PATHS:
        if getattr(args, name, None) == "":
            raise UsageError(f"{args.command}: argument {name.replace('_', '-')}: an empty path")


def _check_text(argv: list[str]) -> None:
    """Every argument is UTF-8 text (paths, prompts and values are read as such)."""
    from lomo_jax.inputs import text_problem

    for arg in argv:
        if problem := text_problem(arg):
            raise UsageError(f"argument {problem} (paths, prompts and options must be UTF-8)")


def _interrupted(e: KeyboardInterrupt) -> tuple[str, int]:
    """What a stop on a signal kept, and the exit status (128 + the signal, as a shell does)."""
    signum = getattr(e, "signum", signal.SIGINT)
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    detail = str(e) or "stopped at once; nothing half-written was kept"
    return f"lomo-jax: interrupted ({name}) {detail}", 128 + signum


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lomo_jax.configure()  # before JAX starts and the imports allocate
    with interrupt.caught():  # before the imports, which take seconds
        try:
            cuda_plugin.import_jax()
            argv = sys.argv[1:] if argv is None else argv
            _check_text(argv)
            args = _parser().parse_args(argv)
            _check_paths(args)
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
            log.handlers[:] = [handler]
            log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
            log.propagate = False
            if args.command not in ("train", "demo"):  # only training has steps to stop between
                interrupt.act_now()
            args.func(args)
        except KeyboardInterrupt as e:
            message, status = _interrupted(e)
            print(message, file=sys.stderr)
            return status
        except (UserError, OSError) as e:
            print(f"lomo-jax: error: {_one_line(e)}", file=sys.stderr)
            return 1
        except Exception as e:
            if not _out_of_memory(e):
                raise  # a bug: its traceback says where
            first = str(e).strip().splitlines()[0] if str(e).strip() else "MemoryError"
            print(f"lomo-jax: error: out of memory ({_one_line(first)})", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
