"""`deepflow serve` takes a vLLM user's command line: the flags that mean something here,
an API key, one-line refusals of the rest, and OpenAI-shaped 404s for routes not served."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from deepflow.engine.daemon.options import engine_options, parse_args

from .conftest import Daemon, serve_command, start_daemon

pytestmark = pytest.mark.timeout(120)
KEY = "sk-test"
VLLM_FLAGS = [
    "--served-model-name", "tiny", "tiny-alias",
    "--max-model-len", "512",
    "--max-num-seqs", "8",
    "--max-num-batched-tokens", "256",
    "--enforce-eager",
    "--enable-prefix-caching",
    "--seed", "0",
    "--dtype", "float32",
    "--gpu-memory-utilization", "0.5",
    "--tensor-parallel-size", "1",
    "--api-key", KEY,
]  # fmt: skip
SERVED = "/v1/completions, /v1/chat/completions, /v1/models, /v1/models/{model}"


@pytest.fixture(scope="module")
def vllm_daemon(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    log = tmp_path_factory.mktemp("vllm_daemon") / "deploy.log"
    daemon = start_daemon(serve_command(tiny_model, *VLLM_FLAGS), log)
    yield daemon
    assert daemon.stop() == 0, log.read_text(errors="replace")


def _serve(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deepflow.cli", "serve", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_openai_client_with_the_key_gets_answers(vllm_daemon: Daemon) -> None:
    client = openai.OpenAI(base_url=f"{vllm_daemon.url}/v1", api_key=KEY, max_retries=0)
    models = list(client.models.list())
    assert [m.id for m in models] == ["tiny", "tiny-alias"]
    assert (models[0].model_extra or {})["max_model_len"] == 512
    done = client.completions.create(model="tiny-alias", prompt="Once upon", max_tokens=5)
    assert done.model == "tiny" and done.usage is not None and done.usage.completion_tokens >= 1
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5
    )
    assert chat.choices[0].message.role == "assistant"


def test_without_the_key_v1_is_401_and_health_is_open(vllm_daemon: Daemon) -> None:
    wrong = openai.OpenAI(base_url=f"{vllm_daemon.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.completions.create(model="tiny", prompt="Once upon", max_tokens=5)
    assert refused.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    bare = httpx.post(f"{vllm_daemon.url}/v1/chat/completions", json={}, timeout=10)
    assert bare.status_code == 401
    error = bare.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == "missing_api_key"
    assert httpx.post(f"{vllm_daemon.url}/drain", timeout=10).status_code == 401
    assert vllm_daemon.health().status_code == 200


def test_routes_not_served_are_404s_naming_what_is(vllm_daemon: Daemon) -> None:
    client = openai.OpenAI(base_url=f"{vllm_daemon.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="tiny", input="hello")
    assert f"POST /v1/embeddings is not served here; this server serves {SERVED}" in str(
        missing.value
    )
    headers = {"Authorization": f"Bearer {KEY}"}
    for method, path in [("GET", "/v1/foo"), ("POST", "/v1/audio/transcriptions")]:
        got = httpx.request(method, f"{vllm_daemon.url}{path}", headers=headers, timeout=10)
        assert got.status_code == 404
        assert got.json()["error"] == {
            "message": f"{method} {path} is not served here; this server serves {SERVED}",
            "type": "invalid_request_error",
            "param": None,
            "code": "not_found",
        }
    wrong_method = httpx.get(f"{vllm_daemon.url}/v1/completions", headers=headers, timeout=10)
    assert wrong_method.status_code == 405


def test_each_vllm_flag_maps_onto_the_engine(tiny_model: Path) -> None:
    args = parse_args([str(tiny_model), *VLLM_FLAGS, "--block-size", "32", "-tp", "2"])
    assert args.model == str(tiny_model) and args.served_model_name == ["tiny", "tiny-alias"]
    assert args.api_key == [KEY]
    assert engine_options(args) == {
        "max_model_len": 512,
        "max_num_seqs": 8,
        "max_num_batched_tokens": 256,
        "enforce_eager": True,
        "enable_prefix_caching": True,
        "enable_chunked_prefill": True,
        "seed": 0,
        "dtype": "float32",
        "kv_cache_memory_fraction": 0.5,
        "tensor_parallel_size": 2,
        "block_size": 32,
    }


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--max_model_len=4k", "--dtype", "half"], {"max_model_len": 4000, "dtype": "float16"}),
        (["--max-model-len", "2K", "--no-enable-prefix-caching"], {"max_model_len": 2048}),
        (["--max-num-batched-tokens", "1.5k"], {"max_num_batched_tokens": 1500}),
    ],
)
def test_vllm_spellings(tiny_model: Path, argv: list[str], expected: dict[str, object]) -> None:
    options = engine_options(parse_args(["--model", str(tiny_model), *argv]))
    assert expected.items() <= options.items()
    assert options["enable_prefix_caching"] == ("--no-enable-prefix-caching" not in argv)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--kv-transfer-config", "{}"],
            "deepflow serve: --kv-transfer-config is a vLLM option that deepflow serve does "
            "not support (see deepflow serve --help)",
        ),
        (
            ["--max-num-seq=8"],
            "deepflow serve: unknown option --max-num-seq (did you mean --max-num-seqs?)",
        ),
        (
            ["--frobnicate"],
            "deepflow serve: unknown option --frobnicate (see deepflow serve --help)",
        ),
        (
            ["--gpu-memory-utilization", "1.5"],
            "deepflow serve: argument --gpu-memory-utilization: 1.5 is not in (0, 1]",
        ),
    ],
)
def test_a_flag_not_taken_is_one_line_and_status_2(
    tiny_model: Path, argv: list[str], message: str
) -> None:
    done = _serve(str(tiny_model), "--served-model-name", "tiny", *argv)
    assert done.returncode == 2
    assert done.stderr == message + "\n"


def test_a_model_is_required_and_help_shows_every_option_with_its_default() -> None:
    missing = _serve("--seed", "1")
    assert missing.returncode == 2
    assert missing.stderr == (
        "deepflow serve: no model: give a model folder (deepflow serve MODEL or --model MODEL)\n"
    )
    shown = _serve("--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage: deepflow serve")
    for flag in ("--tensor-parallel-size", "--no-enable-prefix-caching", "--api-key"):
        assert flag in shown.stdout
    assert "(default: 0.9)" in shown.stdout and "(default: 256)" in shown.stdout
