"""Incremental detokenisation of one sequence, and stop strings over the text it produces.

Byte-level BPE splits a character over several tokens; decoding a half shows U+FFFD. Decoding
only the last few tokens (a window starting a little before the new ones, so that spacing rules
see their left context) and holding text back while it ends in U+FFFD gives each token's text
exactly once. A request that reads its text only at the end (LLM.generate) defers its tokens
and decodes them in one window when it finishes: the same text for any tokenizer whose decoding
of a window does not depend on where the window is cut. Stop strings are searched in the text,
so they are found across token boundaries; while streaming, the last len(longest stop) - 1
characters are held back because they may yet turn out to begin a stop string.
"""

from __future__ import annotations

from typing import Protocol

from deepflow.engine.sampling_params import SamplingParams

REPLACEMENT_CHAR = "\ufffd"
_PROMPT_CONTEXT = 5
"""Prompt tokens decoded as left context of the first output token."""


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop_strings = params.stop_strings
        self.include_stop_str = params.include_stop_str_in_output
        self._holdback = max((len(s) for s in self.stop_strings), default=1) - 1
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""
        """All output text so far (cut at a stop string once one is found)."""
        self._emitted = 0
        self._deferred: list[int] = []

    def defer(self, token_id: int) -> None:
        """Keep a token for catch_up (nobody reads the text before the sequence ends)."""
        self._deferred.append(token_id)

    def catch_up(self) -> None:
        """Decode the deferred tokens as one window (as add_token would one by one)."""
        if not self._deferred:
            return
        self._ids += self._deferred
        self._deferred = []
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT_CHAR):
            self.text += full[len(prefix) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)

    def add_token(self, token_id: int) -> str:
        """Append one token; return the text it completed (may be empty)."""
        prefix_ids, full_ids = self.window(token_id)
        return self.accept(self._decode(prefix_ids), self._decode(full_ids))

    def window(self, token_id: int) -> tuple[list[int], list[int]]:
        """add_token in two halves, so that many sequences' windows decode in one call: append
        the token and return the two windows whose decoded text `accept` takes."""
        self._ids.append(token_id)
        return self._ids[self._prefix_offset : self._read_offset], self._ids[self._prefix_offset :]

    def accept(self, prefix: str, full: str) -> str:
        """The text the token of the last window() completed (may be empty)."""
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT_CHAR):
            return ""
        new = full[len(prefix) :]
        self.text += new
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new

    def flush(self) -> None:
        """The sequence ended: whatever is held back (an incomplete character) becomes text."""
        self.catch_up()
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix):
            self.text += full[len(prefix) :]
        self._prefix_offset = self._read_offset = len(self._ids)

    def find_stop(self, num_new_chars: int) -> str | None:
        """Look for a stop string ending in the last ``num_new_chars`` characters; on a match,
        cut the text just before it (just after, if include_stop_str_in_output)."""
        if not num_new_chars or not self.stop_strings:
            return None
        found: tuple[int, str] | None = None
        old_len = len(self.text) - num_new_chars
        for stop in self.stop_strings:
            at = self.text.find(stop, max(0, old_len - len(stop) + 1))
            if at != -1 and (found is None or at < found[0]):
                found = (at, stop)
        if found is None:
            return None
        at, stop = found
        self.text = self.text[: at + len(stop) if self.include_stop_str else at]
        return stop

    @property
    def emitted_text(self) -> str:
        """The text handed out so far by take_delta."""
        return self.text[: self._emitted]

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out, less what might still become part of a stop string."""
        end = len(self.text) if finished else max(self._emitted, len(self.text) - self._holdback)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def decode_windows(
    tokenizer: Decoder, windows: list[list[int]], skip_special_tokens: list[bool]
) -> list[str]:
    """Each window decoded (with its own skip flag), through decode_batch where the tokenizer
    has one: one call per step instead of two per sequence."""
    batch = getattr(tokenizer, "decode_batch", None)
    if batch is None:
        return [
            tokenizer.decode(w, skip) for w, skip in zip(windows, skip_special_tokens, strict=True)
        ]
    out: list[str] = [""] * len(windows)
    for flag in (True, False):
        rows = [i for i, skip in enumerate(skip_special_tokens) if skip is flag]
        if rows:
            for i, text in zip(rows, batch([windows[i] for i in rows], flag), strict=True):
                out[i] = text
    return out
