"""`Tokenizer`: a Hugging Face tokenizer folder read with `tokenizers` and jinja2 alone.

tokenizer.json carries the pipeline (including whether a BOS is added); tokenizer_config.json
carries the special tokens and the chat template (or chat_template.jinja beside it).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer


def _token_text(value: Any) -> str | None:
    """Special tokens are stored as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _load_template(folder: Path, config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    jinja_file = folder / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text()
    return template


class Tokenizer:
    def __init__(
        self,
        tokenizer: HFTokenizer,
        config: dict[str, Any],
        chat_template: str | None,
        extra_eos_ids: list[int] | None = None,
    ) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        self.bos_token_id = self._id(self.bos_token)
        self.pad_token_id = self._id(self.pad_token)
        eos = [self._id(self.eos_token), *(extra_eos_ids or [])]
        self.eos_token_ids: list[int] = list(dict.fromkeys(i for i in eos if i is not None))
        self._env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._env.filters["tojson"] = lambda x, indent=None: json.dumps(x, indent=indent)
        self._env.globals["raise_exception"] = _raise
        self._env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template: jinja2.Template | None = None

    def longest_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes of text one token stands for: the longest
        vocabulary spelling (byte-level and SentencePiece spellings are never shorter than
        the text they stand for). Text over ``max_model_len`` times this cannot fit."""
        vocab = self._tok.get_vocab(with_added_tokens=True)
        return max((len(t.encode("utf-8", "surrogatepass")) for t in vocab), default=1)

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.json")
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        extra: list[int] = []
        generation = folder / "generation_config.json"
        if generation.is_file():
            ids = json.loads(generation.read_text()).get("eos_token_id")
            extra = [] if ids is None else list(ids) if isinstance(ids, list) else [ids]
        return cls(
            HFTokenizer.from_file(str(tokenizer_file)),
            config,
            _load_template(folder, config),
            extra,
        )

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer knows, added ones included (the model's vocab may be larger)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text`` (no special tokens added) and each one's character span in it."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # Ids past the tokenizer's vocab (a padded model vocab) decode to nothing.
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        """decode() of each list, in one call."""
        return self._tok.decode_batch(batch, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The prompt text. It may already hold the BOS: encode it with add_special_tokens=False."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        if self._template is None:
            self._template = self._env.from_string(self.chat_template)
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )
