"""Tokenizer on Hugging Face `tokenizers`: from tokenizer.json, or rebuilt from a GGUF file's vocabulary.

Chat templates come from the model files and are rendered in jinja2's immutable sandbox: a template is code
shipped by whoever made the model file, so it gets no access to Python objects beyond plain data.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from .errors import GPT4Error, ModelFileError

# ChatML: used only when a model ships no template of its own (e.g. a model pretrained here).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# How each GGUF `tokenizer.ggml.pre` splits text before byte-level BPE (the regex its merges were learned with).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    "gpt2": [_GPT2_SPLIT], "default": [_GPT2_SPLIT],
    # SmolLM splits every digit on its own first (its tokenizer.json: Digits(individual) + ByteLevel).
    "smollm": [r"\p{N}", _GPT2_SPLIT],
    "llama3": [_LLAMA3_SPLIT], "llama-bpe": [_LLAMA3_SPLIT], "llama-v3": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT], "deepseek-r1-qwen": [_QWEN2_SPLIT],
}


class Tokenizer:
    def __init__(self, backend: Backend, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None):
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self.padding_side = "left"  # generation pads on the left, as transformers recommends

    # --------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "Tokenizer":
        """From a folder with tokenizer.json (+ tokenizer_config.json, chat_template.jinja)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelFileError(f"{folder} has no tokenizer.json; this package needs the fast-tokenizer file.")
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # tokenizers raises bare Exception subclasses for malformed JSON
            raise ModelFileError(f"{path} is not a valid tokenizer.json ({e}).") from e
        config = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()

        def token(name):
            value = config.get(name)
            return value.get("content") if isinstance(value, dict) else value

        return cls(backend, bos_token=token("bos_token"), eos_token=token("eos_token"),
                   pad_token=token("pad_token"), chat_template=template)

    @classmethod
    def from_gguf(cls, gguf) -> "Tokenizer":
        """Rebuild a byte-level BPE tokenizer from a GGUF file's vocabulary, merges and token types."""
        kind = gguf.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ModelFileError(f"{gguf.path}: tokenizer type {kind!r} is not supported (byte-level BPE "
                                 "'gpt2' only); use the model's Hugging Face folder instead.")
        tokens = list(gguf.require("tokenizer.ggml.tokens"))
        merges = [tuple(m.split(" ", 1)) for m in gguf.get("tokenizer.ggml.merges") or []]
        types = gguf.get("tokenizer.ggml.token_type")
        types = [1] * len(tokens) if types is None else types.tolist()
        vocab = {t: i for i, t in enumerate(tokens)}
        backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        pre = gguf.get("tokenizer.ggml.pre", "default")
        splits = PRE_TOKENIZER_SPLITS.get(pre, [_GPT2_SPLIT])
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        # CONTROL tokens (type 3) are special; USER_DEFINED (type 4) are matched whole but are ordinary text.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, k in zip(tokens, types) if k == 3])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])

        def name_of(key):
            i = gguf.get(key)
            return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

        bos = name_of("tokenizer.ggml.bos_token_id")
        if gguf.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
        else:
            backend.post_processor = processors.ByteLevel(trim_offsets=False)
        return cls(backend, bos_token=bos, eos_token=name_of("tokenizer.ggml.eos_token_id"),
                   pad_token=name_of("tokenizer.ggml.padding_token_id"),
                   chat_template=gguf.get("tokenizer.chat_template"))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "pad_token": self.pad_token, "chat_template": self.chat_template,
                  "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # --------------------------------------------------------------------------------------------------
    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def all_special_ids(self) -> list[int]:
        return [i for i, t in self.backend.get_added_tokens_decoder().items() if t.special]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}.")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]

    def __call__(self, texts: str | list[str], add_special_tokens: bool = True, return_tensors: str | None = None):
        """transformers-style batch encoding: {'input_ids', 'attention_mask'}, padded on `padding_side`."""
        import torch

        single = isinstance(texts, str)
        rows = [self.encode(t, add_special_tokens) for t in ([texts] if single else texts)]
        width = max(len(r) for r in rows)
        pad = self.pad_token_id if self.pad_token_id is not None else (self.eos_token_id or 0)
        ids, mask = [], []
        for r in rows:
            fill = width - len(r)
            left = self.padding_side == "left"
            ids.append(([pad] * fill if left else []) + r + ([] if left else [pad] * fill))
            mask.append(([0] * fill if left else []) + [1] * len(r) + ([] if left else [0] * fill))
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        return {"input_ids": ids[0] if single else ids, "attention_mask": mask[0] if single else mask}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True, **kwargs):
        """Render a conversation with the model's own template (sandboxed jinja2)."""
        text = render_chat_template(self.chat_template or DEFAULT_CHAT_TEMPLATE, messages,
                                    add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
                                    eos_token=self.eos_token or "", **kwargs)
        # The template writes BOS itself when the model wants one; do not add it twice.
        return self.encode(text, add_special_tokens=False) if tokenize else text


def render_chat_template(template: str, messages: list[dict], **variables) -> str:
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise GPT4Error("Chat messages must be a list of {'role': ..., 'content': ...} dicts.")

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=messages, **variables)
    except TemplateError as e:
        raise GPT4Error(f"The model's chat template rejected this conversation: {e}") from e


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a multi-byte character.

    Decodes a short window of recent ids (not the whole sequence) per step, and holds text back while it ends
    in an incomplete UTF-8 sequence (the decoder's U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        text = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""
