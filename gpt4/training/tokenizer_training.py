"""Train a byte-level BPE tokenizer (Hugging Face `tokenizers`) on text files, folders or JSONL.

Byte-level BPE covers every string (Chinese, code, emoji) without unknown tokens; the pre-tokenizer splits
digits, letters and punctuation in the GPT-4 style so merges stay within words.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import GPT4Error
from .data import iter_documents, list_files

# A split in the spirit of GPT-4's cl100k pattern: contractions, letter runs, 1-3 digit groups, punctuation,
# newlines and spaces, so merges never cross these boundaries.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
DEFAULT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, the template SmolLM2 / Qwen use: trained models chat with `gpt4 chat` without further setup.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(inputs: list[str], out_dir: str, vocab_size: int = 8192,
                    special_tokens: list[str] | None = None, text_field: str = "text", min_frequency: int = 2):
    """Train and save (tokenizer.json + tokenizer_config.json) into out_dir; returns a gpt4 Tokenizer."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as Backend

    from ..tokenizer import Tokenizer

    specials = list(DEFAULT_SPECIALS if special_tokens is None else special_tokens)
    if vocab_size < 256 + len(specials):
        raise GPT4Error(f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least 256 + "
                        f"{len(specials)} special tokens.")
    files = list_files(inputs)
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
    warnings = []
    count = 0

    def documents():
        nonlocal count
        for text in iter_documents(files, text_field, warn=warnings.append):
            count += 1
            yield text

    backend.train_from_iterator(documents(), trainer=trainer)
    for w in warnings[:20]:
        print(f"warning: {w}", file=sys.stderr)
    if count == 0:
        raise GPT4Error(f"No text found in {inputs} (all files empty, binary or not UTF-8); give text inputs.")
    eos = specials[0] if specials else None
    tok = Tokenizer(backend, bos_token=None, eos_token=eos, pad_token=eos,
                    chat_template=CHATML_TEMPLATE if {"<|im_start|>", "<|im_end|>"} <= set(specials) else None)
    tok.save_pretrained(Path(out_dir))
    print(f"trained a {backend.get_vocab_size()}-token tokenizer on {count} documents -> {out_dir}",
          file=sys.stderr)
    return tok
