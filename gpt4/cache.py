"""The KV cache: preallocated, explicit, with a position per sequence.

Each sequence writes the keys/values of the token at position p into slot p of its own row, so rows of a batch
can be at different lengths (right-padded prompts, requests that join a running batch). A query at position p
attends to slots 0..p of its row; slots beyond a row's length may hold stale values and are never attended.

One tensor per layer (not one for all layers): a compiled decode step then updates its inputs in place instead of
copying a shared base back after every write.

An int8 cache (dtype=torch.int8, as llama.cpp's q8_0 cache) holds each slot's row of a head as D int8 values q followed
by the float32 scale s of each group of 32 (x ~ s q): (B, Hkv, T, D + D / 8), 72 bytes a row for D = 64 instead of
float16's 128. Our attention kernels read such rows directly; SDPA gets them dequantized (dequantize_slots).
"""

from __future__ import annotations

import torch

from .config import GPT4Config


SLOT_GROUP = 32  # an int8 row's values per float32 scale


def int8_row_size(head_dim: int) -> int:
    """Bytes of an int8 cache's row: the values, then a 4-byte scale per group of SLOT_GROUP."""
    if head_dim % SLOT_GROUP:
        raise ValueError(f"An int8 KV cache needs a head size that is a multiple of {SLOT_GROUP}; this model's is "
                         f"{head_dim}. Choose another KV cache dtype.")
    return head_dim + head_dim // SLOT_GROUP * 4


def quantize_slots(x: torch.Tensor) -> torch.Tensor:
    """Rows (..., D) of keys or values as int8 rows (..., D + D / 8): in each group of 32, q = round(x * (127 / max|x|))
    and s = max|x| / 127 in float32 (the arithmetic of the kernels' store_slot), the scales after the values."""
    groups = x.float().unflatten(-1, (-1, SLOT_GROUP))  # (..., D / 32, 32)
    amax = groups.abs().amax(-1, keepdim=True)  # (..., D / 32, 1)
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q = torch.round(groups * inverse).to(torch.int8).flatten(-2)  # (..., D)
    scales = (amax / 127).flatten(-2).view(torch.int8)  # (..., D / 8): each float32's 4 bytes
    return torch.cat([q, scales], dim=-1)


def dequantize_slots(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 rows (..., D + D / 8) of an int8 cache as values (..., D) in dtype: s q."""
    D = rows.shape[-1] * SLOT_GROUP // (SLOT_GROUP + 4)
    q, scales = rows.split((D, rows.shape[-1] - D), dim=-1)
    scales = scales.contiguous().view(torch.float32)  # (..., D / 32)
    return (q.float().unflatten(-1, (-1, SLOT_GROUP)) * scales[..., None]).flatten(-2).to(dtype)


class KVCache:
    def __init__(self, config: GPT4Config, batch_size: int, max_length: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if max_length > config.max_position_embeddings and config.position_embedding == "learned":
            raise ValueError(
                f"A cache of {max_length} positions exceeds this model's {config.max_position_embeddings} "
                "learned positions; shorten the prompt or max_new_tokens."
            )
        row = int8_row_size(config.head_dim) if dtype == torch.int8 else config.head_dim
        shape = (batch_size, config.num_key_value_heads, max_length, row)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        # keys[layer], values[layer]: (B, Hkv, T, D), or int8 rows (B, Hkv, T, D + D / 8)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               kv_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, S, D) at `positions` (B, S); return this layer's first kv_length slots."""
        batch = positions.shape[0]
        keys, values = self.keys[layer], self.values[layer]
        if batch != keys.shape[0]:  # the first rows of a larger cache (a server's running batch)
            keys, values = keys[:batch], values[:batch]
        rows = torch.arange(batch, device=positions.device)[:, None]  # (B, 1) broadcasts with positions (B, S)
        if keys.dtype == torch.int8:
            k, v = quantize_slots(k), quantize_slots(v)  # (B, Hkv, S, D + D / 8)
        # Advanced indices separated by a slice put the broadcast dims first: the target is (B, S, Hkv, D).
        keys[rows, :, positions] = k.transpose(1, 2).to(keys.dtype)  # a bf16 model's keys into an fp32 cache too
        values[rows, :, positions] = v.transpose(1, 2).to(values.dtype)
        return keys[:, :, :kv_length], values[:, :, :kv_length]

    def rows(self, start: int, stop: int) -> "KVCache":
        """Rows start..stop-1 as a cache sharing this one's storage (e.g. to prefill requests joining a batch)."""
        view = object.__new__(KVCache)
        view.keys = [t[start:stop] for t in self.keys]
        view.values = [t[start:stop] for t in self.values]
        return view

    def copy_row(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` slots of row `source` into row `target`."""
        for tensors in (self.keys, self.values):
            for t in tensors:
                t[target, :, :length] = t[source, :, :length]

    def copy_from(self, other: "KVCache") -> None:
        """Take all of a smaller cache's rows and slots (e.g. when growing a cache)."""
        for mine, theirs in zip(self.keys + self.values, other.keys + other.values):
            mine[:theirs.shape[0], :, :theirs.shape[2]] = theirs
