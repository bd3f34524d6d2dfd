"""Offline batches: LLM(model_dir).generate(prompts) runs the engine until every prompt is done."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from deepflow.engine.llm_engine import LLMEngine, RequestOutput
from deepflow.engine.sampling_params import SamplingParams

Prompt = str | list[int] | dict[str, Any]
"""Text, token ids, or vLLM's {"prompt": text} / {"prompt_token_ids": ids}."""


class LLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        """``kwargs`` are EngineConfig fields (see LLMEngine.from_model)."""
        self.engine = LLMEngine.from_model(model, **kwargs)
        self._request_ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Seq[int] | None = None,
    ) -> list[RequestOutput]:
        """Outputs in the order of ``prompts``. One SamplingParams applies to all prompts, a
        list gives one each. Every prompt is validated before any is queued."""
        prompt_list = _as_prompt_list(prompts)
        count = len(prompt_list)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * count
        else:
            params_list = list(sampling_params)
        priorities = [0] * count if priority is None else list(priority)
        if len(params_list) != count or len(priorities) != count:
            raise ValueError("sampling_params and priority lists must match the prompts")
        groups = [
            self.engine.make_request(str(next(self._request_ids)), p, sp, pr, stream=False)
            for p, sp, pr in zip(prompt_list, params_list, priorities, strict=True)
        ]
        for group in groups:
            self.engine.admit(group)
        return self._run([g.request_id for g in groups], use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm)
        try:
            while len(done) < len(request_ids):
                for output in self.engine.step():
                    if output.finished:
                        done[output.request_id] = output
                        bar.update(1)
        finally:
            bar.close()
            for request_id in request_ids:  # an interrupted batch leaves nothing behind
                if request_id not in done:
                    self.engine.abort(request_id)
        return [done[r] for r in request_ids]


def _as_prompt_list(prompts: Prompt | Seq[Prompt]) -> list[str | list[int]]:
    if isinstance(prompts, str | dict) or (
        isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
    ):
        prompts = [prompts]  # type: ignore[list-item]
    out: list[str | list[int]] = []
    for prompt in prompts:  # type: ignore[union-attr]
        if isinstance(prompt, dict):
            prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
        if not isinstance(prompt, str | list):
            raise ValueError(f"a prompt must be text or a list of token ids, got {prompt!r}")
        out.append(prompt)
    return out
