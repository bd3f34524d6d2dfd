"""The command line of `deepflow serve` (and `python -m deepflow.engine.daemon`), in vLLM's
spelling, so that a vLLM user's ``vllm serve MODEL ...`` runs unchanged as ``deepflow serve``.

Every vLLM flag taken here maps onto an EngineConfig field or a daemon setting, and its help
says what it does here. A vLLM flag that would mean nothing here is refused by name rather
than silently ignored, except the few that ask for what this server already does (listed in
their own help group). Every usage error is one line on stderr and exit status 2. As in vLLM,
``--max_model_len`` is ``--max-model-len`` and token counts take k/m/g (powers of 1000) or
K/M/G (of 1024) suffixes.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from decimal import Decimal, InvalidOperation
from typing import Any, NoReturn

from deepflow.engine.config import EngineConfig

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8100
DEFAULT_MAX_WAITING = 1024
DEFAULT_DRAIN_TIMEOUT_S = 30.0
_ENGINE: dict[str, Any] = {f.name: f.default for f in fields(EngineConfig)}
_DTYPES = {"half": "float16", "float": "float32"}
"""vLLM's dtype aliases."""
_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}
# vLLM flags that would mean nothing here: named as such in the refusal, not as typos.
# fmt: off
_VLLM_ONLY = frozenset({
    "--quantization", "-q", "--kv-cache-dtype", "--pipeline-parallel-size", "-pp",
    "--data-parallel-size", "-dp", "--enable-expert-parallel", "--distributed-executor-backend",
    "--enable-lora", "--lora-modules", "--max-loras", "--max-lora-rank", "--speculative-config",
    "--kv-transfer-config", "--kv-events-config", "--tokenizer", "--tokenizer-mode", "--revision",
    "--download-dir", "--load-format", "--chat-template", "--swap-space", "--cpu-offload-gb",
    "--enable-auto-tool-choice", "--tool-call-parser", "--reasoning-parser",
    "--limit-mm-per-prompt", "--compilation-config", "-O", "--config", "--generation-config",
    "--override-generation-config", "--max-logprobs", "--hf-overrides", "--task", "--runner",
    "--ssl-keyfile", "--ssl-certfile", "--root-path", "--allowed-origins", "--enable-sleep-mode",
    "--structured-outputs-config", "--guided-decoding-backend", "--disable-custom-all-reduce",
})
# fmt: on
# The engine options, in EngineConfig's names: what `engine_options` hands the engine.
_ENGINE_DESTS = (
    "dtype",
    "device",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "block_size",
    "num_kv_blocks",
    "kv_cache_memory_fraction",
    "enable_prefix_caching",
    "enable_chunked_prefill",
    "enforce_eager",
    "seed",
    "tensor_parallel_size",
)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, and which names an unknown flag itself."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")

    def refuse(self, extras: list[str]) -> NoReturn:
        flag = next((a.partition("=")[0] for a in extras if a.startswith("-")), None)
        if flag is None:
            self.error(f"unexpected argument {extras[0]!r} (see {self.prog} --help)")
        if flag in _VLLM_ONLY or flag.startswith("-O"):
            self.error(
                f"{flag} is a vLLM option that {self.prog} does not support "
                f"(see {self.prog} --help)"
            )
        close = difflib.get_close_matches(flag, self._option_string_actions, n=1)
        hint = f"did you mean {close[0]}?" if close else f"see {self.prog} --help"
        self.error(f"unknown option {flag} ({hint})")


def _tokens(text: str) -> int:
    """A token count as vLLM writes it: 4096, 4k (4000), 4K (4096), 1.5k."""
    scale = _SUFFIXES.get(text[-1:], 1)
    try:
        value = Decimal(text[:-1] if scale > 1 else text) * scale
    except InvalidOperation:
        value = Decimal(0)
    if value < 1 or value != value.to_integral_value():
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number of tokens")
    return int(value)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _build_parser(prog: str) -> _Parser:
    parser = _Parser(
        prog=prog,
        description="FlowServe: one model behind OpenAI's API. Takes vLLM's `vllm serve` flags "
        "where they mean something here.",
        allow_abbrev=False,
    )
    parser.add_argument("model_tag", nargs="?", metavar="MODEL", help="a Hugging Face model folder")
    parser.add_argument("--model", default=None, help="the same as MODEL (vLLM's older form)")
    _add_server_options(parser.add_argument_group("server").add_argument)
    _add_engine_options(parser.add_argument_group("engine").add_argument)
    no_ops = parser.add_argument_group(
        "vLLM flags that change nothing here",
        "accepted so that vLLM's command lines run: what each asks for is so here already",
    )
    _add_no_ops(no_ops.add_argument)
    return parser


def _add_server_options(add: Callable[..., Any]) -> None:
    add(
        "--host",
        default=DEFAULT_HOST,
        help="address to listen on (default: %(default)s; vLLM's is every address: --host 0.0.0.0)",
    )
    add(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="0 picks a free port, which the ready line and report name (default: %(default)s)",
    )
    add(
        "--api-key",
        nargs="+",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' (any of the keys) on the /v1 routes and "
        "/drain; /health and /metrics stay open (default: no key)",
    )
    add(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="the model id clients ask for and responses carry; further names are accepted "
        "too (default: the model folder's name)",
    )
    add(
        "--max-waiting",
        type=_positive,
        default=DEFAULT_MAX_WAITING,
        help="requests queued without a first token above which new ones get 429 "
        "(default: %(default)s)",
    )
    add(
        "--drain-timeout",
        type=float,
        default=DEFAULT_DRAIN_TIMEOUT_S,
        help="seconds open requests get to finish after SIGTERM or POST /drain "
        "(default: %(default)s)",
    )
    add(
        "--ready-fd",
        type=int,
        default=None,
        metavar="N",
        help="an inherited pipe: once serving, write one JSON line (url, host, port, pid, "
        "model) to it and close it; for launchers (default: none)",
    )
    add(
        "--log-level",
        "--uvicorn-log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn's log level (default: %(default)s)",
    )


def _add_engine_options(add: Callable[..., Any]) -> None:
    add(
        "--dtype",
        default=_ENGINE["dtype"],
        choices=["auto", "half", "float16", "bfloat16", "float", "float32"],
        help="weights and KV cache; half is float16, float is float32; auto: the model's "
        "dtype on an accelerator, float32 on the CPU (default: %(default)s)",
    )
    add("--device", default=None, help="cpu, cuda, cuda:1, npu ... (default: the best there is)")
    add(
        "--max-model-len",
        type=_tokens,
        default=None,
        help="longest prompt + output in tokens (default: the model's max_position_embeddings)",
    )
    add(
        "--max-num-seqs",
        type=_positive,
        default=_ENGINE["max_num_seqs"],
        help="most sequences in one engine step (default: %(default)s)",
    )
    add(
        "--max-num-batched-tokens",
        type=_tokens,
        default=_ENGINE["max_num_batched_tokens"],
        help="tokens per engine step, prefill chunks and decodes together (default: %(default)s)",
    )
    add(
        "--block-size",
        type=_positive,
        default=_ENGINE["block_size"],
        help="tokens per KV-cache block (default: %(default)s)",
    )
    add(
        "--gpu-memory-utilization",
        dest="kv_cache_memory_fraction",
        type=_fraction,
        metavar="FRACTION",
        default=_ENGINE["kv_cache_memory_fraction"],
        help="on an accelerator, the fraction of the memory still free after loading the "
        "weights and profiling a step that the KV cache takes (vLLM's fraction counts the whole "
        f"device); ignored on the CPU, where the KV cache takes {_ENGINE['kv_cache_bytes'] >> 20} "
        "MiB (default: %(default)s)",
    )
    add(
        "--num-kv-blocks",
        type=_positive,
        default=None,
        help="exact KV-cache size in blocks, over --gpu-memory-utilization (default: from memory)",
    )
    add(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=_ENGINE["enable_prefix_caching"],
        help="reuse the KV blocks of a prompt's prefix that an earlier request computed "
        "(default: %(default)s)",
    )
    add(
        "--enable-chunked-prefill",
        action=argparse.BooleanOptionalAction,
        default=_ENGINE["enable_chunked_prefill"],
        help="split long prompts over steps; off, a prompt longer than "
        "--max-num-batched-tokens is refused (default: %(default)s)",
    )
    add(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=_ENGINE["enforce_eager"],
        help="never replay captured decode graphs (only CUDA with the Triton kernels captures "
        "them; the CPU always runs eagerly) (default: %(default)s)",
    )
    add(
        "--seed",
        type=int,
        default=_ENGINE["seed"],
        help="seeds the sampling of requests that bring no seed of their own "
        "(default: %(default)s)",
    )
    add(
        "--tensor-parallel-size",
        "-tp",
        type=_positive,
        metavar="N",
        default=_ENGINE["tensor_parallel_size"],
        help="ranks the model is split over, one process and device each (devices from "
        "--device's index on; on the CPU the ranks share it) (default: %(default)s)",
    )


def _add_no_ops(add: Callable[..., Any]) -> None:
    add(
        "--trust-remote-code",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="deepflow runs its own model code, never a model folder's",
    )
    add("--disable-log-requests", action="store_true", help="requests are never logged here")
    add(
        "--disable-log-stats",
        action="store_true",
        help="no stats are logged here; GET /metrics has them",
    )


def _dashes(arg: str) -> str:
    """vLLM's ``--max_model_len=8k`` is ``--max-model-len=8k``."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg.partition("=")
    return name.replace("_", "-") + eq + value


def parse_args(argv: Sequence[str] | None, prog: str = "deepflow serve") -> argparse.Namespace:
    """The daemon's options; exits 2 with one line on stderr for anything not taken. The
    model is ``args.model``, whether given as MODEL or as --model."""
    parser = _build_parser(prog)
    given = sys.argv[1:] if argv is None else argv
    args, extras = parser.parse_known_args([_dashes(arg) for arg in given])
    if extras:
        parser.refuse(extras)
    if args.model_tag and args.model and args.model_tag != args.model:
        parser.error(f"MODEL ({args.model_tag}) and --model ({args.model}) differ")
    args.model = args.model_tag or args.model
    if not args.model:
        parser.error(f"no model: give a model folder ({prog} MODEL or --model MODEL)")
    return args


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig fields the command line sets (an unset one keeps its default)."""
    options = {name: getattr(args, name) for name in _ENGINE_DESTS}
    options["dtype"] = _DTYPES.get(options["dtype"], options["dtype"])
    return {name: value for name, value in options.items() if value is not None}
