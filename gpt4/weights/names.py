"""Foreign tensor names as data: Hugging Face and GGUF names <-> this package's names.

The model fuses q/k/v (qkv_proj) and gate/up (up_proj of a SwiGLU MLP) into single matrices; loaders first map
foreign names onto the *unfused* names below, then `fuse` builds the model's state dict. Saving runs the same
tables backwards through `unfuse`.
"""

from __future__ import annotations

import re

import torch

# (foreign template, our unfused template); "{i}" is the layer index.
HF_LLAMA = [
    ("model.embed_tokens.weight", "embed_tokens.weight"),
    ("model.norm.weight", "final_norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    *[(f"model.layers.{{i}}.self_attn.{p}_proj.{w}", f"layers.{{i}}.attn.{p}_proj.{w}")
      for p in "qkvo" for w in ("weight", "bias")],
    *[(f"model.layers.{{i}}.mlp.{p}_proj.{w}", f"layers.{{i}}.mlp.{p}_proj.{w}")
      for p in ("gate", "up", "down") for w in ("weight", "bias")],
]

# GPT-2's Conv1D stores weights as (in, out): `transposed` lists the ones to transpose on the way in and out.
HF_GPT2 = [
    ("transformer.wte.weight", "embed_tokens.weight"),
    ("transformer.wpe.weight", "position_embeddings.weight"),
    ("transformer.ln_f.weight", "final_norm.weight"),
    ("transformer.ln_f.bias", "final_norm.bias"),
    ("lm_head.weight", "lm_head.weight"),
    *[(f"transformer.h.{{i}}.ln_{n}.{w}", f"layers.{{i}}.{ours}.{w}")
      for n, ours in ((1, "attn_norm"), (2, "mlp_norm")) for w in ("weight", "bias")],
    *[(f"transformer.h.{{i}}.{theirs}.{w}", f"layers.{{i}}.{ours}.{w}")
      for theirs, ours in (("attn.c_attn", "attn.qkv_proj"), ("attn.c_proj", "attn.o_proj"),
                           ("mlp.c_fc", "mlp.up_proj"), ("mlp.c_proj", "mlp.down_proj"))
      for w in ("weight", "bias")],
]
GPT2_TRANSPOSED = re.compile(r"layers\.\d+\.(attn\.qkv_proj|attn\.o_proj|mlp\.up_proj|mlp\.down_proj)\.weight")

GGUF = [
    ("token_embd.weight", "embed_tokens.weight"),
    ("output_norm.weight", "final_norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.{i}.attn_norm.weight", "layers.{i}.attn_norm.weight"),
    ("blk.{i}.ffn_norm.weight", "layers.{i}.mlp_norm.weight"),
    *[(f"blk.{{i}}.attn_{g}.{w}", f"layers.{{i}}.attn.{p}_proj.{w}")
      for g, p in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o")) for w in ("weight", "bias")],
    *[(f"blk.{{i}}.ffn_{p}.{w}", f"layers.{{i}}.mlp.{p}_proj.{w}")
      for p in ("gate", "up", "down") for w in ("weight", "bias")],
]
GGUF_IGNORED = {"rope_freqs.weight"}  # folded into the config (Llama-3 rope scaling), not a parameter


def _compile(table):
    """[(regex over foreign names, our template)] with {i} captured."""
    out = []
    for theirs, ours in table:
        pattern = re.compile("^" + re.escape(theirs).replace(r"\{i\}", r"(?P<i>\d+)") + "$")
        out.append((pattern, ours))
    return out


_COMPILED = {id(t): _compile(t) for t in (HF_LLAMA, HF_GPT2, GGUF)}


def rename(name: str, table) -> str | None:
    """Our unfused name for a foreign tensor name, or None if the table does not know it."""
    for pattern, ours in _COMPILED[id(table)]:
        match = pattern.match(name)
        if match:
            return ours.format(**match.groupdict())
    return None


def foreign_name(ours: str, table) -> str:
    """The foreign name for one of our unfused names (the table read backwards)."""
    match = re.match(r"^layers\.(\d+)\.(.*)$", ours)
    key = ("layers.{i}." + match.group(2)) if match else ours
    for theirs, template in table:
        if template == key:
            return theirs.format(i=match.group(1)) if match else theirs
    raise KeyError(f"No foreign name for tensor {ours!r}.")


def fuse(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unfused names -> the model's state-dict names (q/k/v -> qkv_proj, gate/up -> up_proj), in place.

    In place so each part is freed as soon as its fused matrix exists (peak memory: one layer extra).
    """
    out = tensors
    layers = {int(m.group(1)) for k in tensors if (m := re.match(r"layers\.(\d+)\.", k))}
    for i in layers:
        for w in ("weight", "bias"):
            parts = [f"layers.{i}.attn.{p}_proj.{w}" for p in "qkv"]
            if all(p in out for p in parts):
                out[f"layers.{i}.attn.qkv_proj.{w}"] = _concatenate([out.pop(p) for p in parts])
            gate, up = f"layers.{i}.mlp.gate_proj.{w}", f"layers.{i}.mlp.up_proj.{w}"
            if gate in out and up in out:
                out[up] = _concatenate([out.pop(gate), out.pop(up)])
    return out


def _concatenate(parts: list[torch.Tensor]) -> torch.Tensor:
    if all(p.is_meta for p in parts):  # shape-only placeholders: torch.cat on "meta" would import torch._dynamo
        return torch.empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]), dtype=parts[0].dtype,
                           device="meta")
    return torch.cat(parts, dim=0)


def unfuse(state: dict[str, torch.Tensor], split_qkv: tuple[int, int, int], gated: bool,
           keep_qkv_fused: bool = False) -> dict[str, torch.Tensor]:
    """The model's state dict -> unfused names (the inverse of `fuse`)."""
    out = {}
    for name, t in state.items():
        m = re.match(r"^(layers\.\d+)\.(attn\.qkv_proj|mlp\.up_proj)\.(weight|bias)$", name)
        if m and m.group(2) == "attn.qkv_proj" and not keep_qkv_fused:
            for p, part in zip("qkv", t.split(split_qkv, dim=0)):
                out[f"{m.group(1)}.attn.{p}_proj.{m.group(3)}"] = part
        elif m and m.group(2) == "mlp.up_proj" and gated:
            gate, up = t.chunk(2, dim=0)
            out[f"{m.group(1)}.mlp.gate_proj.{m.group(3)}"] = gate
            out[f"{m.group(1)}.mlp.up_proj.{m.group(3)}"] = up
        else:
            out[name] = t
    return out
