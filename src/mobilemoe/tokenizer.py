"""Tokenizers: train a byte-level BPE with HF `tokenizers`, or load any HF tokenizer.json / directory.

Chat format of the tokenizers we train (documented in docs/data.md): every message is
    <|im_start|>{role}\n{content}<|im_end|>\n
and generation starts after `<|im_start|>assistant\n`. A tokenizer that came with a model (an imported
GGUF or HF directory) keeps that model's own Jinja chat template and special tokens in
tokenizer_config.json next to tokenizer.json, and conversations are rendered through it as transformers
does. Either way training takes loss only on assistant content and its closing end-of-turn token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from mobilemoe.errors import MobileMoEError
from mobilemoe.io import atomic_file, atomic_write_json

EOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]
# Our chat format as a Jinja template: what exports write for a tokenizer we trained. `encode_chat` encodes
# that format piece by piece (the same ids), so prepared data never depends on the template engine.
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                   "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")
# tokenizer_config.json fields kept from a model's tokenizer (transformers' names; eot_token is llama.cpp's).
CONFIG_FIELDS = ("chat_template", "bos_token", "eos_token", "eot_token", "pad_token", "add_bos_token")


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the ids and chat rendering the pipeline needs."""

    def __init__(self, hf: HFTokenizer, source: str = "<memory>", config: dict[str, Any] | None = None):
        """`config`: the CONFIG_FIELDS of a tokenizer that came with a model (its chat template and special tokens)."""
        self.hf = hf
        self.source = source
        self.config = {k: v for k, v in (config or {}).items() if k in CONFIG_FIELDS and v is not None}
        vocab = hf.get_vocab(with_added_tokens=True)
        eos = next((t for t in (EOS, "<|end_of_text|>", "</s>", "<eos>") if t in vocab), None)
        if eos is None:
            raise MobileMoEError(f"tokenizer {source} has no end-of-text token ({EOS}, <|end_of_text|>, </s> or "
                                 "<eos>); retrain it with `mobilemoe data prepare` or pass a tokenizer that has one")
        self.eos_id = vocab[eos]
        self.im_start_id = vocab.get(IM_START)
        self.im_end_id = vocab.get(IM_END)
        # The BOS a sequence starts with when the model's tokenizer_config asks for one (add_bos_token), as
        # transformers' tokenizer(text) and llama.cpp prepend it; None for SmolLM2 and for tokenizers we train.
        self.bos_id = self.named_ids().get("bos_token") if self.config.get("add_bos_token") else None
        if self.config.get("add_bos_token") and self.bos_id is None:
            raise MobileMoEError(f"tokenizer {source} asks for a BOS token (add_bos_token) but names none in its "
                                 "vocabulary (bos_token); fix its tokenizer_config.json")

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, start: bool = False) -> list[int]:
        """Token ids of `text`; `start`: it begins a sequence, so the model's BOS (if it wants one) comes first."""
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if start and self.bos_id is not None else ids

    def encode_batch(self, texts: Sequence[str], start: bool = False) -> list[list[int]]:
        bos = [self.bos_id] if start and self.bos_id is not None else []
        return [bos + e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def named_ids(self) -> dict[str, int]:
        """Ids of the special tokens the model's tokenizer_config names (bos_token, eos_token, eot_token, pad_token)."""
        named = {k: v for k, v in self.config.items() if k.endswith("_token") and isinstance(v, str)}
        return {k: i for k, v in named.items() if (i := self.hf.token_to_id(v)) is not None}

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    @property
    def chat_template(self) -> str:
        """The model's own Jinja chat template, else our ChatML format."""
        return self.config.get("chat_template") or CHATML_TEMPLATE

    def stop_ids(self) -> set[int]:
        """End of text, end of turn, and the model's own eos/eot tokens."""
        named = self.named_ids()
        ends = (self.eos_id, self.im_end_id, named.get("eos_token"), named.get("eot_token"))
        return {i for i in ends if i is not None}

    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation as text through the chat template (transformers' sandboxed Jinja renderer)."""
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template(conversations=[list(messages)], chat_template=self.chat_template,
                                                add_generation_prompt=add_generation_prompt)
        except Exception as err:  # jinja2 template errors, raise_exception() in the template
            raise MobileMoEError(f"the chat template of {self.source} failed on this conversation: {err}") from None
        return rendered[0]

    def encode_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation and a mask that is True on tokens trained on (assistant turns)."""
        return self.encode_chat_batch([messages], add_generation_prompt)[0]

    def encode_chat_batch(self, conversations: Sequence[Sequence[dict[str, str]]],
                          add_generation_prompt: bool = False) -> list[tuple[list[int], list[bool]]]:
        """`encode_chat` of many conversations, with every role header and content encoded in one batch (the
        same ids as one call per piece: each piece is encoded on its own either way)."""
        if "chat_template" in self.config:
            return [self._encode_templated(m, add_generation_prompt) for m in conversations]
        if self.im_start_id is None or self.im_end_id is None:
            raise MobileMoEError(f"tokenizer {self.source} has no chat tokens {IM_START}/{IM_END}; "
                                 "train one with `mobilemoe data prepare` (it adds them)")
        pieces = [text for messages in conversations for m in messages for text in (m["role"] + "\n", m["content"])]
        encoded = iter(self.encode_batch(pieces))
        newline = self.encode("\n")
        generation_head = [self.im_start_id, *self.encode("assistant\n")] if add_generation_prompt else []
        out = []
        for messages in conversations:
            ids: list[int] = []
            mask: list[bool] = []
            for m in messages:
                head = [self.im_start_id, *next(encoded)]
                body = [*next(encoded), self.im_end_id]
                train = m["role"] == "assistant"
                ids += head + body + newline
                mask += [False] * len(head) + [train] * len(body) + [False] * len(newline)
            ids += generation_head
            mask += [False] * len(generation_head)
            out.append((ids, mask))
        return out

    def _encode_templated(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool
                          ) -> tuple[list[int], list[bool]]:
        """Ids of the rendered conversation; the mask covers each assistant message from its content to its end of
        turn, found by rendering the conversation prefix by prefix (templates may add text, e.g. a system prompt)."""
        text = self.render_chat(messages, add_generation_prompt)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, through = self.render_chat(messages[:i]) if i else "", self.render_chat(messages[: i + 1])
            start = through.find(m["content"], len(before))
            if not (through.startswith(before) and text.startswith(through)) or start < 0:
                raise MobileMoEError(f"the chat template of {self.source} does not render a conversation as the "
                                     "sum of its turns, so assistant turns cannot be found for the loss mask")
            spans.append((start, max(start + len(m["content"]), len(through.rstrip()))))
        encoding = self.hf.encode(text, add_special_tokens=False)
        mask = [any(lo <= a < hi for lo, hi in spans) for a, _ in encoding.offsets]
        return encoding.ids, mask

    def save(self, path: str | Path) -> None:
        """tokenizer.json at `path`; the chat template and special tokens (if any) in tokenizer_config.json."""
        with atomic_file(path) as tmp:
            self.hf.save(str(tmp))
        if self.config:
            atomic_write_json(Path(path).with_name("tokenizer_config.json"), self.config)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json`, or a directory holding one (e.g. a Llama-3 tokenizer directory)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise MobileMoEError(f"no tokenizer at {path}: expected a tokenizer.json file or a directory with one")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises plain Exception on malformed JSON
            raise MobileMoEError(f"{file} is not a valid HF tokenizer.json: {err}") from None
        config_file = file.with_name("tokenizer_config.json")
        try:
            config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise MobileMoEError(f"{config_file} is not valid JSON ({err}); fix or delete it") from None
        # transformers writes special tokens either as strings or as {"content": ...} objects
        config = {k: v["content"] if isinstance(v, dict) else v for k, v in config.items()}
        return cls(hf, source=str(file), config=config)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2 style: no unknown tokens) with our end-of-text and chat special tokens."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts, trainer)
    return Tokenizer(hf, source=f"<bpe {vocab_size}>")
