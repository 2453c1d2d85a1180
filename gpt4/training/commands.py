"""CLI verbs: train-tokenizer, prepare, pretrain, finetune."""

from __future__ import annotations

import argparse
import json

from ..errors import check_flags


def register(sub) -> None:
    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on text files, folders or JSONL")
    p.add_argument("inputs", nargs="+", help="text files, folders (recursive) or .jsonl files")
    p.add_argument("--out", "-o", required=True, help="output folder (tokenizer.json + tokenizer_config.json)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size (default: 8192)")
    p.add_argument("--special-tokens", default="<|endoftext|>,<|im_start|>,<|im_end|>",
                   help="comma-separated special tokens; the first is end-of-text (default: %(default)s)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("prepare", help="tokenize a corpus into train/val token shards (numpy memmap)")
    p.add_argument("inputs", nargs="+", help="text files, folders (recursive) or .jsonl files")
    p.add_argument("--tokenizer", "-t", required=True, help="tokenizer folder/tokenizer.json, or a model folder")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--val-fraction", type=float, default=0.005, help="share of documents held out (default 0.005)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("pretrain", help="train a new model from scratch on prepared shards (torchrun-ready)")
    p.add_argument("--data", required=True, help="a `gpt4 prepare` output folder")
    p.add_argument("--out", "-o", default="runs/pretrain", help="output folder (checkpoints, metrics, final/)")
    p.add_argument("--preset", default="small", choices=["tiny", "small", "gpt2", "llama-tiny", "llama-small"],
                   help="model size preset (default: small)")
    p.add_argument("--hidden-size", type=int, help="override the preset's hidden size")
    p.add_argument("--layers", type=int, help="override the preset's number of layers")
    p.add_argument("--heads", type=int, help="override the preset's attention heads")
    p.add_argument("--kv-heads", type=int, help="override the preset's key/value heads (grouped-query attention)")
    p.add_argument("--intermediate-size", type=int, help="override the preset's MLP width")
    p.add_argument("--vocab-size", type=int, help="embedding rows (default: the tokenizer's vocabulary)")
    p.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"],
                   help="under torchrun: DDP replicas or FSDP (fully_shard) sharding (default: ddp)")
    add_train_flags(p, lr=1e-3, steps=1000, batch=8, seq=256)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="supervised fine-tuning on chat JSONL ({'messages': [...]}), full or LoRA")
    p.add_argument("--data", required=True, help="JSONL file(s) of {'messages': [{'role', 'content'}, ...]}",
                   nargs="+")
    p.add_argument("--model", "-m", default="gpt4", help="model to start from (named, folder or .gguf)")
    p.add_argument("--out", "-o", default="runs/finetune", help="output folder (checkpoints, final/)")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0 = full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default: 2 x rank)")
    p.add_argument("--lora-targets", default="qkv_proj,o_proj,up_proj,down_proj",
                   help="comma-separated linear layer names to adapt (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of conversations held out")
    add_train_flags(p, lr=2e-5, steps=100, batch=4, seq=512)
    p.set_defaults(func=cmd_finetune)


def add_train_flags(p: argparse.ArgumentParser, lr: float, steps: int, batch: int, seq: int) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default: {steps})")
    g.add_argument("--batch-size", type=int, default=batch, help=f"sequences per rank per micro-batch ({batch})")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--seq-len", type=int, default=seq, help=f"tokens per sequence (default: {seq})")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default: {lr})")
    g.add_argument("--min-lr", type=float, default=None, help="final learning rate (default: lr / 10)")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default: steps / 20)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay on matrices (default: 0.1)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip, 0 = off (default: 1.0)")
    g.add_argument("--eval-interval", type=int, default=None, help="validate every N steps (default: steps / 10)")
    g.add_argument("--eval-batches", type=int, default=8, help="validation batches per evaluation (default: 8)")
    g.add_argument("--sample-prompt", default="\n", help="prompt of the sample generations at evaluations")
    g.add_argument("--sample-tokens", type=int, default=48, help="tokens per sample generation, 0 = none")
    g.add_argument("--checkpoint-interval", type=int, default=None,
                   help="checkpoint every N steps (default: steps / 5)")
    g.add_argument("--keep-last", type=int, default=3, help="complete checkpoints to keep (default: 3)")
    g.add_argument("--seed", type=int, default=1337, help="random seed (data order, initial weights)")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="bf16 autocast (auto: where the hardware computes bf16 natively)")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from the newest complete checkpoint in --out, or from the given folder")
    g.add_argument("--stop-after", type=int, default=None,
                   help="checkpoint and exit after this step (for time-limited jobs; continue with --resume)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_config(args):
    from .loop import TrainConfig

    steps = args.steps
    return TrainConfig(
        out_dir=args.out, max_steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        seq_len=args.seq_len, lr=args.lr, min_lr=args.min_lr,
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else max(1, steps // 20),
        weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        eval_interval=args.eval_interval if args.eval_interval is not None else max(1, steps // 10),
        eval_batches=args.eval_batches, sample_prompt=args.sample_prompt, sample_tokens=args.sample_tokens,
        checkpoint_interval=args.checkpoint_interval if args.checkpoint_interval is not None else max(1, steps // 5),
        keep_last=args.keep_last, seed=args.seed, precision=args.precision,
        parallel=getattr(args, "parallel", "ddp"), resume=args.resume, stop_after=args.stop_after,
        progress=not args.no_progress)


def _threads(args) -> None:
    check_flags(("--threads", args.threads, args.threads is None or args.threads >= 1, "at least 1"))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def cmd_train_tokenizer(args) -> None:
    from .tokenizer_training import train_tokenizer

    specials = [s for s in args.special_tokens.split(",") if s]
    train_tokenizer(args.inputs, args.out, vocab_size=args.vocab_size, special_tokens=specials,
                    text_field=args.text_field)


def cmd_prepare(args) -> None:
    from .data import prepare

    prepare(args.inputs, args.tokenizer, args.out, val_fraction=args.val_fraction, text_field=args.text_field)


def cmd_pretrain(args) -> None:
    from .pretrain import pretrain

    _threads(args)
    sizes = dict(hidden_size=args.hidden_size, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                 num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate_size)
    summary = pretrain(args.data, train_config(args), args.preset, sizes, args.vocab_size)
    if summary is not None:
        print(json.dumps(summary, indent=2))


def cmd_finetune(args) -> None:
    from .sft import finetune

    _threads(args)
    targets = [t for t in args.lora_targets.split(",") if t]
    summary = finetune(args.model, args.data, train_config(args), lora_rank=args.lora_rank,
                       lora_alpha=args.lora_alpha, lora_targets=targets, val_fraction=args.val_fraction)
    print(json.dumps(summary, indent=2))
