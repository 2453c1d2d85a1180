"""Pretraining from scratch on prepared token shards: next-token prediction on random windows."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..config import GPT4Config, preset
from ..errors import GPT4Error
from . import checkpoint as ckpt
from .data import Shards, batch_at, unigram_baseline
from .distributed import broadcast_object, close_distributed, init_distributed
from .loop import Batches, Hooks, TrainConfig, run_training


class PretrainBatches(Batches):
    def __init__(self, shards: Shards, cfg: TrainConfig, global_batch: int):
        self.shards, self.cfg, self.global_batch = shards, cfg, global_batch

    def train(self, step, rows):
        x = batch_at(self.shards.train, step, rows, self.global_batch, self.cfg.seq_len, self.cfg.seed)  # (b, T)
        return x, x, None  # the model shifts labels by one itself

    def val(self, index, rows):
        x = batch_at(self.shards.val, index, rows, self.global_batch, self.cfg.seq_len, self.cfg.seed + 1)
        return x, x, None


def build_config(preset_name: str, vocab_size: int, seq_len: int, sizes: dict) -> GPT4Config:
    """A preset with explicit sizes layered on top; positions cover at least seq_len."""
    overrides = {k: v for k, v in sizes.items() if v is not None}
    try:
        config = preset(preset_name, vocab_size, **overrides)
    except ValueError as e:
        raise GPT4Error(f"{e}") from e
    if config.max_position_embeddings < seq_len:
        config = dataclasses.replace(config, max_position_embeddings=seq_len)
    return config


def pretrain(data_dir: str, cfg: TrainConfig, preset_name: str = "small", sizes: dict | None = None,
             vocab_size: int | None = None, hooks: Hooks | None = None) -> dict:
    """Train a new GPT4LMHeadModel on data_dir (a `gpt4 prepare` folder); under torchrun on every rank."""
    from ..model import GPT4LMHeadModel
    from ..tokenizer import Tokenizer

    info = init_distributed()
    log = print if info.is_main else (lambda *a, **k: None)
    try:
        shards = Shards.open(data_dir)
        data_vocab = shards.meta["vocab_size"]
        if vocab_size is not None and vocab_size < data_vocab:
            raise GPT4Error(f"--vocab-size {vocab_size} is smaller than the tokenizer of {data_dir} "
                            f"({data_vocab} tokens): token ids would fall outside the embedding table. Use "
                            f"--vocab-size {data_vocab} or more, or re-run `gpt4 prepare` with a matching tokenizer.")
        if len(shards.val) < cfg.seq_len and cfg.eval_interval:
            raise GPT4Error(f"The validation split of {data_dir} has {len(shards.val)} tokens, fewer than --seq-len "
                            f"{cfg.seq_len}; prepare with a larger --val-fraction or use a shorter --seq-len.")
        tokenizer = Tokenizer.from_pretrained(Path(data_dir) / "tokenizer")
        resume_from = None
        if cfg.resume:
            found = ckpt.resolve_resume(cfg.out_dir, cfg.resume) if info.is_main else None
            resume_from = broadcast_object(None if found is None else str(found), info)
            resume_from = None if resume_from is None else Path(resume_from)
            if resume_from is None:
                log(f"no complete checkpoint under {cfg.out_dir}; starting from scratch")
        if resume_from is not None:
            loaded = GPT4LMHeadModel.from_pretrained(resume_from / "model")
            # The HF config.json drops training-only settings (dropout): rebuild from the exact saved config.
            state, _ = ckpt.load_trainer_state(resume_from, info.rank)
            model = GPT4LMHeadModel(GPT4Config(**state["model_config"])) if "model_config" in state else loaded
            model.load_state_dict(loaded.state_dict())
            if model.config.vocab_size < data_vocab:
                raise GPT4Error(f"Checkpoint {resume_from} has a {model.config.vocab_size}-token vocabulary but "
                                f"{data_vocab} tokens in {data_dir}: the data was prepared with another tokenizer.")
        else:
            config = build_config(preset_name, vocab_size or data_vocab, cfg.seq_len, sizes or {})
            config.eos_token_id = tokenizer.eos_token_id
            config.pad_token_id = tokenizer.pad_token_id
            config.bos_token_id = tokenizer.bos_token_id
            torch.manual_seed(cfg.seed)  # same initial weights on every rank
            model = GPT4LMHeadModel(config)
        if cfg.seq_len > model.config.max_position_embeddings:
            raise GPT4Error(f"--seq-len {cfg.seq_len} exceeds the model's {model.config.max_position_embeddings} "
                            "positions.")
        model.tokenizer = tokenizer
        torch.manual_seed(cfg.seed + info.rank)  # dropout differs per rank, reproducibly
        baseline = unigram_baseline(shards.train, shards.val, data_vocab) if info.is_main else None
        n_params = sum(p.numel() for p in model.parameters())
        log(f"model: {n_params / 1e6:.2f}M parameters, {model.config.num_hidden_layers} layers, hidden "
            f"{model.config.hidden_size}; data: {len(shards.train):,} train / {len(shards.val):,} val tokens; "
            f"ranks: {info.world_size} ({cfg.parallel if info.distributed else 'single process'}); "
            f"unigram baseline {baseline if baseline is None else round(baseline, 4)}")
        global_batch = cfg.batch_size * info.world_size
        hooks = hooks or Hooks()
        hooks.extra_state = lambda: {"model_config": model.config.to_dict()}
        return run_training(model, PretrainBatches(shards, cfg, global_batch), cfg, info, resume_from,
                            hooks, baseline, log=log)
    finally:
        close_distributed()
