"""GPT4Config: the sizes of a decoder-only transformer and a small, closed set of architecture switches.

One config covers GPT-2 (learned positions, LayerNorm, GELU, biases), the Llama family (RoPE with optional
Llama-3 / linear scaling, RMSNorm, SwiGLU, grouped-query attention, tied or untied head), Qwen2 (q/k/v biases)
and Mistral (sliding-window attention). Conversion from a Hugging Face `config.json` and back lives here too,
so foreign config names never reach the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The values each switch may take; `__post_init__` rejects anything else with a message naming the field.
SWITCHES = {
    "model_type": ("gpt2", "llama", "qwen2", "mistral"),
    "position_embedding": ("learned", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "swiglu"),
}


@dataclass
class GPT4Config:
    # Sizes.
    vocab_size: int = 50257
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None  # None: equal to num_attention_heads (no grouped-query attention)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    intermediate_size: int | None = None  # None: 4 * hidden_size
    max_position_embeddings: int = 1024

    # Architecture switches (closed sets, see SWITCHES).
    model_type: str = "gpt2"  # the family, used to name weights when saving in Hugging Face format
    position_embedding: str = "learned"
    norm: str = "layernorm"
    mlp: str = "gelu"
    attention_bias: bool = True  # biases on q/k/v (GPT-2, Qwen2)
    output_bias: bool = True  # bias on the attention output projection (GPT-2)
    mlp_bias: bool = True  # biases in the MLP (GPT-2)
    tie_word_embeddings: bool = True
    sliding_window: int | None = None  # Mistral: each token sees at most this many previous positions

    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"} or {"rope_type": "linear", "factor"}.
    rope_scaling: dict | None = None

    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    dropout: float = 0.0  # used only while training

    extra: dict = field(default_factory=dict)  # free-form provenance (e.g. source file), never affects the math

    def __post_init__(self):
        for name, allowed in SWITCHES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"GPT4Config.{name}={value!r} is not supported; choose one of {allowed}.")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"GPT4Config: hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; set head_dim explicitly."
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPT4Config.{name} must be a positive integer, got {value!r}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"GPT4Config: num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)."
            )
        if self.position_embedding == "rope" and self.head_dim % 2:
            raise ValueError(f"GPT4Config: RoPE needs an even head_dim, got {self.head_dim}.")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise ValueError(
                    f"GPT4Config.rope_scaling type {kind!r} is not supported; use 'llama3', 'linear' or None."
                )

    # ----------------------------------------------------------------------------------------------
    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def num_parameters(self) -> int:
        """Parameter count implied by the sizes (tied embeddings counted once)."""
        h, L, V = self.hidden_size, self.num_hidden_layers, self.vocab_size
        q_out, kv_out = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attn = h * (q_out + 2 * kv_out) + q_out * h
        attn += (q_out + 2 * kv_out) * self.attention_bias + h * self.output_bias
        n_mlp_in = 2 if self.mlp == "swiglu" else 1
        mlp = (n_mlp_in + 1) * h * self.intermediate_size
        mlp += (n_mlp_in * self.intermediate_size + h) * self.mlp_bias
        norm = h * (2 if self.norm == "layernorm" else 1)
        total = L * (attn + mlp + 2 * norm) + norm + V * h
        total += 0 if self.tie_word_embeddings else V * h
        total += self.max_position_embeddings * h if self.position_embedding == "learned" else 0
        return total

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs) -> "GPT4Config":
        """The config of a named model, a local folder (config.json), a .gguf file or a hub id."""
        from .weights import load_config  # the format readers own the foreign names

        config = load_config(name_or_path, **kwargs)
        return config

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "GPT4Config":
        """Translate a Hugging Face `config.json` (gpt2, llama, qwen2, mistral) into a GPT4Config."""
        model_type = hf.get("model_type")
        if model_type == "gpt2":
            if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
                raise ValueError(f"GPT-2 activation {hf['activation_function']!r} is not supported (gelu_new only).")
            return cls(
                model_type="gpt2", vocab_size=hf["vocab_size"], hidden_size=hf["n_embd"],
                num_hidden_layers=hf["n_layer"], num_attention_heads=hf["n_head"],
                intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
                max_position_embeddings=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                tie_word_embeddings=hf.get("tie_word_embeddings", True),
                bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"), initializer_range=hf.get("initializer_range", 0.02),
            )
        if model_type in ("llama", "qwen2", "mistral"):
            if hf.get("hidden_act", "silu") != "silu":
                raise ValueError(f"{model_type} hidden_act {hf['hidden_act']!r} is not supported (silu only).")
            rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
            rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
            rope_kind = rope.get("rope_type", rope.get("type", "default"))
            scaling = None if rope_kind == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
            bias = bool(hf.get("attention_bias", False))
            sliding = hf.get("sliding_window") if model_type == "mistral" else None
            if model_type == "qwen2" and hf.get("use_sliding_window", False):
                raise ValueError("Qwen2 use_sliding_window=True is not supported.")
            return cls(
                model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=hf["num_attention_heads"],
                num_key_value_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
                intermediate_size=hf["intermediate_size"],
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                position_embedding="rope", norm="rmsnorm", mlp="swiglu",
                attention_bias=True if model_type == "qwen2" else bias,
                output_bias=False if model_type == "qwen2" else bias,
                mlp_bias=bool(hf.get("mlp_bias", False)),
                tie_word_embeddings=hf.get("tie_word_embeddings", False),
                sliding_window=sliding, norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta),
                rope_scaling=scaling, bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"), initializer_range=hf.get("initializer_range", 0.02),
            )
        raise ValueError(
            f"config.json has model_type={model_type!r}; supported families are gpt2, llama, qwen2 and mistral."
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face `config.json` that makes transformers build the same network."""
        common = {
            "vocab_size": self.vocab_size, "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id, "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
        }
        if self.model_type == "gpt2":
            return {
                "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": self.hidden_size,
                "n_layer": self.num_hidden_layers, "n_head": self.num_attention_heads,
                "n_inner": self.intermediate_size, "n_positions": self.max_position_embeddings,
                "layer_norm_epsilon": self.norm_eps, "activation_function": "gelu_new",
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **common,
            }
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
        hf = {
            "model_type": self.model_type, "architectures": [arch[self.model_type]],
            "hidden_size": self.hidden_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings, "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
            "attention_dropout": 0.0, **common,
        }
        if self.model_type == "llama":
            hf["attention_bias"] = self.attention_bias
            hf["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        return hf

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    def check_supported_by_hf(self) -> None:
        """save_pretrained writes Hugging Face names; refuse combinations transformers cannot express."""
        if self.model_type == "gpt2":
            ok = (self.position_embedding, self.norm, self.mlp) == ("learned", "layernorm", "gelu") and \
                self.attention_bias and self.output_bias and self.mlp_bias and self.num_key_value_heads == \
                self.num_attention_heads
        else:
            ok = (self.position_embedding, self.norm, self.mlp) == ("rope", "rmsnorm", "swiglu")
            if self.model_type == "qwen2":
                ok = ok and self.attention_bias and not self.output_bias and not self.mlp_bias
            elif self.model_type == "mistral":
                ok = ok and not (self.attention_bias or self.output_bias or self.mlp_bias)
            else:
                ok = ok and self.attention_bias == self.output_bias
        if not ok:
            raise ValueError(
                f"This config mixes switches that a Hugging Face {self.model_type!r} checkpoint cannot express; "
                "set model_type to the family whose layout matches (gpt2 / llama / qwen2 / mistral)."
            )


# Presets for training from scratch (issue: pretraining). Sizes only; the family decides the switches.
def preset(name: str, vocab_size: int, **overrides) -> GPT4Config:
    """A named config preset: 'tiny', 'small', 'gpt2' (124M), 'llama-tiny', 'llama-small'."""
    llama = dict(model_type="llama", position_embedding="rope", norm="rmsnorm", mlp="swiglu",
                 attention_bias=False, output_bias=False, mlp_bias=False, norm_eps=1e-5)
    table = {
        "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256),
        "small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, max_position_embeddings=512),
        "gpt2": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=1024),
        "llama-tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=344, max_position_embeddings=256, **llama),
        "llama-small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                            intermediate_size=1024, max_position_embeddings=512, **llama),
    }
    if name not in table:
        raise ValueError(f"Unknown config preset {name!r}; choose one of {sorted(table)}.")
    return GPT4Config(vocab_size=vocab_size, **{**table[name], **overrides})
