"""Shared fixtures: tiny random configs of each family, and the embedded default model (loaded once)."""

import pytest
import torch

from gpt4 import GPT4Config, GPT4LMHeadModel

torch.set_num_threads(2)

TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
LLAMA = dict(model_type="llama", position_embedding="rope", norm="rmsnorm", mlp="swiglu", attention_bias=False,
             output_bias=False, mlp_bias=False, intermediate_size=48, tie_word_embeddings=False)

FAMILIES = {
    "gpt2": dict(TINY, model_type="gpt2"),
    "llama-gqa-untied": dict(TINY, **LLAMA, num_key_value_heads=2),
    "llama-tied": dict(TINY, **{**LLAMA, "tie_word_embeddings": True}),
    "llama3-rope-scaling": dict(TINY, **LLAMA, num_key_value_heads=1, rope_theta=500000.0,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "qwen2": dict(TINY, **{**LLAMA, "model_type": "qwen2", "attention_bias": True}, num_key_value_heads=2),
    "mistral": dict(TINY, **{**LLAMA, "model_type": "mistral"}, num_key_value_heads=2, sliding_window=8),
}


def skip_without_w4a8() -> None:
    """Skip where --quant w4a8 cannot run (neither AVX-512 VNNI nor AVX2, no ninja), saying which."""
    from gpt4.kernels import w4a8_unavailable_reason

    reason = w4a8_unavailable_reason()
    if reason:
        pytest.skip(reason)


def greedy_with_and_without_attention_kernels(model, prompts: list[str], max_new_tokens: int) -> dict:
    """{True: ..., False: ...}: the greedy generations of each prompt and of all of them as one padded batch, with the
    model's attention kernels (Attention.use_attention_kernels) switched on and off."""
    outputs = {}
    for on in (True, False):
        for layer in model.layers:
            layer.attn.attention_kernels = on
        outputs[on] = [model.generate(p, max_new_tokens=max_new_tokens, do_sample=False) for p in prompts]
        outputs[on].append(model.generate(prompts, max_new_tokens=max_new_tokens, do_sample=False))
    return outputs


def tiny_config(family: str, **overrides) -> GPT4Config:
    return GPT4Config(**{**FAMILIES[family], **overrides})


def tiny_model(family: str, seed: int = 0, **overrides) -> GPT4LMHeadModel:
    torch.manual_seed(seed)
    model = GPT4LMHeadModel(tiny_config(family, **overrides)).eval()
    # Random non-trivial norms and biases, so a wrong mapping of any tensor changes the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def default_model():
    return GPT4LMHeadModel.from_pretrained("gpt4")
