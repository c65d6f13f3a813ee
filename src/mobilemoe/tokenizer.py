"""Tokenizers: train a byte-level BPE with HF `tokenizers`, or load any HF tokenizer.json / directory.

Chat template (documented in docs/data.md): every message is
    <|im_start|>{role}\n{content}<|im_end|>\n
and generation starts after `<|im_start|>assistant\n`. Training takes loss only on assistant content and
its closing `<|im_end|>`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from mobilemoe.errors import MobileMoEError
from mobilemoe.io import atomic_file

EOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the ids and chat rendering the pipeline needs."""

    def __init__(self, hf: HFTokenizer, source: str = "<memory>"):
        self.hf = hf
        self.source = source
        vocab = hf.get_vocab(with_added_tokens=True)
        eos = next((t for t in (EOS, "<|end_of_text|>", "</s>", "<eos>") if t in vocab), None)
        if eos is None:
            raise MobileMoEError(f"tokenizer {source} has no end-of-text token ({EOS}, <|end_of_text|>, </s> or "
                                 "<eos>); retrain it with `mobilemoe data prepare` or pass a tokenizer that has one")
        self.eos_id = vocab[eos]
        self.im_start_id = vocab.get(IM_START)
        self.im_end_id = vocab.get(IM_END)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def stop_ids(self) -> set[int]:
        return {i for i in (self.eos_id, self.im_end_id) if i is not None}

    def encode_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation and a mask that is True on tokens trained on (assistant turns)."""
        return self.encode_chat_batch([messages], add_generation_prompt)[0]

    def encode_chat_batch(self, conversations: Sequence[Sequence[dict[str, str]]],
                          add_generation_prompt: bool = False) -> list[tuple[list[int], list[bool]]]:
        """`encode_chat` of many conversations, with every role header and content encoded in one batch (the
        same ids as one call per piece: each piece is encoded on its own either way)."""
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

    def save(self, path: str | Path) -> None:
        with atomic_file(path) as tmp:
            self.hf.save(str(tmp))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json`, or a directory holding one (e.g. a Llama-3 tokenizer directory)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise MobileMoEError(f"no tokenizer at {path}: expected a tokenizer.json file or a directory with one")
        try:
            return cls(HFTokenizer.from_file(str(file)), source=str(file))
        except Exception as err:  # tokenizers raises plain Exception on malformed JSON
            raise MobileMoEError(f"{file} is not a valid HF tokenizer.json: {err}") from None


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2 style: no unknown tokens) with our end-of-text and chat special tokens."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts, trainer)
    return Tokenizer(hf, source=f"<bpe {vocab_size}>")
