"""Write tiny llama/qwen2 GGUF files with random weights of any tensor type, for loader tests.

Quantized tensors are random blocks whose fp16 scale fields are set to small finite values, so every quant
type decodes to sane numbers; our loader and transformers' (an independent dequantizer) must agree on them.
"""

from pathlib import Path

import numpy as np

# Byte offsets of the fp16 scale fields inside one block of each type (ggml's block layouts).
F16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0],
}

TINY_GGUF = dict(vocab=256, hidden=256, layers=2, heads=4, kv_heads=2, ffn=512)


def random_quantized(rows: int, cols: int, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 (rows, bytes per row) of random blocks of `qtype`, scales ~0.002-0.02."""
    import gguf

    block_values, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    assert cols % block_values == 0, (qtype, cols)
    blocks = rng.integers(0, 256, size=(rows, cols // block_values, block_bytes), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        scale = rng.uniform(0.002, 0.02, size=blocks.shape[:2]).astype(np.float16)
        blocks[..., offset:offset + 2] = scale.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(rows, -1)


def write_tiny_gguf(path: Path, qtype: str = "F32", arch: str = "llama", seed: int = 0, tied: bool = False,
                    with_tokenizer: bool = True, overrides: dict | None = None) -> Path:
    """A 2-layer model; 2-D weights in `qtype`, norms in F32. `overrides` replaces metadata values."""
    import gguf

    rng = np.random.default_rng(seed)
    s = TINY_GGUF
    head_dim = s["hidden"] // s["heads"]
    w = gguf.GGUFWriter(str(path), arch)
    meta = {
        "block_count": s["layers"], "context_length": 128, "embedding_length": s["hidden"],
        "feed_forward_length": s["ffn"], "attention.head_count": s["heads"], "attention.head_count_kv": s["kv_heads"],
        "rope.freq_base": 10000.0, "attention.layer_norm_rms_epsilon": 1e-5,
        **(overrides or {}),
    }
    for key, value in meta.items():
        full = f"{arch}.{key}"
        if isinstance(value, float):
            w.add_float32(full, value)
        else:
            w.add_uint32(full, value)
    if with_tokenizer:
        # A byte-level vocabulary: the 256 byte symbols, no merges.
        from tokenizers.pre_tokenizers import ByteLevel

        alphabet = sorted(ByteLevel.alphabet())
        w.add_tokenizer_model("gpt2")
        w.add_token_list(alphabet)
        w.add_token_merges([])
        w.add_token_types([1] * len(alphabet))
        w.add_eos_token_id(0)

    def add(name, rows, cols):
        if qtype in ("F32", "F16"):
            data = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32 if qtype == "F32" else np.float16)
            w.add_tensor(name, data)
        elif qtype == "BF16":
            data = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
            bf16 = (data.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(rows, cols * 2)
            w.add_tensor(name, bf16, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor(name, random_quantized(rows, cols, qtype, rng), raw_dtype=gguf.GGMLQuantizationType[qtype])

    def norm(name, dim):
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32))

    H, kv = s["hidden"], s["kv_heads"] * head_dim
    add("token_embd.weight", s["vocab"], H)
    norm("output_norm.weight", H)
    if not tied:
        add("output.weight", s["vocab"], H)
    for i in range(s["layers"]):
        norm(f"blk.{i}.attn_norm.weight", H)
        norm(f"blk.{i}.ffn_norm.weight", H)
        add(f"blk.{i}.attn_q.weight", H, H)
        add(f"blk.{i}.attn_k.weight", kv, H)
        add(f"blk.{i}.attn_v.weight", kv, H)
        add(f"blk.{i}.attn_output.weight", H, H)
        if arch == "qwen2":
            for p, n in (("q", H), ("k", kv), ("v", kv)):
                w.add_tensor(f"blk.{i}.attn_{p}.bias", (0.1 * rng.standard_normal(n)).astype(np.float32))
        add(f"blk.{i}.ffn_gate.weight", s["ffn"], H)
        add(f"blk.{i}.ffn_up.weight", s["ffn"], H)
        add(f"blk.{i}.ffn_down.weight", H, s["ffn"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
