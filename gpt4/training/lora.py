"""LoRA: low-rank adapters on chosen linear layers, trained while the base weights stay frozen.

    y = x W^T + b + (alpha / r) * (x A^T) B^T,    A (r, in) ~ small random, B (out, r) = 0

B starts at zero, so an adapted model computes exactly what the base model computes until training moves B.
`merge_lora` folds the update into W and restores plain nn.Linear layers: the saved model is an ordinary
checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.rank, self.scale = rank, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype,
                                               device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype,
                                               device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x):  # x (..., in) -> (..., out)
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a).to(self.base.weight.dtype) * self.scale
        return self.base


def add_lora(model: nn.Module, rank: int, alpha: float | None = None,
             targets: tuple[str, ...] = ("qkv_proj", "o_proj", "up_proj", "down_proj")) -> list[str]:
    """Freeze every parameter, then wrap each nn.Linear whose attribute name is in `targets` (in place).
    Returns the wrapped module names."""
    if rank <= 0:
        raise ValueError("LoRA rank must be positive.")
    alpha = 2.0 * rank if alpha is None else alpha
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"No linear layer named any of {targets} in the model.")
    return wrapped


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if "lora_" in k}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer, in place; the model is plain again."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    return model
