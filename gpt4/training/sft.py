"""Supervised fine-tuning on chat data with the model's own chat template; loss on assistant tokens only.

Each conversation is rendered turn by turn: the text the template adds for a prompt (system / user turns and
the assistant header) gets label -100, the assistant's reply (with the template's end-of-turn marker) keeps its
token ids as labels, so the model learns to answer and to stop, never to imitate the user.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ..errors import GPT4Error, check_flags
from . import checkpoint as ckpt
from .data import jsonl_records
from .distributed import broadcast_object, close_distributed, init_distributed
from .loop import Batches, Hooks, TrainConfig, run_training

IGNORE = -100


def read_conversations(paths: list[str]) -> list[list[dict]]:
    conversations = []
    for path in paths:
        if not Path(path).is_file():
            raise GPT4Error(f"{path} does not exist; give JSONL files of {{\"messages\": [...]}}.")
        for n, record in jsonl_records(Path(path)):
            messages = record.get("messages") if isinstance(record, dict) else None
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise GPT4Error(f"{path}:{n} needs a 'messages' list of {{'role': str, 'content': str}}.")
            if not any(m["role"] == "assistant" for m in messages):
                raise GPT4Error(f"{path}:{n} has no assistant message: nothing to learn from it.")
            conversations.append(messages)
    if not conversations:
        raise GPT4Error(f"No conversations in {paths}.")
    return conversations


def tokenize_conversation(tokenizer, messages: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    """(input ids, labels): labels are -100 everywhere except on assistant replies; truncated to max_len."""
    ids, labels = [], []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
            if not prompt.startswith(rendered) or not full.startswith(prompt):
                raise GPT4Error("The chat template does not render conversations incrementally (a turn changes "
                                "earlier text), so prompt and reply tokens cannot be told apart.")
            head = tokenizer.encode(prompt[len(rendered):], add_special_tokens=False)
            reply = tokenizer.encode(full[len(prompt):], add_special_tokens=False)
            ids += head + reply
            labels += [IGNORE] * len(head) + reply
            rendered = full
    rest = tokenizer.apply_chat_template(messages, tokenize=False)[len(rendered):]
    tail = tokenizer.encode(rest, add_special_tokens=False) if rest else []
    ids += tail
    labels += [IGNORE] * len(tail)
    return ids[:max_len], labels[:max_len]


class ChatBatches(Batches):
    """Right-padded batches of tokenized conversations; each step's rows depend only on (seed, step)."""

    def __init__(self, train, val, global_batch: int, pad_id: int, seed: int):
        self.train_set, self.val_set = train, val
        self.global_batch, self.pad_id, self.seed = global_batch, pad_id, seed

    def _pad(self, items):
        width = max(len(ids) for ids, _ in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for r, (x, y) in enumerate(items):
            ids[r, :len(x)], labels[r, :len(y)], mask[r, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        return ids, labels, mask  # (b, T) each

    def _pick(self, dataset, key, rows):
        g = torch.Generator().manual_seed(key)
        order = torch.randint(0, len(dataset), (self.global_batch,), generator=g)[rows].tolist()
        return self._pad([dataset[i] for i in order])

    def train(self, step, rows):
        return self._pick(self.train_set, self.seed * 1_000_003 + step, rows)

    def val(self, index, rows):
        return self._pick(self.val_set, (self.seed + 1) * 1_000_003 + index, rows)


def finetune(model_name: str, data: list[str], cfg: TrainConfig, lora_rank: int = 0, lora_alpha: float | None = None,
             lora_targets: list[str] | None = None, val_fraction: float = 0.05, hooks: Hooks | None = None) -> dict:
    from ..model import GPT4LMHeadModel
    from .lora import add_lora, lora_state_dict

    check_flags(("--lora-rank", lora_rank, lora_rank >= 0, "at least 1 for LoRA, or 0 for full fine-tuning"),
                ("--lora-alpha", lora_alpha, lora_alpha is None or lora_alpha > 0, "above 0 (default: twice the rank)"),
                ("--val-fraction", val_fraction, 0 <= val_fraction < 1, "in [0, 1)"))
    conversations = read_conversations(data)  # a bad file fails before the model loads
    info = init_distributed()
    log = print if info.is_main else (lambda *a, **k: None)
    try:
        model = GPT4LMHeadModel.from_pretrained(model_name)  # float32: trainable copy of any loadable model
        tok = model.tokenizer
        if tok is None:
            raise GPT4Error(f"{model_name} has no tokenizer; fine-tuning needs one to render conversations.")
        if tok.vocab_size > model.config.vocab_size:
            raise GPT4Error(f"The tokenizer of {model_name} has {tok.vocab_size} tokens but the model only "
                            f"{model.config.vocab_size} embeddings: they do not belong together.")
        random.Random(cfg.seed).shuffle(conversations)
        n_val = max(1, int(len(conversations) * val_fraction)) if val_fraction and len(conversations) > 1 else 0
        encoded = [tokenize_conversation(tok, c, cfg.seq_len) for c in conversations]
        encoded = [e for e in encoded if any(y != IGNORE for y in e[1])]
        if not encoded:
            raise GPT4Error(f"Every conversation's reply falls past --seq-len {cfg.seq_len}; raise it.")
        val, train = (encoded[:n_val], encoded[n_val:]) if n_val and len(encoded) > n_val else (encoded, encoded)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        resume_from = None
        if cfg.resume:
            found = ckpt.resolve_resume(cfg.out_dir, cfg.resume) if info.is_main else None
            resume_from = broadcast_object(None if found is None else str(found), info)
            resume_from = None if resume_from is None else Path(resume_from)
        hooks = hooks or Hooks()
        if lora_rank:
            targets = tuple(lora_targets or ("qkv_proj", "o_proj", "up_proj", "down_proj"))
            try:
                add_lora(model, lora_rank, lora_alpha, targets)
            except ValueError as e:
                raise GPT4Error(f"{e} Choose --lora-targets among qkv_proj, o_proj, up_proj, down_proj.") from e
            if resume_from is not None:  # the checkpoint's model/ is merged; the adapters live in trainer.pt
                state, _ = ckpt.load_trainer_state(resume_from, info.rank)
                model.load_state_dict(state["lora"], strict=False)

            hooks.extra_state = lambda: {"lora": lora_state_dict(model)}
        elif resume_from is not None:
            resumed = GPT4LMHeadModel.from_pretrained(resume_from / "model")
            model.load_state_dict(resumed.state_dict())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log(f"fine-tuning {model_name}: {len(train)} train / {len(val)} val conversations, "
            f"{trainable / 1e6:.2f}M of {total / 1e6:.1f}M parameters trainable"
            + (f" (LoRA rank {lora_rank})" if lora_rank else ""))
        torch.manual_seed(cfg.seed + info.rank)
        batches = ChatBatches(train, val, cfg.batch_size * info.world_size, pad, cfg.seed)
        cfg.sample_tokens = 0  # chat samples are better judged with `gpt4 chat` on the result
        return run_training(model, batches, cfg, info, resume_from, hooks, log=log)
    finally:
        close_distributed()
