"""The one transformer: a decoder-only stack of scaled dot-product self-attention and MLP blocks.

    tokens -> embeddings (+ learned positions) -> N x [x + Attn(Norm(x)); x + MLP(Norm(x))] -> Norm -> LM head

Attention is softmax(Q K^T / sqrt(d_k)) V, computed by torch's scaled_dot_product_attention (over a KV cache, in
w4a8 models, by our C++ kernels: Attention.use_attention_kernels), causal, with rotary or learned positions and
optional grouped-query attention. The switches in GPT4Config choose between the GPT-2 and Llama-family variants;
nothing here knows foreign weight names (see gpt4/weights).
"""

from __future__ import annotations

import math
import os
import types
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache, dequantize_slots
from .config import GPT4Config
from .quant import BlocksLinear, Int8Linear, blocks_kernel_multiplies, dequantizes_prompt_chunks

# Compiled decode steps (compile_decode): torch.compile in inductor's default mode, or with the weights frozen into
# the graph and autotuned C++ GEMM templates; or compiled ahead of time by AOTInductor and cached on disk (gpt4.aot).
COMPILE_MODES = ("default", "max-autotune", "aot")


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, S, V)
    loss: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------
# Positions
def rope_inverse_frequencies(config: GPT4Config) -> torch.Tensor:
    """Per-pair rotation speeds (D/2,), with Llama-3 or linear context scaling applied."""
    dim = config.head_dim
    # On the CPU even while a loader builds the model on "meta" (where these ops would import torch._dynamo).
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: keep high frequencies, slow low frequencies by `factor`, blend smoothly in between.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelength - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= old_context / high) & (wavelength <= old_context / low)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (B, 1, S, D) for integer positions (B, S)."""
    angles = positions[..., None].float() * inv_freq  # (B, S, D/2), computed in fp32 like the references
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, S, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + D/2]) of x (B, H, S, D) by the position angles ("rotate half" layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# --------------------------------------------------------------------------------------------------
# Layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Lower precision: normalise in fp32 (as the references do), scale in the model dtype.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def make_norm(config: GPT4Config) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class Attention(nn.Module):
    def __init__(self, config: GPT4Config, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        # q, k and v in one matmul: fewer, larger kernels (one weight read per step while decoding).
        self.qkv_proj = nn.Linear(config.hidden_size, q_out + 2 * kv_out, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_out, config.hidden_size, bias=config.output_bias)
        self.split_sizes = (q_out + kv_out, kv_out)  # (q and k: rotated together, v)
        self.dropout = config.dropout
        self.attention_kernels = False  # attention over a cache through our C++ kernels (use_attention_kernels)

    def use_attention_kernels(self) -> bool:
        """From now on attention over a KV cache runs through our kernels (loaded with the w4a8 kernel: quantize_
        switches them on in w4a8 mode), where its shapes allow; returns whether it does. A decode step's through
        gpt4_kernels.decode_attention: one pass over the cache per KV head, split across threads in chunks of slots
        (30 layers of the default model over 512 slots 0.93 ms against SDPA's 1.32, over 16 slots 0.26 against
        0.45). A prompt chunk's float32 queries through gpt4_kernels.prefill_attention: flash attention per KV head
        that skips the blocks of keys a block of queries may not see (PyTorch's computes a causal chunk's masked
        half while it has at most 512 keys)."""
        query_rows = self.n_heads // self.n_kv_heads
        self.attention_kernels = query_rows <= 16 and self.head_dim % 16 == 0 and self.head_dim <= 256
        return self.attention_kernels

    def forward(self, x, rope, mask, cache, positions, kv_length):
        B, S, _ = x.shape
        qk, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        qk = qk.view(B, S, self.n_heads + self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hq + Hkv, S, D)
        if rope is not None:
            qk = apply_rope(qk, *rope)  # q and k rotate alike: one pass over both (fewer ops per decode step)
        q, k = qk.split((self.n_heads, self.n_kv_heads), dim=1)  # (B, Hq, S, D), (B, Hkv, S, D)
        v = v.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        if cache is not None:
            cached_k, cached_v = cache.update(self.layer_index, k, v, positions, kv_length)  # (B, Hkv, T, D)
            # A prompt's first chunk (S > 1 without a mask, see hidden_states) attends only to its own keys and
            # values: in the model's dtype, not the cache's (a bf16 model's 512-token prefill attention is then
            # causal bf16 SDPA on AMX, 2.8x faster per layer than fp32 under a mask). The cache still holds them.
            if mask is not None or S == 1:
                k, v = cached_k, cached_v
        kernels = cache is not None and self.attention_kernels and not self.training
        decode_kernel = kernels and S == 1
        # A prompt chunk's float32 queries (a bf16 model's keep SDPA: AMX's where the CPU has it); no gradients.
        prefill_kernel = kernels and S > 1 and q.dtype == torch.float32 and not q.requires_grad
        if k.dtype == torch.float16 and not (decode_kernel or prefill_kernel):  # a half cache (see
            k, v = k.to(q.dtype), v.to(q.dtype)  # GPT4LMHeadModel._cache_dtype): SDPA in the model's dtype
        elif k.dtype == torch.int8 and not (decode_kernel or prefill_kernel):  # an int8 cache's rows (KVCache)
            k, v = dequantize_slots(k, q.dtype), dequantize_slots(v, q.dtype)
        shared_kv = self.n_kv_heads != self.n_heads  # SDPA pairs each KV head with several query heads
        if S == 1 and shared_kv:
            # One query per row (a decode step): the query heads sharing a KV head become that head's query rows,
            # which see the same slots, so one mask row serves them all. SDPA's CPU kernel then works per KV head
            # rather than per query head: 1.5-2x faster here for 8 rows (8 x 9 heads over 80 slots: 49 -> 29 us
            # a layer), up to 1.5x for one row at 576 slots, never slower.
            q, shared_kv = q.reshape(B, self.n_kv_heads, -1, self.head_dim), False  # (B, Hkv, Hq / Hkv, D)
        if decode_kernel:  # (over a half or int8 cache, float32 queries: only the cached keys and values are rounded)
            q = q.to(torch.float32 if k.dtype in (torch.float16, torch.int8) else k.dtype)
            y = torch.ops.gpt4_kernels.decode_attention(q, k, v, mask, self.head_dim ** -0.5)
        elif prefill_kernel:  # (B, Hq, S, D), a view of (B, S, Hq, D): the transpose below is free
            y = torch.ops.gpt4_kernels.prefill_attention(q, k, v, mask, self.head_dim ** -0.5)
        else:  # (without a mask: a whole causal sequence, S == T, or one query that sees every cached slot)
            y = F.scaled_dot_product_attention(
                q.to(k.dtype), k, v, attn_mask=mask, is_causal=mask is None and S > 1,
                dropout_p=self.dropout if self.training else 0.0, enable_gqa=shared_kv)
        y = y.reshape(B, self.n_heads, S, self.head_dim)  # (B, Hq, S, D)
        return self.o_proj(y.to(x.dtype).transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, config: GPT4Config):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        n_in = 2 if self.gated else 1  # SwiGLU: gate and up projections fused in one matmul
        self.up_proj = nn.Linear(config.hidden_size, n_in * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x):
        h = self.up_proj(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, config: GPT4Config, layer_index: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer_index)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, mask, cache, positions, kv_length):
        x = x + self.dropout(self.attn(self.attn_norm(x), rope, mask, cache, positions, kv_length))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


# --------------------------------------------------------------------------------------------------
def attention_mask_for(positions: torch.Tensor, kv_length: int, sliding_window: int | None,
                       key_padding: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask (B, 1, S, T): query at position p sees key slots j <= p (and j > p - window).

    key_padding (B, T), 1 for real tokens, masks padded keys; every query still sees its own slot, so a
    padded query never has an empty softmax (its output is ignored anyway).
    """
    slots = torch.arange(kv_length, device=positions.device)
    query = positions[:, None, :, None]  # (B, 1, S, 1)
    mask = slots <= query  # (B, 1, S, T)
    if sliding_window is not None:
        mask &= slots > query - sliding_window
    if key_padding is not None:
        mask &= key_padding[:, None, None, :].bool()
        mask |= slots == query
    return mask


class TorchCompiledDecode:
    """compile_decode()'s torch.compile graphs: the one-token decode step (called) and prompt lookup's check of a
    draft (verify), any number of draft tokens (dynamic, like the batch size and the length)."""

    max_draft = math.inf  # set to 0 if the check fails to compile: drafts are then checked eagerly

    def __init__(self, step, check):
        self.step, self.check = step, check

    def __call__(self, input_ids, positions, mask, cache) -> torch.Tensor:
        return self.step(input_ids, positions, mask, cache)  # (B, V)

    def verify(self, input_ids, positions, mask, cache) -> torch.Tensor:
        return self.check(input_ids, positions, mask, cache)  # (S, V)


class GPT4LMHeadModel(nn.Module):
    def __init__(self, config: GPT4Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if config.position_embedding == "learned" else None)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = make_norm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if config.position_embedding == "rope":
            self.register_buffer("rope_inv_freq", rope_inverse_frequencies(config), persistent=False)
        self.tokenizer = None  # set by from_pretrained when the checkpoint carries one
        self.quant = "none"  # the linear layers' quantization mode, set by gpt4.quant.quantize_
        self.source = None  # the file or folder from_pretrained read the weights from (keys compiled steps)
        self._compiled_decode = None  # set by compile_decode()
        self._fused_decode = None  # (weights, biases, inv_freq) of gpt4_kernels.decode_layers: use_fused_decode()
        self.kv_cache_dtype = None  # new caches' dtype; None: chosen (see _cache_dtype)
        self.generation_config = None
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # GPT-2 style: N(0, 0.02), residual output projections scaled down by depth, zero biases.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, (Attention, MLP)):
            out = module.o_proj if isinstance(module, Attention) else module.down_proj
            nn.init.normal_(out.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))

    # ----------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.final_norm.weight.device  # not the embedding's: quantized models look it up in int8

    @property
    def dtype(self) -> torch.dtype:
        return self.final_norm.weight.dtype

    @property
    def prefill_chunk(self) -> int:
        """Prompt tokens a forward pass takes (generation and the server cut longer prompts into chunks of this many):
        256, or 512 where a layer dequantizes its weight for each chunk (int4, int8, blocks on CPUs with native bf16).
        Shorter chunks hold fewer activations and stay nearer the caches: on the AVX2 EPYC the default model's
        512-token prompt in two chunks took 617-641 ms against 633-668 in one, its process peaking 13-18 MB lower
        (Qwen2.5-Coder-0.5B 2012-2032 ms against 2056-2104, 19 MB; fp32 `none` as fast); a dequantized weight instead
        costs each chunk its conversion again."""
        return 512 if dequantizes_prompt_chunks(self._linears()) else 256

    def _linears(self) -> list[nn.Module]:
        """Every layer's weight matmuls, in order: q, k and v's, the output projection's, the MLP's two."""
        return [m for layer in self.layers
                for m in (layer.attn.qkv_proj, layer.attn.o_proj, layer.mlp.up_proj, layer.mlp.down_proj)]

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        return KVCache(self.config, batch_size, max_length, dtype=self.cache_dtype, device=self.device)

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype of new KV caches: kv_cache_dtype where set, else the one _cache_dtype chooses."""
        dtype = self.kv_cache_dtype or self._cache_dtype()
        if dtype in (torch.float16, torch.int8) and self.dtype != torch.float32:
            raise ValueError(f"A {str(dtype).removeprefix('torch.')} KV cache is for float32 models; this one "
                             f"computes in {str(self.dtype).removeprefix('torch.')}.")
        if dtype == torch.int8 and self._compiled_decode is not None:
            raise ValueError("An int8 KV cache is read by the eager decode steps; a compiled step attends through "
                             "SDPA over a float cache. Decode eagerly, or choose another KV cache dtype.")
        return dtype

    def _cache_dtype(self) -> torch.dtype:
        """On the CPU: fp16 for an fp32 model whose eager decode steps attend through our kernel (w4a8's), bf16 for a
        bf16 model decoding eagerly on AMX, fp32 otherwise. Elsewhere the model's dtype.

        fp16 keys and values, as llama.cpp caches them: half the bytes (the default model: 23 KB a token instead of
        46; 4096 tokens 94 MB instead of 189), read by the kernel (F16C) in float32 arithmetic with float32 queries.
        On the AVX2 EPYC a step at 2048 / 4096 cached tokens took 8.5-8.9 / 12.9-15.3 ms with fp32, 7.0-7.4 /
        10.1-10.3 with fp16; after a 4096-token prompt the benchmark decodes 89 tokens/s against 71 (run 23b, with
        perplexity through the cache: docs/performance.md). Compiled steps keep fp32 (their attention is SDPA's,
        which would widen the whole cache each step).

        A bf16 model's keys and values are bf16 already, so an fp32 cache holds the same values in twice the bytes
        (the default model: 46 KB a token instead of 23). fp32 pays on the AVX512-BF16 EPYC without AMX, where the CPU
        attention kernel took 300 vs 44 us per layer for one query row over 512 bf16 / fp32 slots (int4
        --max-autotune decode at 512 tokens 56 -> 99 tok/s with fp32), and in compiled steps on the AMX Xeon (ctx
        512 81 vs 73 tok/s, 8 streams 358 vs 317). Eager decoding on AMX is as fast over bf16 (bf16 int4, 4
        alternating rounds: ctx 16 62 / 61, ctx 512 52 / 55, 8 streams 230 / 218 tok/s, fp32 / bf16 cache), so
        there the cache is bf16: a 4000-token prompt peaks at 0.51 GB instead of 0.61, and is read in 2.4-2.8 s
        instead of 4.2-4.7 (its chunks after the first attend through the cache).
        """
        if self.device.type != "cpu":
            return self.dtype
        if self.dtype == torch.float32:
            eager_kernel = self._compiled_decode is None and all(layer.attn.attention_kernels for layer in self.layers)
            return torch.float16 if eager_kernel else torch.float32
        eager_on_amx = torch.cpu._is_amx_tile_supported() and self._compiled_decode is None
        return self.dtype if self.dtype == torch.bfloat16 and eager_on_amx else torch.float32

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      cache: KVCache | None = None, attention_mask: torch.Tensor | None = None,
                      kv_length: int | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, S, H).

        input_ids (B, S). Without a cache: positions default to 0..S-1, or follow attention_mask (B, S) for
        left-padded batches. With a cache: positions (B, S) say where each token goes; keys are read from
        slots 0..kv_length-1 (default: up to the largest position).
        """
        B, S = input_ids.shape
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(f"input_ids hold a token id outside the vocabulary [0, {self.config.vocab_size}).")
        mask = None
        if cache is not None:
            if positions is None:
                raise ValueError("A forward pass with a KV cache needs explicit positions (B, S).")
            if attention_mask is not None:
                raise ValueError("With a KV cache, give per-row positions instead of an attention_mask.")
            kv_length = kv_length or int(positions.max()) + 1
            if kv_length > cache.max_length:
                raise ValueError(f"Position {kv_length - 1} is past the cache's {cache.max_length} slots.")
            window = self.config.sliding_window
            fresh = S > 1 and kv_length == S and (window is None or S <= window) and bool(
                (positions == torch.arange(S, device=positions.device)).all())
            # A prompt's first chunk (every row at slots 0..S-1) is plain causal attention over itself: no mask
            # (Attention then skips the cache's copies and SDPA the masked-out half of the scores).
            mask = None if fresh else attention_mask_for(positions, kv_length, window)
        elif attention_mask is not None:
            if positions is None:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            mask = attention_mask_for(torch.arange(S, device=input_ids.device).expand(B, S), S,
                                      self.config.sliding_window, key_padding=attention_mask)
        elif self.config.sliding_window is not None and S > self.config.sliding_window:
            mask = attention_mask_for(torch.arange(S, device=input_ids.device).expand(B, S), S,
                                      self.config.sliding_window)
        if positions is None:
            positions = torch.arange(S, device=input_ids.device).expand(B, S)
        if int(positions.max()) >= self.config.max_position_embeddings and self.position_embeddings is not None:
            raise ValueError(f"Position {int(positions.max())} exceeds the model's "
                             f"{self.config.max_position_embeddings} learned positions.")

        return self._run(input_ids, positions, mask, cache, kv_length)

    def decode_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                      kv_length: int) -> torch.Tensor:
        """Next-token logits (B, V) in fp32 for one new token per row: the decode loop's step.

        input_ids, positions (B, 1), already checked (no host round trips here); kv_length must be the largest
        position + 1. Runs the compiled step after compile_decode(), the eager one otherwise.
        """
        window = self.config.sliding_window
        compiled = self._compiled_decode
        if compiled is not None and input_ids.shape[0] <= getattr(compiled, "max_rows", input_ids.shape[0]):
            # The mask's last dimension carries kv_length into the graph as a dynamic size: no recompiles.
            mask = attention_mask_for(positions, kv_length, window)  # (B, 1, 1, T)
            try:
                return compiled(input_ids, positions, mask, cache)
            except torch._dynamo.exc.TorchDynamoException as error:  # InductorError (no C++ compiler...) included
                # Compiling needs a C++ toolchain and operators dynamo can trace; decoding must not depend on it.
                warnings.warn(f"torch.compile of the decode step failed, decoding eagerly from now on: "
                              f"{str(error).strip().splitlines()[0]}", RuntimeWarning, stacklevel=2)
                self._compiled_decode = None
        if input_ids.shape == (1, 1) and (window is None or kv_length <= window):
            mask = None  # one sequence's newest token (position kv_length - 1) sees every slot: skip the mask
        else:
            mask = attention_mask_for(positions, kv_length, window)
        if self._fused_decode is not None and not self.training:
            return self._fused_step(input_ids[:, 0], positions[:, 0], mask, cache.keys, cache.values, kv_length)
        return self._decode_step(input_ids, positions, mask, cache, kv_length)

    def _fused_step(self, ids, positions, mask, keys, values, kv_length) -> torch.Tensor:
        """Logits (B, V) in fp32 for ids, positions (B,) through gpt4_kernels.decode_layers (see use_fused_decode);
        mask None or (B or 1, 1, 1, kv_length); keys, values: the cache's tensors, a row for each of the B."""
        weights, biases, inv_freq = self._fused_decode
        x = torch.ops.gpt4_kernels.decode_layers(
            self.embed_tokens(ids), positions, mask, keys, values, kv_length, weights, biases, inv_freq,
            self.config.num_attention_heads, self.config.norm_eps)  # (B, H)
        return self.lm_head(self.final_norm(x)).float()  # (B, V)

    def use_fused_decode(self, enabled: bool = True) -> bool:
        """From now on an eager decode step runs all the layers in one call of our kernel (gpt4_kernels.decode_layers)
        where the model allows it: the Llama family (RMSNorm, RoPE, SwiGLU), every layer's matmuls in blocks (w4a8's:
        quantize_ switches it on) and attention through the decode kernel. The same kernels as the eager layers',
        without Python and operator dispatch around ~20 operators a layer, and the same tokens: the default model
        3.5x faster (3.2 ms a step instead of 11.3; docs/performance.md, run 19). Prompt lookup's checks of drafts
        run fused too, and prompt chunks through gpt4_kernels.prefill_layers (the eager chunk's operations, its
        attention as Attention.forward's: a 512-token prompt 1.15x faster, run 29). Returns whether it does
        (enabled=False: the eager layers again). Like compile_decode, it assumes that the layers' modules stay as
        they are."""
        config = self.config
        linears = self._linears()
        norms = [norm for layer in self.layers for norm in (layer.attn_norm, layer.mlp_norm)]
        fits = (config.norm == "rmsnorm" and config.mlp == "swiglu" and config.position_embedding == "rope"
                and config.head_dim % 32 == 0 and self.dtype in (torch.float32, torch.bfloat16)
                and all(isinstance(m, BlocksLinear) for m in linears)
                and all(norm.weight.dtype == self.dtype for norm in norms)
                and all(layer.attn.attention_kernels for layer in self.layers))
        self._fused_decode = None
        if fits and enabled:
            weights = [t for layer in self.layers for t in (
                layer.attn_norm.weight, layer.attn.qkv_proj.blocks, layer.attn.o_proj.blocks, layer.mlp_norm.weight,
                layer.mlp.up_proj.blocks, layer.mlp.down_proj.blocks)]
            # (Biases in the model's dtype: an fp32 model's w4a8 layers keep theirs in bf16, exactly widened in eager;
            # the rotation speeds in fp32, which a bf16 model's buffer is widened to in eager.)
            biases = [None if m.bias is None else m.bias.to(self.dtype) for m in linears]
            self._fused_decode = (weights, biases, self.rope_inv_freq.float())
        return self._fused_decode is not None

    def _decode_step(self, input_ids, positions, mask, cache, kv_length=None) -> torch.Tensor:
        kv_length = kv_length or mask.shape[-1]
        return self.lm_head(self._run(input_ids, positions, mask, cache, kv_length)[:, -1]).float()  # (B, V)

    def verify_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                      kv_length: int) -> torch.Tensor:
        """Logits (S, V) in fp32 after each of one sequence's S new tokens: speculative decoding's check of a draft.

        input_ids, positions (1, S), already checked; kv_length = the last position + 1. After compile_decode() the
        compiled check runs (torch.compile's, or the `draft` graph compiled ahead of time, up to its max_draft
        tokens), the eager one otherwise.
        """
        mask = attention_mask_for(positions, kv_length, self.config.sliding_window)  # (1, 1, S, T)
        compiled = self._compiled_decode
        if 2 <= input_ids.shape[1] <= getattr(compiled, "max_draft", 0):
            try:
                return compiled.verify(input_ids, positions, mask, cache)
            except torch._dynamo.exc.TorchDynamoException as error:  # as in decode_logits: never a failed decode
                warnings.warn(f"torch.compile of the draft check failed, checking drafts eagerly from now on: "
                              f"{str(error).strip().splitlines()[0]}", RuntimeWarning, stacklevel=2)
                compiled.max_draft = 0
        if self._fused_decode is not None and not self.training:
            # The draft's S tokens as S rows of one fused step that share the sequence's cache row (views with
            # stride 0 over rows): each writes its own slot before any attends; its mask row sees slots up to its own.
            rows = input_ids.shape[1]
            keys, values = ([t[:1].expand(rows, -1, -1, -1) for t in tensors] for tensors in (cache.keys, cache.values))
            return self._fused_step(input_ids[0], positions[0], mask[0, 0, :, None, None], keys, values, kv_length)
        return self._verify_step(input_ids, positions, mask, cache)

    def _verify_step(self, input_ids, positions, mask, cache) -> torch.Tensor:
        return self.lm_head(self._run(input_ids, positions, mask, cache, mask.shape[-1])[0]).float()  # (S, V)

    def compile_decode(self, mode: str = "default") -> "GPT4LMHeadModel":
        """Run decode_logits through torch.compile (inductor; batch size and length dynamic) from now on.

        A decode step becomes a few fused C++ kernels around the matmuls instead of ~6000 small eager operators
        (int4 default model: about 2x the tokens/s). The first step compiles: about a minute per graph (one for
        a single sequence, one for batches) on 2 cores, faster from inductor's on-disk cache in later processes.
        Prompt lookup's check of a draft (verify_logits) is a third graph, compiled at the first check.

        mode="max-autotune" also freezes the weights into the graphs as constants, so that inductor can pack each
        matrix once for its own C++ GEMM templates (AVX-512 / AMX micro-kernels that dequantize int8 and int4
        weights in registers) and time them against PyTorch's kernel at the batch size the graph is first run
        with, keeping the faster. On the default model, int4: one sequence 1.2-1.5x, 8 sequences 1.7x the default
        mode's tokens/s; compiling takes two to three times as long, and each graph holds packed copies of the
        weights (peak memory 1.1 GB instead of 0.76).

        In the default mode an int4 model's 8-bit LM head multiplies in integers from here on, where the CPU has
        VNNI (Int8Linear.use_integer_matmul).

        mode="aot" uses the step compiled ahead of time by AOTInductor (gpt4.aot): built once per model, CPU and
        torch version (two or three minutes) into packages cached on disk, which later processes load in milliseconds.

        Compile after quantizing: the graphs assume the model's modules (and, for max-autotune, their weights)
        do not change. If compiling fails the step warns once and runs eagerly.
        """
        if mode not in COMPILE_MODES:
            raise ValueError(f"Unknown compile mode {mode!r}; choose one of {COMPILE_MODES}.")
        if mode == "aot":
            return self._load_compiled_ahead()
        # Dynamo checks, before reusing a graph, guards on every module attribute and parameter: ~1 ms per step.
        # This model's modules are fixed from here on, so those guards are skipped.
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        if mode == "max-autotune":
            options.update(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN")
            if "TORCHINDUCTOR_AUTOTUNE_NUM_CHOICES_DISPLAYED" not in os.environ:  # unless asked for: no timings
                # of every matmul shape's candidates on stderr, in the middle of a chat
                options.update(autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False)

        def compiled(method):
            function = types.FunctionType(method.__code__.replace(), globals(), method.__name__, method.__defaults__)
            graph = torch.compile(types.MethodType(function, self), dynamic=True, fullgraph=True, options=options)
            # Settings dynamo reads from the global config while it traces (torch.compile's options reach only
            # inductor) are set around each call of the step (~6 us each). specialize_float: the modules' float
            # attributes (norm eps, dropout p) are constants of the graph instead of symbolic inputs that every
            # step re-checks in Python (180 of the default model's 430 shape guards; ~0.1 ms a step). No duck
            # shaping: dynamo would otherwise assume that sizes equal when it first traced stay equal, e.g. a first
            # step's kv_length and the number of KV heads (3 for the default model, after a 2-token prompt), and
            # compile the whole step again (a minute here) the moment they differ.
            graph = torch._dynamo.config.patch(specialize_float=True)(graph)
            graph = torch.fx.experimental._config.patch(use_duck_shape=False)(graph)
            if mode == "max-autotune":
                # `freezing` applies to graphs compiled without autograd, which is how decoding runs.
                graph = torch._inductor.config.patch(freezing=True)(graph)
            return graph
        embedding_rows = getattr(self.embed_tokens, "weight_int8", None)
        for module in self.modules():
            if not isinstance(module, Int8Linear):
                continue
            module.frozen_in_graphs = mode == "max-autotune"  # frozen graphs may lower its integer matmuls
            if mode == "default" and module.activation_bits is None and module.weight_int8 is not None:
                # int4's 8-bit LM head in integers, where the CPU has VNNI (~0.1 s to pack here, not in an eager
                # load's cold start). AMX Xeon, int4 --compile, two models alternating in one process: 8 streams
                # 255 -> 357 tokens/s, ctx 512 66 -> 72, ctx 16 91 -> 95. Under max-autotune it was no faster
                # (inductor's templates or oneDNN's kernel for the head alike), so there the weight-only kernel stays.
                module.use_integer_matmul(keep_rows=module.weight_int8 is embedding_rows)
        # The methods' code is copied for this model (dynamo caches graphs per code object), so that no other model
        # is served its graphs. Each compiles at its first call.
        self._compiled_decode = TorchCompiledDecode(compiled(GPT4LMHeadModel._decode_step),
                                                    compiled(GPT4LMHeadModel._verify_step))
        return self

    def _load_compiled_ahead(self) -> "GPT4LMHeadModel":
        """compile_decode("aot"): the step's AOTInductor packages, loaded in milliseconds from the cache, or built
        and checked against the eager step first (two or three minutes, once per model, CPU and torch version). On any
        failure a warning, and eager decoding."""
        from . import aot

        reason = aot.unsupported(self)
        if reason is not None:
            warnings.warn(f"The decode step is not compiled ahead of time, decoding eagerly: {reason}.",
                          RuntimeWarning, stacklevel=3)
            return self
        folder = aot.package_folder(self)
        try:
            if not aot.is_built(folder):
                warnings.warn(f"Compiling the decode step ahead of time into {folder} (once for this model, CPU "
                              "and torch version; two or three minutes)...", RuntimeWarning, stacklevel=3)
                aot.build(self, folder)
            compiled = aot.CompiledDecode(self, folder)
        except Exception as error:  # export, the C++ toolchain, a package that does not load or does not agree
            warnings.warn(f"The decode step compiled ahead of time is not used, decoding eagerly: "
                          f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}",
                          RuntimeWarning, stacklevel=3)
            return self
        self._compiled_decode = compiled
        return self

    def _run(self, input_ids, positions, mask, cache, kv_length) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (B, S, H)
        if (self._fused_decode is not None and cache is not None and input_ids.shape[1] > 1 and not self.training
                and blocks_kernel_multiplies(input_ids.numel())):
            # A prompt chunk through every layer in one call too (see use_fused_decode): the same operations, the
            # norms, rotations, SiLU and cache writes on every thread, without ~20 operators' dispatch per layer.
            # (Where bf16 is native the eager layers multiply long chunks by dequantized weights, faster there.)
            weights, biases, inv_freq = self._fused_decode
            x = torch.ops.gpt4_kernels.prefill_layers(
                x, positions, mask, cache.keys, cache.values, kv_length, weights, biases, inv_freq,
                self.config.num_attention_heads, self.config.norm_eps)  # (B, S, H)
            return self.final_norm(x)
        rope = None
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(positions)
        else:
            rope = rope_cos_sin(self.rope_inv_freq, positions, x.dtype)
        x = self.dropout(x)
        for layer in self.layers:
            x = layer(x, rope, mask, cache, positions, kv_length)
        return self.final_norm(x)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                kv_length: int | None = None) -> CausalLMOutput:
        """logits (B, S, V); with labels (B, S) also the mean next-token cross-entropy (-100 = ignore).

        `position_ids` is accepted as the transformers spelling of `positions`.
        """
        positions = positions if positions is not None else position_ids
        logits = self.lm_head(self.hidden_states(input_ids, positions, cache, attention_mask, kv_length))
        loss = None
        if labels is not None:
            # Predict token t+1 from tokens <= t, as transformers does.
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss)

    # ----------------------------------------------------------------------------------------------
    # transformers-style entry points; the work is done in gpt4.weights and gpt4.generation.
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs) -> "GPT4LMHeadModel":
        """Load a named model ('gpt4'), a local folder, a .gguf file or a Hugging Face hub id."""
        from .weights import load_model

        return load_model(name_or_path, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike, **kwargs) -> None:
        """Write config.json + model.safetensors (+ tokenizer files) that transformers loads as is."""
        from .weights import save_model

        save_model(self, directory, **kwargs)

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """transformers-style generate: a tensor of ids gives prompt + new ids; a string gives new text."""
        from .generation import generate

        return generate(self, inputs, generation_config, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
