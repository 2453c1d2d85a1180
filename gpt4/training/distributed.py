"""Process groups and parallel wrappers, kept apart from the model (torchtitan style).

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything runs in one process. The wrappers
take the unmodified GPT4LMHeadModel: DDP replicates it, FSDP (`fully_shard`) shards each block and the root.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes (nccl on GPU, gloo on CPU), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistInfo(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        # torchrun (2.13) keeps one rendezvous store across --max-restarts attempts: a restarted rank would read
        # the killed attempt's addresses and fail to connect. Each attempt gets its own key prefix.
        store, _, _ = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f"gpt4/attempt_{attempt}/", store),
                                rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_worker(code: int) -> NoReturn:
    """End a torchrun worker process, its output flushed, without Python's interpreter shutdown.

    Why: after FSDP, the gloo process group outlives destroy_process_group (DTensor's sharding caches hold its
    device mesh), so its worker threads are still running at shutdown. A worker thread that frees the last
    collective's tensors then needs the GIL of a finalizing interpreter, and the process aborts ("terminate called
    without an active exception", SIGABRT; about 1 run in 20 on a busy 2-core machine). Every file the run writes is
    closed before this point."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def broadcast_object(obj, info: DistInfo):
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.local_rank] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def wrap_fsdp(model: nn.Module, info: DistInfo, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard every transformer block, then the root (embeddings, final norm, head), in place."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else \
        MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def reshard(model: nn.Module) -> None:
    """FSDP keeps the root's parameters gathered after a forward that has no backward (evaluation); shard them
    again so the module holds the same sharded parameters the optimizer updates."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
