"""How one request is sampled and when it stops; every field is checked on construction."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SamplingParams:
    """vLLM's field names and meanings, so its users need not learn new ones.

    Logprobs (``logprobs=N``) are vLLM's default ("raw") convention: log-softmax of the
    model's own logits, before penalties, temperature and top-k/top-p/min-p. Each generated
    token gets the chosen token plus the N most likely ones; N=0 gives the chosen token only.
    """

    n: int = 1
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1 turns it off."""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    """Over prompt and output: positive logits are divided by it, negative ones multiplied."""
    presence_penalty: float = 0.0
    """Over the output: subtracted once from every token already generated."""
    frequency_penalty: float = 0.0
    """Over the output: subtracted once per earlier occurrence."""
    seed: int | None = None
    """Same seed, same output, whatever else shares the batch."""
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    """None: until the context (max_model_len) is full."""
    min_tokens: int = 0
    """No EOS, stop token or stop string ends the output before this many tokens."""
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    """Not supported yet (the runner returns logits for last positions only): must be None."""
    skip_special_tokens: bool = True
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._check_numbers()
        self.stop_strings = _as_stop_strings(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if not isinstance(self.stop_token_ids, list | tuple) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError("stop_token_ids must be a list of non-negative ints")
        self.stop_token_ids = list(self.stop_token_ids)

    def _check_numbers(self) -> None:
        checks = [
            (_is_int(self.n) and self.n >= 1, f"n must be an int >= 1, got {self.n!r}"),
            (_is_real(self.temperature) and self.temperature >= 0,
             f"temperature must be >= 0, got {self.temperature!r}"),
            (_is_real(self.top_p) and 0 < self.top_p <= 1,
             f"top_p must be in (0, 1], got {self.top_p!r}"),
            (_is_int(self.top_k) and self.top_k >= -1,
             f"top_k must be -1, 0 (off) or a positive int, got {self.top_k!r}"),
            (_is_real(self.min_p) and 0 <= self.min_p <= 1,
             f"min_p must be in [0, 1], got {self.min_p!r}"),
            (_is_real(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty!r}"),
            (_is_real(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}"),
            (_is_real(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}"),
            (self.seed is None or _is_int(self.seed), f"seed must be an int, got {self.seed!r}"),
            (self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
             f"max_tokens must be an int >= 1 or None, got {self.max_tokens!r}"),
            (_is_int(self.min_tokens) and self.min_tokens >= 0,
             f"min_tokens must be an int >= 0, got {self.min_tokens!r}"),
            (self.max_tokens is None or not _is_int(self.min_tokens)
             or self.min_tokens <= self.max_tokens,
             f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"),
            (self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0),
             f"logprobs must be an int >= 0 or None, got {self.logprobs!r}"),
            (self.prompt_logprobs is None, "prompt_logprobs is not supported yet"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _as_stop_strings(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a str or a list of str, got {stop!r}")
    if any(s == "" for s in stop):
        raise ValueError("stop strings must not be empty")
    return tuple(stop)
