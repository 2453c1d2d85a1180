"""The training loop shared by pretraining and fine-tuning.

One step: `grad_accum` micro-batches (forward under autocast, backward), gradient clipping, AdamW with the
learning rate of a warmup + cosine schedule. Every rank reads its slice of the same global batch (see
data.batch_at), so N ranks and one process see the same data. Rank 0 alone logs, plots and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import GPT4Error
from . import checkpoint as ckpt
from .distributed import DistInfo, all_reduce_mean, barrier, reshard, wrap_ddp, wrap_fsdp


@dataclass
class TrainConfig:
    out_dir: str = "runs/pretrain"
    max_steps: int = 1000
    batch_size: int = 8  # sequences per rank per micro-batch
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 1e-3
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    eval_interval: int = 100
    eval_batches: int = 8
    sample_interval: int = 0  # 0 = at evaluations
    sample_prompt: str = "\n"
    sample_tokens: int = 48
    checkpoint_interval: int = 200
    keep_last: int = 3
    seed: int = 1337
    precision: str = "auto"  # auto | bf16 | fp32
    parallel: str = "ddp"  # ddp | fsdp (used only under torchrun)
    resume: str | None = None  # None, "auto" or a checkpoint folder
    stop_after: int | None = None  # checkpoint and exit after this step (time-limited jobs); resume continues
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        # (name, ok, rule): a bad value fails here, with its flag, instead of deep in the loop (a batch of 0 rows,
        # an empty sequence, a NaN loss from 0 micro-batches, a division by 0 validation batches)
        checks = [
            ("max_steps", self.max_steps >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
            ("seq_len", self.seq_len >= 1, "must be >= 1"),
            ("lr", self.lr > 0, "must be > 0"),
            ("min_lr", self.min_lr is None or 0 <= self.min_lr <= self.lr, "must be in [0, lr]"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("beta1", 0 <= self.beta1 < 1, "must be in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "must be in [0, 1)"),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0 (0: off)"),
            ("eval_interval", self.eval_interval >= 0, "must be >= 0 (0: no validation)"),
            ("eval_batches", self.eval_batches >= 1, "must be >= 1"),
            ("sample_interval", self.sample_interval >= 0, "must be >= 0"),
            ("sample_tokens", self.sample_tokens >= 0, "must be >= 0"),
            ("checkpoint_interval", self.checkpoint_interval >= 0, "must be >= 0 (0: only at the end)"),
            ("keep_last", self.keep_last >= 0, "must be >= 0 (0: keep all)"),
            ("precision", self.precision in ("auto", "bf16", "fp32"), "must be auto, bf16 or fp32"),
            ("parallel", self.parallel in ("ddp", "fsdp"), "must be ddp or fsdp"),
            ("stop_after", self.stop_after is None or self.stop_after >= 1, "must be >= 1"),
        ]
        flags = {"max_steps": " (--steps)", "beta1": "", "beta2": "", "sample_interval": ""}  # ("": Python only)
        for name, ok, rule in checks:
            if not ok:
                flag = flags.get(name, f" (--{name.replace('_', '-')})")
                raise GPT4Error(f"TrainConfig.{name}={getattr(self, name)!r} {rule}{flag}.")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.final_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.final_lr)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases, norms, or 1-D params)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused on CUDA only: on CPU (torch 2.13) the fused kernel does not reproduce a run after load_state_dict.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             fused=device.type == "cuda")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast when asked for, or on 'auto' where the hardware computes bf16 natively."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native else None


class Batches:
    """What the loop needs from a data source. `train(step, rows)` returns (input_ids, labels, attention_mask or
    None) for the rows of the global batch of that step; `val(i, rows)` the same for validation batch i."""
    tokenizer = None

    def train(self, step: int, rows: slice):
        raise NotImplementedError

    def val(self, index: int, rows: slice):
        raise NotImplementedError


@dataclass
class Hooks:
    """Test and integration hooks: all optional."""
    on_step: Callable[[int, float], None] | None = None  # (step, loss) after each optimizer step
    before_commit: Callable[[Path], None] | None = None  # inside checkpoint saves, before the rename
    save_model: Callable[[nn.Module, Path], None] | None = None  # how a model folder is written (LoRA: merged)
    extra_state: Callable[[], dict] | None = None  # more trainer state to checkpoint (LoRA adapters)


def full_model_for_saving(model: nn.Module, base: nn.Module, info: DistInfo, cfg: TrainConfig) -> nn.Module | None:
    """A plain, unsharded model holding the current weights (on rank 0; None elsewhere)."""
    if cfg.parallel == "fsdp" and info.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not info.is_main:
            return None
        from ..model import GPT4LMHeadModel

        plain = GPT4LMHeadModel(base.config)
        plain.load_state_dict(state)
        plain.tokenizer, plain.generation_config = base.tokenizer, base.generation_config
        return plain
    return base if info.is_main else None


def optimizer_state(optimizer, model, info: DistInfo, cfg: TrainConfig) -> dict:
    """The optimizer state to checkpoint. Under FSDP every rank holds a shard of each moment; they are gathered
    into full tensors keyed by parameter name (all ranks take part), so any world size can resume from it."""
    if not (cfg.parallel == "fsdp" and info.distributed):
        return optimizer.state_dict()
    from torch.distributed.tensor import DTensor

    names = {id(p): n for n, p in model.named_parameters()}
    per_param = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            per_param[names[id(p)]] = {k: v.full_tensor().cpu() if isinstance(v, DTensor) else v
                                       for k, v in optimizer.state.get(p, {}).items()}
    return {"fsdp_full_state": per_param}


def load_optimizer_state(optimizer, model, state: dict, info: DistInfo, cfg: TrainConfig) -> None:
    fsdp = cfg.parallel == "fsdp" and info.distributed
    if ("fsdp_full_state" in state) != fsdp:
        raise GPT4Error("This checkpoint's optimizer state was written " + ("with" if not fsdp else "without") +
                        " --parallel fsdp; resume with the same --parallel setting.")
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.tensor import distribute_tensor

    for name, p in model.named_parameters():
        saved = state["fsdp_full_state"].get(name, {})
        optimizer.state[p] = {k: distribute_tensor(v.to(info.device), p.device_mesh, p.placements)
                              if torch.is_tensor(v) and v.dim() > 0 else v for k, v in saved.items()}


class MetricsLog:
    """metrics.jsonl under the output folder (rank 0). On resume, records past the resumed step are dropped so
    the log reads like one uninterrupted run."""

    def __init__(self, path: Path, start_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if start_step > 0 and path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
        elif path.is_file():
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, **record) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def plot_losses(metrics_path: Path, png_path: Path, baseline: float | None = None, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", ms=3)
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="gray", label=f"unigram baseline ({baseline:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def run_training(model: nn.Module, batches: Batches, cfg: TrainConfig, info: DistInfo,
                 resume_from: Path | None = None, hooks: Hooks | None = None, baseline: float | None = None,
                 log=print) -> dict:
    """Train `model` (a plain GPT4LMHeadModel, possibly with LoRA adapters) in place; returns a summary.

    When resume_from is given, the model weights must already be loaded from it; optimizer, step, RNG and
    data position are restored here."""
    hooks = hooks or Hooks()
    out = Path(cfg.out_dir)
    base = model.to(info.device)
    amp = autocast_dtype(cfg.precision, info.device)
    if info.distributed:
        model = wrap_fsdp(base, info) if cfg.parallel == "fsdp" else wrap_ddp(base, info)
    optimizer = make_optimizer(model, cfg, info.device)
    start_step = 0
    if resume_from is not None:
        state, rng = ckpt.load_trainer_state(resume_from, info.rank)
        load_optimizer_state(optimizer, model, state["optimizer"], info, cfg)
        start_step = state["step"]
        if rng is not None:
            ckpt.set_rng_state(rng)
        log(f"resumed from {resume_from} at step {start_step}")
    global_batch = cfg.batch_size * info.world_size
    rows = slice(info.rank * cfg.batch_size, (info.rank + 1) * cfg.batch_size)
    tokens_per_step = global_batch * cfg.grad_accum * cfg.seq_len
    metrics = MetricsLog(out / "metrics.jsonl", start_step, info.is_main)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    def autocast():
        return torch.autocast(info.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    def micro_loss(input_ids, labels, attention_mask):
        with autocast():
            return model(input_ids.to(info.device), attention_mask=None if attention_mask is None else
                         attention_mask.to(info.device), labels=labels.to(info.device)).loss

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        total = torch.zeros((), device=info.device)
        for i in range(cfg.eval_batches):
            total += micro_loss(*batches.val(i, rows)).float()
        reshard(model)
        model.train()
        return float(all_reduce_mean(total / cfg.eval_batches, info))

    def sample() -> str | None:
        if not info.is_main or (cfg.parallel == "fsdp" and info.distributed) or base.tokenizer is None:
            return None  # a sharded model can only run forward on all ranks together
        base.eval()
        ids = base.tokenizer.encode(cfg.sample_prompt, add_special_tokens=False) or [0]
        cpu_rng = torch.get_rng_state()
        with torch.no_grad():
            out_ids = base.generate(torch.tensor([ids], device=info.device), max_new_tokens=cfg.sample_tokens,
                                    do_sample=True, temperature=0.8, top_k=50, seed=0)
        torch.set_rng_state(cpu_rng)  # sampling must not shift the training RNG stream
        base.train()
        return base.tokenizer.decode(out_ids[0].tolist())

    def save(step: int) -> None:
        tmp = ckpt.step_dir(out, step)
        tmp = tmp.with_name(tmp.name + ".tmp")
        barrier(info)
        ckpt.write_rank_files(tmp, info.rank)
        opt_state = optimizer_state(optimizer, model, info, cfg)
        plain = full_model_for_saving(model, base, info, cfg)
        if info.is_main:
            state = {"step": step, "optimizer": opt_state, "config": json.loads(json.dumps(asdict(cfg))),
                     "world_size": info.world_size}
            if hooks.extra_state is not None:
                state.update(hooks.extra_state())

            class Saver:  # checkpoint.save_checkpoint calls model.save_pretrained(folder)
                @staticmethod
                def save_pretrained(folder):
                    (hooks.save_model or save_model_folder)(plain, Path(folder))

            ckpt.save_checkpoint(out, step, Saver, state, cfg.keep_last, hooks.before_commit)
        barrier(info)

    model.train()
    from tqdm import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
               disable=not (cfg.progress and info.is_main), dynamic_ncols=True)
    started, last_loss, val_loss = time.perf_counter(), float("nan"), None
    step = start_step
    try:
        for step in range(start_step, cfg.max_steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=info.device)
            for micro in range(cfg.grad_accum):
                input_ids, labels, mask = batches.train(step * cfg.grad_accum + micro, rows)
                sync = micro == cfg.grad_accum - 1 or not (info.distributed and cfg.parallel == "ddp")
                with contextlib.nullcontext() if sync else model.no_sync():
                    loss = micro_loss(input_ids, labels, mask)
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().float()
            loss_value = float(all_reduce_mean(loss_sum / cfg.grad_accum, info))
            if not math.isfinite(loss_value):
                done = ckpt.complete_checkpoints(out)
                raise GPT4Error(
                    f"The loss became {loss_value} at step {step}; the weights were not updated. "
                    + (f"The last complete checkpoint {done[-1]} is intact: resume from it with --resume and a "
                       "lower --lr (or more --warmup-steps)." if done else
                       "No checkpoint was written yet; retry with a lower --lr or more --warmup-steps."))
            norm = None
            if cfg.grad_clip > 0:
                norm = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            last_loss = loss_value
            done_steps = step + 1
            dt = time.perf_counter() - t0
            record = {"step": done_steps, "loss": round(loss_value, 5), "lr": lr, "tokens": done_steps *
                      tokens_per_step, "tok_per_s": round(tokens_per_step / dt, 1)}
            if norm is not None:
                record["grad_norm"] = round(norm, 4)
            if hooks.on_step is not None:
                hooks.on_step(done_steps, loss_value)
            if cfg.eval_interval and (done_steps % cfg.eval_interval == 0 or done_steps == cfg.max_steps):
                val_loss = evaluate()
                record["val_loss"] = round(val_loss, 5)
                text = sample() if cfg.sample_tokens and not cfg.sample_interval else None
                if text is not None:
                    record["sample"] = text
                    log(f"\n[step {done_steps}] val {val_loss:.4f} | sample: {text[:300]!r}")
            elif cfg.sample_interval and done_steps % cfg.sample_interval == 0:
                text = sample()
                if text is not None:
                    record["sample"] = text
            metrics.write(**record)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}", lr=f"{lr:.2e}",
                            **({"val": f"{val_loss:.3f}"} if val_loss is not None else {}))
            bar.update(1)
            if done_steps == cfg.stop_after and done_steps != cfg.max_steps:
                save(done_steps)
                log(f"stopped after step {done_steps} (--stop-after); continue with --resume")
                return {"stopped_at": done_steps, "last_train_loss": loss_value, "last_val_loss": val_loss}
            if cfg.checkpoint_interval and done_steps % cfg.checkpoint_interval == 0 \
                    and done_steps != cfg.max_steps:
                save(done_steps)
    finally:
        bar.close()
    if start_step < cfg.max_steps:
        save(cfg.max_steps)
    elapsed = time.perf_counter() - started
    summary = {"steps": cfg.max_steps, "final_train_loss": last_loss, "final_val_loss": val_loss,
               "unigram_baseline": baseline, "tokens": (cfg.max_steps - start_step) * tokens_per_step,
               "wall_s": round(elapsed, 1),
               "tok_per_s": round((cfg.max_steps - start_step) * tokens_per_step / max(elapsed, 1e-9), 1),
               "world_size": info.world_size, "precision": str(amp or torch.float32)}
    if info.is_main:
        final = out / "final"
        plain = full_model_for_saving(model, base, info, cfg)
        _write_final(plain, final, hooks)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if (out / "metrics.jsonl").is_file():
            plot_losses(out / "metrics.jsonl", out / "loss.png", baseline, title=out.name)
        log(f"final model: {final}  (load with GPT4LMHeadModel.from_pretrained({str(final)!r}))")
    else:
        full_model_for_saving(model, base, info, cfg)  # FSDP: every rank takes part in the gather
    barrier(info)
    return summary


def save_model_folder(model: nn.Module, folder: Path) -> None:
    """save_pretrained; a model with LoRA adapters is saved merged (a copy: training may go on)."""
    import copy

    from .lora import LoRALinear, merge_lora

    if any(isinstance(m, LoRALinear) for m in model.modules()):
        merged = merge_lora(copy.deepcopy(model))
        merged.tokenizer, merged.generation_config = model.tokenizer, model.generation_config
        model = merged
    model.save_pretrained(folder)


def _write_final(model: nn.Module, folder: Path, hooks: Hooks) -> None:
    """save_pretrained into folder.tmp, then rename: a crash never leaves a half-written final model."""
    import shutil

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (hooks.save_model or save_model_folder)(model, tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
