"""A client that leaves aborts its request and frees its KV blocks; /metrics adds up to the
usage clients saw. Against the shared `deepflow serve` process."""

from __future__ import annotations

import openai
import pytest
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionMessageParam

from .conftest import Daemon

pytestmark = pytest.mark.timeout(120)
PROMPT = "Once upon a time"
MODEL = (("model_name", "tiny"),)
LONG = 2000  # max_tokens: seconds of decoding, alone
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0)


def reasons(metrics: dict, reason: str) -> float:
    return metrics[("flowserve:request_success_total", (("finished_reason", reason), *MODEL))]


def test_client_gone_mid_stream_aborts_and_frees_blocks(
    client: openai.OpenAI, daemon: Daemon
) -> None:
    daemon.wait_idle()
    before = daemon.metrics()
    stream = client.completions.create(
        model="tiny", prompt=PROMPT, stream=True, max_tokens=LONG, extra_body=NO_EOS
    )
    for received, _ in enumerate(stream, 1):
        if received == 3:
            break
    busy = daemon.health().json()
    assert busy["running"] == 1 and busy["kv_cache_usage"] > 0
    stream.close()
    daemon.wait_idle(timeout=3)  # running 0, waiting 0, no KV block in use
    after = daemon.metrics()
    generated = after[("flowserve:generation_tokens_total", MODEL)]
    generated -= before[("flowserve:generation_tokens_total", MODEL)]
    assert 3 <= generated < 1000, "the request ran on after its client left"
    assert reasons(after, "abort") - reasons(before, "abort") == 1
    assert reasons(after, "length") == reasons(before, "length")


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_client_timing_out_aborts_a_non_streamed_request(
    client: openai.OpenAI, daemon: Daemon, kind: str
) -> None:
    daemon.wait_idle()
    before = daemon.metrics()
    impatient = client.with_options(timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        if kind == "completion":
            impatient.completions.create(
                model="tiny", prompt=PROMPT, max_tokens=LONG, extra_body=NO_EOS
            )
        else:
            impatient.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": PROMPT}],
                max_tokens=LONG,
                extra_body=NO_EOS,
            )
    daemon.wait_idle(timeout=3)
    after = daemon.metrics()
    assert reasons(after, "abort") - reasons(before, "abort") == 1
    assert reasons(after, "length") == reasons(before, "length"), "it ran to the end"


def test_metrics_add_up_to_the_usage_clients_saw(client: openai.OpenAI, daemon: Daemon) -> None:
    daemon.wait_idle()
    before = daemon.metrics()
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something."}]
    usages: list[CompletionUsage | None] = []
    several = client.completions.create(
        model="tiny", prompt=[PROMPT, "Hello there"], n=2, max_tokens=5, seed=1
    )
    usages.append(several.usage)
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=7)
    usages.append(chat.usage)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=9,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usages.append(chunks[-1].usage)
    requests = 2 + 1 + 1  # every prompt is one engine request
    daemon.wait_idle()
    after = daemon.metrics()

    def delta(name: str, labels: tuple = MODEL) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    seen = [u for u in usages if u is not None]
    assert len(seen) == len(usages)
    assert delta("flowserve:prompt_tokens_total") == sum(u.prompt_tokens for u in seen)
    assert delta("flowserve:generation_tokens_total") == sum(u.completion_tokens for u in seen)
    finished = sum(reasons(after, r) - reasons(before, r) for r in ("stop", "length"))
    assert finished == requests
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert delta(f"flowserve:{histogram}_count") == requests
        assert delta(f"flowserve:{histogram}_sum") > 0
    assert 0 < delta("flowserve:time_per_output_token_seconds_count") <= requests
    assert delta("flowserve:inter_token_latency_seconds_count") > 0
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert after[(f"flowserve:{gauge}", MODEL)] == 0
    assert ("flowserve:num_preemptions_total", MODEL) in after
    assert all(dict(labels).get("model_name") == "tiny" for _, labels in after)
