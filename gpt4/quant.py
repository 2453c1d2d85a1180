"""Quantized linear layers for fast CPU decoding (gpt-fast style), on PyTorch's own CPU kernels.

    int8: per-output-channel symmetric int8 weights. Where the CPU has VNNI (AVX-512 VNNI, AMX), integer
          matmuls (oneDNN, weights packed once) with each activation row carried as two int8 rows (~16-bit
          precision): the perplexity of bf16 activations, and batches of 8 rows at about the cost of one.
          Elsewhere `aten._weight_int8pack_mm` with bf16 activations.
    int4: group-wise affine int4 weights, `aten._weight_int4pack_mm_for_cpu` (bf16 activations)
    w8a8: the same int8 weights, and activations quantized to a single int8 per value, per row: the fastest
          mode for batches and prompts, +3-4% perplexity from the 8-bit activations.
    w4a8: int4's weights times activations quantized to int8 in groups of 32 (our kernel, gpt4/kernels; AVX-512
          VNNI or AVX2), as llama.cpp runs Q4 files: int4's decode matmuls 1.3-2.1x faster for one row, 2-2.6x for 8
          or more, +0.1-0.2% perplexity; quant="auto" takes it for block-quantized files where it runs. A file's
          5- and 6-bit groups (Q5_0, Q5_K, Q6_K) keep their bits (Q5Linear, Q6Linear), other formats and the LM
          head become 8-bit groups (Q8Linear).

Decoding one token reads every weight once, so its speed is set by bytes of weights: int8 halves bf16's bytes,
int4 quarters them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

QUANT_MODES = ("none", "int8", "int4", "w8a8", "w4a8")
INT4_MODES = ("int4", "w4a8")  # 4-bit weights: from a file's Q4_0 / Q4_1 / Q4_K groups as they are
# Int8Linear's activation_bits in each mode (in int4 mode, for the LM head when it is int8); see Int8Linear.
ACTIVATION_BITS = {"int8": 16, "int4": None, "w8a8": 8, "w4a8": None}
# From this many input rows (a prefill chunk) dequantizing the matrix to bf16 and one bf16 matmul beats the
# weight-only kernels, whose time grows with every row (measured on AVX512/AMX, 512 rows: 9x for int8, 2x for
# int4; at 128 rows int4 breaks even). Decoding (a row per sequence) keeps the kernels: fewer bytes read.
DEQUANTIZE_ROWS = 128
QUANTIZE_ROWS = 512  # rows quantized at once: the fp32 temporaries (1.2 MB for the default model) stay in cache
QUANTIZE_VALUES = 1 << 18  # at most so many values of a wider matrix (Qwen2.5's 4864-wide down projections: 53 rows)


def bf16_matmul_is_native() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX, AVX512-BF16). Elsewhere PyTorch converts bf16 in software:
    on an AVX2 EPYC a (128 x 576) @ (576 x 3072) matmul took 455 ms in bf16 and 6.6 in fp32."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def prefill_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a prompt chunk's matmul (dequantized weights) in a layer computing in `dtype`: float32 for bf16
    where bf16 is not native. (The decode kernels keep bf16 activations: PyTorch's weight-only int4 / int8 kernels
    run 7-10x faster in bf16 than in fp32 even there.)"""
    return torch.float32 if dtype == torch.bfloat16 and not bf16_matmul_is_native() else dtype


@functools.cache
def integer_matmul_available() -> bool:
    """oneDNN's int8 matmul is exact (int32 sums of byte products) with VNNI, which AMX-INT8 CPUs have too;
    without it, oneDNN's x86 int8 kernels sum pairs of products in saturating 16-bit integers."""
    return torch.backends.mkldnn.is_available() and torch.cpu._is_vnni_supported()


def _onednn_int8_matmul(rows_uint8: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(N, in) uint8 activations offset by 128 x oneDNN-packed (in, out) int8 weights -> (N, out) fp32: the
    exact integer products times the per-output-channel scales."""
    return torch.ops.onednn.qlinear_pointwise(rows_uint8, 1.0, 128, packed, scales, None, None, 1.0, 0,
                                              torch.float32, "none", [], "")


# The same as a custom operator: inductor calls it as it is. Its own lowering of the oneDNN operator wants the
# packed weights frozen into the graph as constants, which only --max-autotune's freezing does.
_int8_matmul_op = torch.library.custom_op("gpt4::int8_matmul", _onednn_int8_matmul, mutates_args=())


@_int8_matmul_op.register_fake
def _(rows_uint8, packed, scales):
    return rows_uint8.new_empty((rows_uint8.shape[0], scales.shape[0]), dtype=torch.float32)


class Int8Linear(nn.Module):
    """Per-output-channel symmetric int8 weights: w = q * scale, q in -127..127.

    activation_bits=None: the activations stay in `dtype`, multiplied by the weight-only kernel
    (`aten._weight_int8pack_mm`), whose time grows with every input row.
    activation_bits=8 (w8a8): each input row is quantized to int8 over its own max |x|, and the matmul is in
    integers; activation_bits=16: each row is two int8 rows, the quantized values and what they left over in
    steps 254 times finer, ~16-bit precision for twice the rows. Where the CPU has VNNI (AMX CPUs too) the
    integer matmuls run on oneDNN with the weights packed once into its layout: about as fast for 8 rows as
    for 1, and for one row faster than the weight-only kernel (576 x 3072, 1 / 8 rows: 122 / 135 us vs 182 /
    388 on an AVX-512 EPYC). Without VNNI, 8 falls back to `torch._int_mm` and 16 to the weight-only kernel.
    Each row's result does not depend on the other rows of the batch.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype=torch.bfloat16,
                 activation_bits: int | None = None, keep_rows: bool = False):
        """weight (out, in): a tensor, or a row reader (.shape, and row slices as tensors, e.g. read from a file).
        keep_rows: keep the plain int8 rows beside oneDNN's packed copy (a tied embedding looks tokens up in them;
        otherwise the packed copy is the only one)."""
        super().__init__()
        assert activation_bits in (None, 8, 16), activation_bits
        out_features, in_features = weight.shape
        weight_int8 = torch.empty(out_features, in_features, dtype=torch.int8)
        scales = torch.empty(out_features)
        with torch.no_grad():
            for start in range(0, out_features, QUANTIZE_ROWS):
                w = weight[start:start + QUANTIZE_ROWS].to(torch.float32, copy=True)  # (rows, in)
                # (amax and amin: torch.aminmax is 20x slower along rows, measured on 4096 x 576)
                row_scales = torch.maximum(w.amax(dim=1), -w.amin(dim=1)).clamp(min=1e-12) / 127.0  # (rows,)
                weight_int8[start:start + QUANTIZE_ROWS] = w.div_(row_scales[:, None]).round_().clamp_(-127, 127)
                scales[start:start + QUANTIZE_ROWS] = row_scales
        if activation_bits == 16 and not integer_matmul_available():
            activation_bits = None
        # An opaque tensor (not a buffer: derived, and it cannot be copied or saved), (in, out) in oneDNN's
        # blocked layout; torch._int_mm, on plain weights, reorders them on every call (2-3x slower).
        self.packed = (torch.ops.onednn.qlinear_prepack(weight_int8, None)
                       if activation_bits is not None and integer_matmul_available() else None)
        self.register_buffer("weight_int8", weight_int8 if self.packed is None or keep_rows else None)
        # Integer matmuls scale their fp32 products: fp32 scales, converted once here rather than on every call.
        self.register_buffer("scales", scales.to(dtype if activation_bits is None else torch.float32))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.activation_bits = dtype, activation_bits
        # Set by GPT4LMHeadModel.compile_decode("max-autotune"): its graphs hold the weights as constants, so
        # inductor can lower the oneDNN operator itself, to its C++ GEMM templates (VNNI / AMX micro-kernels;
        # decode 1.5x oneDNN's own kernel here).
        self.frozen_in_graphs = False

    def forward(self, x):
        shape, dtype = x.shape, x.dtype
        rows = x.reshape(-1, shape[-1])  # (N, in)
        if self.activation_bits == 8 or (self.activation_bits == 16 and rows.shape[0] < DEQUANTIZE_ROWS):
            y = self._integer_matmul(rows.float())
        elif rows.shape[0] >= DEQUANTIZE_ROWS:  # a prompt chunk: one matmul in the model dtype is faster
            compute = prefill_dtype(self.dtype)
            y = rows.to(compute) @ self._dequantized_t(compute)
        else:
            y = torch.ops.aten._weight_int8pack_mm(rows.to(self.dtype), self.weight_int8, self.scales)  # (N, out)
        y = y.reshape(*shape[:-1], self.out_features)
        y = y if self.bias is None else y + self.bias
        return y.to(dtype)  # the caller's dtype: an fp32 model with quantized layers stays fp32 between them

    def _integer_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (N, in) fp32 -> (N, out) fp32, activations quantized per row to activation_bits. (Few operators:
        in eager decoding each costs more in dispatch than in arithmetic.)"""
        n = rows.shape[0]
        # (abs and amax: linalg.vector_norm with ord=inf is 1.4x slower at one row, 11x at 512)
        step = rows.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-30) / 127.0  # (N, 1)
        scaled = rows / step  # (N, in) in -127..127
        ints = scaled.round()  # (N, in) the int8 values, as floats
        if self.activation_bits == 16:  # and what they left over (at most half a step) in steps 254 times finer
            ints = torch.cat([ints, (scaled - ints).mul_(254.0).round_()])  # (2N, in), again in -127..127
        if self.packed is None:  # no VNNI (activation_bits 8 only)
            products = torch._int_mm(ints.to(torch.int8), self.weight_int8.t()) * self.scales  # (N, out) fp32
        else:
            # uint8 offset by 128: the kernel's activation type (VNNI multiplies unsigned by signed bytes)
            matmul = _int8_matmul_op if torch.compiler.is_compiling() and not self.frozen_in_graphs \
                else _onednn_int8_matmul
            products = matmul(ints.add_(128).to(torch.uint8), self.packed, self.scales)  # (N or 2N, out)
        if self.activation_bits == 16:
            products = products[:n] + products[n:] / 254.0  # (N, out)
        return products * step

    def use_integer_matmul(self, keep_rows: bool) -> bool:
        """A weight-only layer (activation_bits=None) from now on multiplies in integers with ~16-bit activations
        (activation_bits=16), where the CPU has VNNI; returns whether it does. For the default model's 49152 x
        576 LM head (AMX Xeon): 0.88 ms for one row instead of 1.31, 1.19 for 8 instead of 4.26, but packing
        takes 0.09-0.15 s, which compile_decode pays and an eager load's cold start does not. keep_rows: keep the
        plain rows (a tied embedding looks tokens up in them)."""
        assert self.activation_bits is None and self.weight_int8 is not None
        if not integer_matmul_available():
            return False
        self.packed = torch.ops.onednn.qlinear_prepack(self.weight_int8, None)
        if not keep_rows:
            self.weight_int8 = None
        # Integer products are scaled in fp32. A new tensor: a tied embedding keeps its own (model dtype) scales.
        self.scales = self.scales.float()
        self.activation_bits = 16
        return True

    def _dequantized_t(self, dtype: torch.dtype) -> torch.Tensor:
        """(in, out) weights in dtype, from the plain rows or (0.4 ms for 576 x 3072) from the packed copy."""
        if self.weight_int8 is not None:
            return (self.weight_int8.to(dtype) * self.scales.to(dtype)[:, None]).t()
        return self.packed.to_dense().to(dtype) * self.scales.to(dtype)

    def dequantized(self) -> torch.Tensor:
        return self._dequantized_t(torch.float32).t()


class Int8Embedding(nn.Module):
    """Token embedding looked up in int8 rows (w = q * scale per row) and scaled to the model dtype.

    Built from an Int8Linear: with a tied LM head it is that head's own table, so the vocabulary matrix is held
    once (the default model: 28 MB instead of a 57 MB bf16 table beside the 28 MB int8 head).
    """

    def __init__(self, table: Int8Linear, dtype: torch.dtype):
        super().__init__()
        assert table.weight_int8 is not None, "an embedding's table keeps its plain rows (Int8Linear keep_rows)"
        self.register_buffer("weight_int8", table.weight_int8)  # (vocab, hidden); shared, not copied
        self.register_buffer("scales", table.scales)  # (vocab,)
        self.dtype = dtype

    def forward(self, ids):
        rows = F.embedding(ids, self.weight_int8).to(self.dtype)  # (..., hidden); |q| <= 127 is exact in bf16
        return rows * F.embedding(ids, self.scales[:, None]).to(self.dtype)


class Int4Linear(nn.Module):
    """Affine int4 in groups along the input dimension: w = (q - 8) * scale + zero, q in 0..15."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, dtype=torch.bfloat16):
        super().__init__()
        out_features, in_features = q.shape  # q (out, in) int in 0..15; scales, zeros (out, in // group)
        if out_features % 64 == 0 and _kernel_layout_is_known():
            # Packed with byte operations (PyTorch's packing op wants int32 q: 4x the bytes, slow to load), and
            # prefill unpacks this same copy: the weights are held once.
            packed, plain_nibbles = _pack_kernel_layout(q.to(torch.uint8)), None
        else:  # PyTorch's packing, and the same nibbles two to a byte, in plain order, for prefill
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            q8 = q.to(torch.uint8).reshape(out_features, in_features // 2, 2)
            plain_nibbles = q8[..., 0] | (q8[..., 1] << 4)  # (out, in // 2)
        self._hold(packed, plain_nibbles, scales, zeros, group_size, bias, dtype, in_features)

    def _hold(self, packed, plain_nibbles, scales, zeros, group_size, bias, dtype, in_features):
        self.register_buffer("packed", packed)
        self.register_buffer("nibbles", plain_nibbles)
        # The kernel wants (in // group, out, 2): scale and zero of each group and output channel.
        scales_and_zeros = torch.empty(scales.shape[1], scales.shape[0], 2, dtype=dtype)
        scales_and_zeros[..., 0], scales_and_zeros[..., 1] = scales.t(), zeros.t()
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.group_size, self.in_features, self.out_features = group_size, in_features, scales.shape[0]

    @classmethod
    def from_block_nibbles(cls, nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           bias: torch.Tensor | None, dtype=torch.bfloat16) -> "Int4Linear":
        """From groups of 32 as GGUF's Q4_0 blocks store them: nibbles (out, in // 2) uint8, byte j of a
        group's 16 holding element j (low nibble) and element 16 + j (high), or the same as (out, in // 32, 16),
        which may be a view into the file's blocks (GGUFFile.int4_groups); scales, zeros (out, in // 32).

        Repacked for the kernel byte to byte, never as a byte per value (a third of the default model's load).
        """
        out_features, in_features = nibbles.shape[0], nibbles[0].numel() * 2
        if out_features % 64 or not _kernel_layout_is_known():
            return cls(unpack_block_nibbles(nibbles.reshape(out_features, -1)), scales, zeros, 32, bias, dtype)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._hold(_pack_kernel_layout_from_blocks(nibbles), None, scales, zeros, 32, bias, dtype, in_features)
        return layer

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int = 32,
                   dtype=torch.bfloat16) -> "Int4Linear":
        w = weight.detach().float()
        out_features, in_features = w.shape
        groups = w.reshape(out_features, in_features // group_size, group_size)
        lo, hi = groups.amin(-1), groups.amax(-1)  # (out, in // group)
        scales = ((hi - lo) / 15).clamp(min=1e-12)
        q = ((groups - lo[..., None]) / scales[..., None]).round().clamp(0, 15).reshape(out_features, in_features)
        return cls(q, scales, lo + 8 * scales, group_size, bias, dtype)

    def forward(self, x):
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, shape[-1])  # (N, in)
        if x.shape[0] >= DEQUANTIZE_ROWS:
            compute = prefill_dtype(self.scales_and_zeros.dtype)
            y = x.to(compute) @ self.dequantized_t(compute)
        else:  # (in the scales' dtype, which the kernel wants)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(self.scales_and_zeros.dtype), self.packed,
                                                           self.group_size, self.scales_and_zeros)
        y = y.reshape(*shape[:-1], self.out_features)
        y = y if self.bias is None else y + self.bias
        return y.to(dtype)  # the caller's dtype: an fp32 model with quantized layers stays fp32 between them

    def scales_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scales and zeros, (out, in // group) each (views of scales_and_zeros, the kernel's layout)."""
        scales, zeros = self.scales_and_zeros.transpose(0, 1).unbind(-1)
        return scales, zeros

    def dequantized_q(self) -> torch.Tensor:
        """q (out, in) in 0..15, uint8 (a transposed view of _q_t)."""
        return self._q_t().t()

    def _q_t(self) -> torch.Tensor:
        """q transposed, (in, out) in 0..15, uint8: the order prefill's dequantization writes."""
        if self.nibbles is None:
            return _unpack_kernel_layout_t(self.packed, self.out_features, self.in_features)
        q = torch.stack((self.nibbles & 15, self.nibbles >> 4), dim=-1).view(self.out_features, self.in_features)
        return q.t().contiguous()

    def dequantized(self) -> torch.Tensor:
        """The weight (out, in) in the compute dtype (a transposed view of dequantized_t)."""
        return self.dequantized_t().t()

    def dequantized_t(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight transposed, (in, out), in dtype (default: the compute dtype): (q - 8) * scale + zero, rounded
        once.

        The layout a prefill matmul reads; in it each group's scale and zero are rows broadcast down the group's
        input positions, one contiguous multiply-add pass (1.5-2x faster than broadcasting them along rows of
        (out, in), where they repeat every 32 elements).
        """
        out_features, in_features, groups = self.out_features, self.in_features, self.in_features // self.group_size
        q_t = self._q_t()  # (in, out)
        # q - 8 in 0..15 - 8 is exact in int8 and in the compute dtype; addcmul rounds its result once.
        dtype = dtype or self.scales_and_zeros.dtype
        q_t = (q_t.view(torch.int8) - 8).to(dtype).view(groups, self.group_size, out_features)
        scale_zero = self.scales_and_zeros[:, None].to(dtype)  # (groups, 1, out, 2)
        w_t = torch.addcmul(scale_zero[..., 1].contiguous(), q_t, scale_zero[..., 0].contiguous())
        return w_t.view(in_features, out_features)


def blocks_kernel_multiplies(rows: int) -> bool:
    """Whether a BlocksLinear multiplies `rows` rows in our kernel, rather than by its weights dequantized (prompt
    chunks where bf16 is native)."""
    return rows < DEQUANTIZE_ROWS or not bf16_matmul_is_native()


class BlocksLinear(nn.Module):
    """A linear layer held as one stream of blocks, each 16 output rows x a group of 32 inputs, that our kernel
    (gpt4/kernels/w4a8.cpp, AVX-512 VNNI or AVX2) multiplies by activations quantized to int8 in the same groups of 32.
    Prompt chunks of DEQUANTIZE_ROWS rows or more dequantize the blocks (in C++) and multiply in bf16 where bf16 is
    native (AMX, AVX512-BF16); elsewhere the kernel beats a dequantized fp32 matmul at any number of rows (AVX2 EPYC,
    3072 x 576: 1.2x at 512 rows, 1.7-1.9x at 128)."""

    kind: str  # the kernel's operators: gpt4_kernels.{kind}_matmul and {kind}_dequantize

    def _hold(self, blocks: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        from .kernels import load_w4a8

        load_w4a8()  # (GPT4Error where the kernel cannot run here)
        self.register_buffer("blocks", blocks)  # (out / 16, in / 32, bytes of a block)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.in_features, self.out_features, self.dtype = 32 * blocks.shape[1], 16 * blocks.shape[0], dtype

    def forward(self, x):
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, shape[-1])  # (N, in)
        if not blocks_kernel_multiplies(x.shape[0]):
            y = x.to(self.dtype) @ self.dequantized_t()
        else:  # in x's dtype, float32 or bfloat16
            y = getattr(torch.ops.gpt4_kernels, f"{self.kind}_matmul")(x, self.blocks)
        y = y.reshape(*shape[:-1], self.out_features)
        y = y if self.bias is None else y + self.bias
        return y.to(dtype)

    def dequantized_t(self) -> torch.Tensor:
        """The weight transposed, (in, out), in the compute dtype: computed in fp32, rounded once."""
        return getattr(torch.ops.gpt4_kernels, f"{self.kind}_dequantize")(self.blocks, self.dtype)

    def dequantized(self) -> torch.Tensor:
        return self.dequantized_t().t()


def dequantizes_prompt_chunks(layers: Iterable[nn.Module]) -> bool:
    """Whether any of the layers multiplies a prompt chunk by a copy of its weight dequantized for that chunk (a cost
    each chunk pays again, which longer chunks spread over more tokens), rather than in its integer kernel or as it
    is."""
    blocks = False
    for m in layers:
        if isinstance(m, Int4Linear) or (isinstance(m, Int8Linear) and m.activation_bits != 8):
            return True
        blocks = blocks or isinstance(m, BlocksLinear)
    return blocks and bf16_matmul_is_native()


def _float16_holds(values: torch.Tensor) -> bool:
    """Whether float16 holds every value to its precision, 2^-11 relative (values beyond its range, or rounded
    among its subnormals, it does not)."""
    values = values.float()
    held = values.half().float()
    # (A file's own float16 numbers pass the first, cheap test: 0.1 ms a layer of the load.)
    return torch.equal(held, values) or bool(((held - values).abs() <= values.abs() * 2.0 ** -11).all())


def _int32_words(groups: torch.Tensor) -> torch.Tensor:
    """(rows, groups, bytes) uint8 as (rows, groups, bytes / 4) int32, each 4 bytes one element: a permuted copy
    then moves a quarter of the elements. A view where the bytes lie 4-aligned (in Q4_1's 20-byte blocks), else a
    copy (Q4_0's 18, Q8_0's 34)."""
    aligned = groups.storage_offset() % 4 == 0 and all(stride % 4 == 0 for stride in groups.stride()[:-1])
    return (groups if aligned and groups.stride(-1) == 1 else groups.contiguous()).view(torch.int32)


class W4A8Linear(BlocksLinear):
    """4-bit weights in groups of 32, w = d * q + m, multiplied by activations quantized to int8 in the same groups
    (AVX-512 VNNI, or AVX2), as llama.cpp runs a Q4_0 / Q4_1 file: a decode step's matmuls 1.3-2.1x (one row) to 2-2.6x
    (8 rows or more) faster than PyTorch's int4 kernel, at +0.1-0.2% perplexity. d and m are float16, a Q4 file's
    own numbers. quantize_ keeps Int4Linear for layers the kernel cannot hold (see fits)."""

    kind = "w4a8"

    def __init__(self, nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None,
                 dtype=torch.bfloat16):
        """Int4Linear.from_block_nibbles's arguments: nibbles (out, in // 32, 16) as GGUF's Q4 blocks store them
        (byte j: element j low, 16 + j high), possibly a view between the file's scales; scales, zeros
        (out, in // 32), w = (q - 8) * scale + zero."""
        super().__init__()
        n, groups = scales.shape
        # (values float16 holds: quantize_ asks fits first, ~0.1 ms a layer not spent twice at load)
        assert n % 16 == 0 and nibbles[0].numel() == 16 * groups, (nibbles.shape, scales.shape)
        d = scales.float()
        # A Q4_1 file's own m: its zero, m + 8 d in fp32, is exact while |m| and |8 d| are within 2^13 of each
        # other (the default model's are: tested bit for bit).
        m = zeros.float() - 8 * d
        # One stream that a call reads in order: block (b, g) holds output rows 16 b.. 16 b + 15 of group g, its
        # 256 bytes of nibbles in 4 chunks of 64 (chunk c: row r's bytes 4c..4c+3 at 4r..4r+3), then d and m of the
        # 16 rows in float16.
        blocks = torch.empty(n // 16, groups, 320, dtype=torch.uint8)
        _pack_nibbles(blocks, nibbles)
        _pack_halves(blocks, 256, d)
        _pack_halves(blocks, 288, m)
        self._hold(blocks, bias, dtype)

    @classmethod
    def from_int4(cls, layer: Int4Linear) -> "W4A8Linear":
        """The same groups (Int4Linear's fits-checked scales and zeros; group_size 32)."""
        nibbles = pack_block_nibbles(layer.dequantized_q()).view(layer.out_features, -1, 16)  # (out, in / 32, 16)
        return cls(nibbles, *layer.scales_zeros(), layer.bias, layer.scales_and_zeros.dtype)

    @staticmethod
    def fits(scales: torch.Tensor, zeros: torch.Tensor) -> bool:
        """Whether the kernel can hold groups of 32 with these scales and zeros (out, in / 32): output rows in
        blocks of 16, and d and m that float16 holds to its precision (a Q4 file's exactly)."""
        d = scales.float()
        return scales.shape[0] % 16 == 0 and _float16_holds(d) and _float16_holds(zeros.float() - 8 * d)


def _pack_nibbles(blocks: torch.Tensor, nibbles: torch.Tensor) -> None:
    """Bytes 0..255 of each block (b, g): output rows 16 b.. 16 b + 15 of group g, their 16 bytes of nibbles (GGUF's
    Q4 / Q5 layout: byte j holds element j low, element 16 + j high) in 4 chunks of 64, chunk c holding row r's bytes
    4c..4c+3 at 4r..4r+3. nibbles (out, in // 32, 16), possibly a view between a file's scales."""
    n, groups = nibbles.shape[:2]
    words = _int32_words(nibbles.reshape(n, groups, 16)).view(n // 16, 16, groups, 4)  # (b, row, g, chunk)
    blocks.view(torch.int32)[..., :64].view(n // 16, groups, 4, 16).copy_(words.permute(0, 2, 3, 1))


def _pack_halves(blocks: torch.Tensor, start: int, values: torch.Tensor) -> None:
    """Bytes start..start+31 of each block (b, g): the 16 rows' values (out, in // 32) of group g in float16."""
    rows, groups = values.shape
    blocks[..., start:start + 32].view(torch.float16).copy_(values.reshape(rows // 16, 16, groups).transpose(1, 2))


def _pack_bit_plane(blocks: torch.Tensor, start: int, bits: torch.Tensor) -> None:
    """Bytes start..start+63 of each block (b, g): a bit plane, byte 4r + i's bit j the bit of row r's element 4j + i
    of group g (the kernel adds a power of two to byte 4r + i of its unpacked q[j] where it is set: byte 4r + i of
    q[j] holds that element). bits (out, in // 32, 4) bytes, bit k of their little-endian word element k's."""
    n, groups = bits.shape[:2]
    # Plane byte i: bits i, 4 + i, .., 28 + i of the word, moved together in three steps (the masks drop the sign
    # bits an arithmetic shift brings in).
    x = (_int32_words(bits).view(n, groups, 1) >> torch.arange(4, dtype=torch.int32)) & 0x11111111
    x = (x | (x >> 3)) & 0x03030303
    x = (x | (x >> 6)) & 0x000F000F
    plane = ((x | (x >> 12)) & 0xFF).to(torch.uint8)  # (out, groups, 4)
    blocks[..., start:start + 64].view(n // 16, groups, 16, 4).copy_(plane.view(n // 16, 16, groups, 4).transpose(1, 2))


class Q5Linear(BlocksLinear):
    """5-bit weights in groups of 32, w = d * q + m (q in 0..31), multiplied by activations quantized to int8 in the
    same groups, as llama.cpp runs them: GGUF's Q5_0 blocks (m = -16 d; Q4_K_M files hold most of their layers so)
    in 0.69 bytes a weight where Q8Linear's groups take 1.06, Q5_K's sub-blocks of 32 (d and m of each, float16) in
    0.75."""

    kind = "q5"

    def __init__(self, nibbles: torch.Tensor, fifth: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                 bias: torch.Tensor | None, dtype=torch.bfloat16):
        """GGUFFile.int5_groups: nibbles (out, in // 32, 16) bytes of the low 4 bits (see _pack_nibbles); fifth
        (out, in // 32, 4) bytes, bit k of their little-endian word the fifth bit of element k; d, m (out, in // 32)
        float. Where every m is -16 d, Q5_0's blocks (kind q5, float16 d); else each group's m too (kind q5k)."""
        super().__init__()
        n, groups = d.shape
        assert n % 16 == 0 and nibbles.shape == (n, groups, 16) and fifth.shape == (n, groups, 4), (nibbles.shape,)
        offsets = not torch.equal(m, -16 * d)
        if offsets:
            self.kind = "q5k"
        # Block (b, g): the nibbles as w4a8's; then the fifth bits' plane (byte 4r + i's bit j row r's element 4j + i:
        # the kernel adds 16 to those bytes of its unpacked q[j]); then the 16 rows' d in float16 (and their m).
        blocks = torch.empty(n // 16, groups, 384 if offsets else 352, dtype=torch.uint8)
        _pack_nibbles(blocks, nibbles)
        _pack_bit_plane(blocks, 256, fifth)
        _pack_halves(blocks, 320, d)
        if offsets:
            _pack_halves(blocks, 352, m)
        self._hold(blocks, bias, dtype)

    @staticmethod
    def fits(d: torch.Tensor, m: torch.Tensor) -> bool:
        """Whether float16 holds these d and m (out, in // 32) to its precision (a Q5_0 file's d exactly)."""
        return d.shape[0] % 16 == 0 and _float16_holds(d) and _float16_holds(m)

    @staticmethod
    def weights(nibbles: torch.Tensor, fifth: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The groups' weights (out, in) in float32, w = d * q + m."""
        n, groups = d.shape
        q = unpack_block_nibbles(nibbles.reshape(n, -1)) + 16 * unpack_bits(fifth.reshape(n, -1))  # (out, in)
        return (q.float().view(n, groups, 32) * d[..., None] + m[..., None]).flatten(1)


class Q6Linear(BlocksLinear):
    """6-bit weights in groups of 32, w = d * (q - 32) (q in 0..63) with a d for each half of a group: GGUF's Q6_K
    (sub-blocks of 16, d * an int8 scale each), in 0.875 bytes a weight where Q8Linear's groups take 1.06 (and round
    the weights once more). Q4_K_M files hold some v and down projections so, Q6_K files every layer."""

    kind = "q6"

    def __init__(self, nibbles: torch.Tensor, fifth: torch.Tensor, sixth: torch.Tensor, d: torch.Tensor,
                 bias: torch.Tensor | None, dtype=torch.bfloat16):
        """GGUFFile.int6_groups: nibbles (out, in // 32, 16) bytes of the low 4 bits (see _pack_nibbles); fifth and
        sixth (out, in // 32, 4) bytes of the fifth and sixth bits (bit k of their little-endian word: element k's);
        d (out, in // 32, 2) float, the d of elements 0..15 and of 16..31."""
        super().__init__()
        n, groups = d.shape[:2]
        assert n % 16 == 0 and nibbles.shape == (n, groups, 16) and d.shape == (n, groups, 2), (nibbles.shape,)
        # Block (b, g): the nibbles as w4a8's, the fifth bits' plane as Q5Linear's, the sixth bits' likewise; then the
        # 16 rows' d of the group's first half in float16, and of its second.
        blocks = torch.empty(n // 16, groups, 448, dtype=torch.uint8)
        _pack_nibbles(blocks, nibbles)
        _pack_bit_plane(blocks, 256, fifth)
        _pack_bit_plane(blocks, 320, sixth)
        _pack_halves(blocks, 384, d[..., 0])
        _pack_halves(blocks, 416, d[..., 1])
        self._hold(blocks, bias, dtype)

    @staticmethod
    def fits(d: torch.Tensor) -> bool:
        """Whether float16 holds these d (out, in // 32, 2) to its precision."""
        return d.shape[0] % 16 == 0 and _float16_holds(d)

    @staticmethod
    def weights(nibbles: torch.Tensor, fifth: torch.Tensor, sixth: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """The groups' weights (out, in) in float32."""
        n, groups = d.shape[:2]
        q = (unpack_block_nibbles(nibbles.reshape(n, -1)) + 16 * unpack_bits(fifth.reshape(n, -1))
             + 32 * unpack_bits(sixth.reshape(n, -1)))  # (out, in) in 0..63
        return ((q.float() - 32).view(n, groups, 2, 16) * d[..., None]).flatten(1)


class Q8Linear(BlocksLinear):
    """8-bit weights in groups of 32, w = d * q (q in -128..127, d float16: GGUF's Q8_0 blocks), multiplied by
    activations quantized to int8 in the same groups, as llama.cpp runs a Q8_0 matrix: w4a8's LM head, where every
    logit goes through it. The default model's tied 49152 x 576 head in its file's own numbers: 0.59 ms a row
    against 0.82 for Int8Linear's integer matmul (16-bit activations) and 1.05 for the weight-only kernel; 8 rows
    1.12 ms against 1.19 and 3.89 (benchmarks/bench_lm_head.py). A tied embedding looks its rows up in the same
    blocks (Q8Embedding)."""

    kind = "q8"

    def __init__(self, q: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None, dtype=torch.bfloat16):
        """q (out, in // 32, 32) int8, possibly a view between a file's scales (GGUFFile.int8_groups); d
        (out, in // 32) float (float16 values: see fits)."""
        super().__init__()
        assert q.shape == (*d.shape, 32) and q.dtype == torch.int8, (q.shape, d.shape)
        self._pack(lambda start, stop: (q[start:stop], d[start:stop]), *d.shape, bias, dtype)

    @classmethod
    def from_groups(cls, read, rows: int, groups: int, bias: torch.Tensor | None, dtype=torch.bfloat16) -> "Q8Linear":
        """The same from read(start, stop) -> (q, d) of rows start..stop-1, asked for QUANTIZE_ROWS rows at a time: a
        file's vocabulary table (GGUFFile.int8_groups of a range of rows) is then never held whole in another form."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._pack(read, rows, groups, bias, dtype)
        return layer

    def _pack(self, read, n: int, groups: int, bias, dtype) -> None:
        assert n % 16 == 0 and QUANTIZE_ROWS % 16 == 0, n
        # Block (b, g): rows 16 b.. 16 b + 15 of group g, 512 bytes in 8 chunks of 64 (chunk j: row r's values
        # 4j..4j+3 at 4r..4r+3) as q + 128, the unsigned bytes VNNI multiplies (q + 128 = q XOR 128 in two's
        # complement); then the 16 rows' d in float16. Packed a slice of rows at a time (a file's q, between 2-byte
        # scales, is copied out a slice at a time).
        blocks = torch.empty(n // 16, groups, 544, dtype=torch.uint8)
        flip = -0x7F7F7F80  # 0x80808080 as an int32: 128 in each byte
        for start in range(0, n, QUANTIZE_ROWS):
            stop = min(start + QUANTIZE_ROWS, n)
            q, d = read(start, stop)
            rows, part = stop - start, blocks[start // 16:stop // 16]
            assert q.shape == (rows, groups, 32) and q.dtype == torch.int8, (q.shape, rows, groups)
            # A row's 4 bytes of a chunk move as one int32.
            words = _int32_words(q.view(torch.uint8)).view(rows // 16, 16, groups, 8)  # (b, row, g, chunk)
            torch.bitwise_xor(words.permute(0, 2, 3, 1), flip,
                              out=part.view(torch.int32)[..., :128].view(rows // 16, groups, 8, 16))
            _pack_halves(part, 512, d)
        self._hold(blocks, bias, dtype)

    @staticmethod
    def quantize(weight, float16_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, d) as llama.cpp quantizes Q8_0, bit for bit: d = max |w| / 127 of each group, q = w * (1 / d) rounded
        half away from zero; d in float32, which Q8Linear stores in float16 (see fits). weight (out, in): a tensor
        or a row reader (see Int8Linear), read a slice of rows at a time. float16_scales: d rounded to float16
        first and q computed against it (clamped to +-127), so that any d fits, tiny ones among float16's
        subnormals included (weights of 1e-3 and less, e.g. in a K-quant file's down projections)."""
        out_features, in_features = weight.shape
        q = torch.empty(out_features, in_features // 32, 32, dtype=torch.int8)
        d = torch.empty(out_features, in_features // 32)
        step = max(1, min(QUANTIZE_ROWS, QUANTIZE_VALUES // in_features))  # (a wide matrix in fewer rows at once)
        with torch.no_grad():
            for start in range(0, out_features, step):
                groups = weight[start:start + step].to(torch.float32).unflatten(1, (-1, 32))  # (rows, g, 32)
                scales = groups.abs().amax(-1) / 127  # (rows, g)
                if float16_scales:
                    scales = scales.half().float()
                scaled = groups * torch.where(scales == 0, 0, 1 / scales)[..., None]
                magnitude = scaled.abs()
                whole = magnitude.floor()
                rounded = whole + (2 * (magnitude - whole)).floor_()  # half away from zero, as C's roundf
                if float16_scales:
                    rounded.clamp_(max=127)
                q[start:start + step] = rounded.copysign_(scaled)
                d[start:start + step] = scales  # (stored in float16 by Q8Linear)
        return q, d

    @staticmethod
    def fits(shape, d: torch.Tensor | None = None) -> bool:
        """Whether the kernel can hold a matrix of this shape (out, in) (and these d, when given: float16 holds
        them, as a file's are)."""
        return shape[0] % 16 == 0 and shape[1] % 32 == 0 and (d is None or _float16_holds(d))


class Q8Embedding(nn.Module):
    """Token embedding looked up in Q8Linear's blocks (a tied head's own: the vocabulary matrix held once)."""

    def __init__(self, table: Q8Linear, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("blocks", table.blocks)  # shared, not copied
        self.dtype = dtype

    def forward(self, ids):
        return torch.ops.gpt4_kernels.q8_rows(self.blocks, ids, self.dtype)  # (..., hidden)


class BlockEmbedding(nn.Module):
    """Token embedding looked up in a file's own block rows (e.g. GGUF's Q5_0), decoded for the ids asked for.

    For an untied table, which only lookups read: held as the file holds it, where an int8 copy would round it again
    and take more bytes (Qwen2.5-Coder-0.5B's 152k x 896 Q5_0 table: 94 MB instead of 145 in 8-bit groups).
    """

    def __init__(self, rows: torch.Tensor, width: int, decode, dtype: torch.dtype):
        """rows (vocab, bytes a row) uint8; decode(raw) turns whole rows' bytes (flat) into their values (flat,
        float32), `width` a row."""
        super().__init__()
        self.register_buffer("rows", rows)
        self.width, self.decode, self.dtype = width, decode, dtype

    def forward(self, ids):
        raw = F.embedding(ids.reshape(-1), self.rows)  # (n, bytes a row)
        return self.decode(raw.reshape(-1)).to(self.dtype).view(*ids.shape, self.width)  # (..., width)


def _pack_kernel_layout(q: torch.Tensor) -> torch.Tensor:
    """q (out, in) uint8 in 0..15 -> (out, in // 2) bytes in `_convert_weight_to_int4pack_for_cpu`'s layout: each
    block of 64 output rows is (in, 32) bytes, the low nibble of byte i holding row i of the block and the high
    nibble row 32 + i."""
    out_features, in_features = q.shape
    halves = q.view(out_features // 64, 2, 32, in_features)  # (blocks, half, i, in)
    packed = (halves[:, 0] | (halves[:, 1] << 4)).transpose(1, 2)  # (blocks, in, 32)
    return packed.contiguous().view(out_features, in_features // 2)


def _pack_kernel_layout_from_blocks(nibbles: torch.Tensor) -> torch.Tensor:
    """_pack_kernel_layout(unpack_block_nibbles(nibbles)), computed on the bytes as they are: nibbles (out, in // 2)
    or (out, in // 32, 16), read where they lie (e.g. between the blocks' scales)."""
    out_features, half_in = nibbles.shape[0], nibbles[0].numel()
    rows = nibbles.view(out_features // 64, 2, 32, half_in // 16, 16)  # (block, half, i, group, j)
    first, second = rows[:, 0], rows[:, 1]  # rows i and 32 + i of each block of 64: (block, i, group, j)
    packed = torch.empty(out_features // 64, half_in // 16, 2, 16, 32, dtype=torch.uint8)  # (block, in, i)
    # Each result written straight to its place in the layout (a group's element j, then its element 16 + j; row
    # i's nibble low, row 32 + i's high): one transposing pass, not a stacked copy and then a transposed one
    # (2.3x faster for 3072 x 576).
    torch.bitwise_or(first & 15, second << 4, out=packed[:, :, 0].permute(0, 3, 1, 2))
    torch.bitwise_or(first >> 4, second & 0xF0, out=packed[:, :, 1].permute(0, 3, 1, 2))
    return packed.view(out_features, half_in)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., 8 n) values 0 / 1 -> (..., n) bytes, element 8 j + k bit k of byte j (unpack_bits' inverse). Each 8 bytes
    as one int64: times 0x0102040810204080, byte k's bit lands on bit 56 + k, and no two products overlap."""
    words = bits.to(torch.uint8).contiguous().view(torch.int64)  # (..., n)
    return ((words * 0x0102040810204080) >> 56).to(torch.uint8)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """(..., n) bytes -> (..., 8 n) values 0 / 1, element 8 j + k bit k of byte j (GGUF's fifth bits of a group)."""
    return ((packed[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1).flatten(-2)


def pack_block_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(..., 32 g) values 0..15 -> (..., 16 g) bytes of 4-bit blocks (unpack_block_nibbles' inverse)."""
    halves = q.unflatten(-1, (-1, 2, 16))  # (..., g, half, 16)
    return (halves[..., 0, :] | (halves[..., 1, :] << 4)).flatten(-2)


def unpack_block_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """(..., 16 g) bytes of 4-bit blocks (byte j: element j low, element 16 + j high) -> (..., 32 g) values."""
    blocks = nibbles.unflatten(-1, (-1, 16))
    return torch.cat((blocks & 15, blocks >> 4), dim=-1).flatten(-2)


def _unpack_kernel_layout_t(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """q transposed, (in, out) in 0..15, from the kernel's layout (see _pack_kernel_layout)."""
    blocks = packed.view(out_features // 64, in_features, 32).transpose(0, 1)  # (in, out // 64, 32), a view
    # cat writes its result in (in, out) order: the transpose costs no pass of its own (3072 x 576: 0.42 -> 0.31 ms)
    return torch.cat((blocks & 15, blocks >> 4), dim=2).view(in_features, out_features)  # (in, out // 64, 64)


@functools.cache
def _kernel_layout_is_known() -> bool:
    """Whether this PyTorch build packs int4 weights as _pack_kernel_layout does. The layout is private to PyTorch,
    so it is checked once per process on random matrices; if it ever differs, the layers are packed by PyTorch's
    op and keep a plain copy of their nibbles for prefill."""
    generator = torch.Generator().manual_seed(0)
    for shape in ((128, 64), (64, 96)):
        q = torch.randint(0, 16, shape, dtype=torch.int32, generator=generator)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        ours = _pack_kernel_layout(q.to(torch.uint8))
        if packed.shape != ours.shape or not torch.equal(packed, ours) \
                or not torch.equal(_unpack_kernel_layout_t(ours, *shape).t().int(), q):
            return False
    return True


def quantize_(model: nn.Module, mode: str, group_size: int = 32, exact_int4=None, embedding_rows=None,
              embedding_groups=None, weights=None, exact_int8=None, exact_int5=None, exact_int6=None) -> nn.Module:
    """Replace the model's nn.Linear layers in place with quantized ones (see the module's docstring for the
    modes); returns the model.

    exact_int4 (anything with .get(module name), e.g. a dict) gives (nibbles, scale, zero) groups of 32 taken
    straight from a 4-bit file (Int4Linear.from_block_nibbles); those modules use them instead of re-quantizing.
    In int4 mode the LM head (tied to the embedding or not) is int8 unless the file holds it in 4 bits: every
    logit goes through it, and 4 bits there cost the default model 5% perplexity (its head is Q8_0 in the file)
    for a ~10% faster decode; in w4a8 mode it is Q8Linear, in groups of 32 as a Q8_0 file's (where the kernel
    holds it). The token embedding becomes an int8 lookup (Int8Embedding, or Q8Embedding in w4a8 mode), sharing a
    tied head's table; embedding_rows (a row reader, see Int8Linear) stands for an embedding loaded as a shape-only
    placeholder, embedding_groups reads its 8-bit groups as a file holds them, (start, stop) -> (q, d) of those rows
    (GGUFFile.int8_groups: w4a8 takes them as they are), and weights (anything with .get(module name)) gives the weights
    of linear layers loaded so. In w4a8 mode exact_int8 (likewise) gives 8-bit groups of 32 (q, d) for the layers a file
    holds in other block formats, which become Q8Linear (Int8Linear where float16 cannot hold their d), and
    exact_int5 a file's Q5_0 / Q5_K groups (GGUFFile.int5_groups), which become Q5Linear (likewise), and exact_int6
    its Q6_K groups (GGUFFile.int6_groups), which become Q6Linear (likewise)."""
    if mode not in QUANT_MODES:
        raise ValueError(f"Unknown quantization {mode!r}; choose one of {QUANT_MODES}.")
    if mode == "none":
        return model
    exact_int4 = exact_int4 or {}
    _quantize_embedding_(model, mode, exact_int4, embedding_rows, embedding_groups)
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            full_name = f"{parent_name}.{name}" if parent_name else name
            exact = exact_int4.get(full_name) if mode in INT4_MODES else None
            five = exact_int5.get(full_name) if exact is None and exact_int5 is not None else None
            six = exact_int6.get(full_name) if exact is None and exact_int6 is not None else None
            groups = exact_int8.get(full_name) if exact is None and exact_int8 is not None else None  # (q, d)
            weight, q8 = child.weight, None
            if five is not None and Q5Linear.fits(*five[2:]):  # a file's Q5_0 / Q5_K groups as they are (w4a8)
                setattr(parent, name, Q5Linear(*five, child.bias))
                continue
            if six is not None and Q6Linear.fits(six[3]):  # a file's Q6_K groups as they are (w4a8)
                setattr(parent, name, Q6Linear(*six, child.bias))
                continue
            if five is not None or six is not None:  # d or m that float16 cannot hold: Int8Linear, from the weights
                weight = Q5Linear.weights(*five) if five is not None else Q6Linear.weights(*six)
            elif groups is not None:  # a file's layer in 8-bit groups (w4a8)
                q8 = groups if Q8Linear.fits(weight.shape, groups[1]) else None
                if q8 is None:  # d that float16 cannot hold: Int8Linear, from the groups' weights
                    weight = (groups[0].float() * groups[1][..., None]).flatten(1)
            else:
                if weight.is_meta and exact is None:  # a placeholder: read now
                    weight = weights.get(full_name) if weights is not None else None
                    assert weight is not None, f"{full_name} is a placeholder, and no weights were given for it"
                q8 = _q8_groups(weight) if full_name == "lm_head" and exact is None and mode == "w4a8" else None
            if q8 is not None:
                new = Q8Linear(*q8, child.bias)
            elif mode in ("int8", "w8a8") or groups is not None or five is not None or six is not None or \
                    (full_name == "lm_head" and exact is None):
                new = Int8Linear(weight, child.bias, activation_bits=ACTIVATION_BITS[mode])
            elif exact is not None:  # a file's Q4 groups as they are
                w4a8 = mode == "w4a8" and W4A8Linear.fits(*exact[1:])
                new = W4A8Linear(*exact, child.bias) if w4a8 else Int4Linear.from_block_nibbles(*exact, child.bias)
            else:
                k = child.in_features
                group = group_size if k % group_size == 0 else next(g for g in (128, 64, 32) if k % g == 0)
                new = Int4Linear.from_float(weight, child.bias, group)
                if mode == "w4a8" and group == 32 and W4A8Linear.fits(*new.scales_zeros()):
                    new = W4A8Linear.from_int4(new)
            setattr(parent, name, new)
    if mode == "w4a8":  # our kernels are loaded: attention over the KV cache goes through them too
        for module in model.modules():
            if hasattr(module, "use_attention_kernels"):  # (gpt4.model.Attention)
                module.use_attention_kernels()
        if hasattr(model, "use_fused_decode"):  # (gpt4.model.GPT4LMHeadModel) and whole eager decode steps
            model.use_fused_decode()
    model.quant = mode
    return model


def _quantize_embedding_(model: nn.Module, mode: str, exact_int4, embedding_rows, embedding_groups) -> None:
    """The token embedding becomes an int8 lookup (about the error of the 8-bit head): a tied head's own table,
    that head quantized here. Done before quantize_'s walk over the modules, which holds every original module
    until it ends, so that the full-precision table is freed now (the default model's: 57 MB in bf16)."""
    embedding, head = getattr(model, "embed_tokens", None), getattr(model, "lm_head", None)
    if not isinstance(embedding, nn.Embedding):
        return
    dtype = embedding.weight.dtype
    tied = isinstance(head, nn.Linear) and head.weight is embedding.weight
    rows = embedding_rows if embedding.weight.is_meta else embedding.weight
    assert rows is not None, "the embedding is a placeholder, and no rows were given for it"
    heads_table = tied and not (mode in INT4_MODES and exact_int4.get("lm_head") is not None)
    bias = head.bias if heads_table else None
    table = None
    if mode == "w4a8" and embedding_groups is not None and Q8Linear.fits(rows.shape):  # a file's own groups
        table = Q8Linear.from_groups(embedding_groups, rows.shape[0], rows.shape[1] // 32, bias, dtype)
    elif mode == "w4a8" and (q8 := _q8_groups(rows)) is not None:
        table = Q8Linear(*q8, bias, dtype)
    if table is not None:
        if heads_table:
            model.lm_head = table
        model.embed_tokens = Q8Embedding(table, dtype)
        return
    if heads_table:
        model.lm_head = table = Int8Linear(rows, bias, activation_bits=ACTIVATION_BITS[mode], keep_rows=True)
    else:  # its own table
        table = Int8Linear(rows, None, dtype=dtype)
    model.embed_tokens = Int8Embedding(table, dtype)


def _q8_groups(weight) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Q8Linear's (q, d) for weight (out, in), a tensor or a row reader, quantized as llama.cpp's Q8_0; None where
    the kernel cannot hold them (the caller keeps Int8Linear)."""
    if not Q8Linear.fits(weight.shape):
        return None
    q, d = Q8Linear.quantize(weight)
    return (q, d) if Q8Linear.fits(weight.shape, d) else None


def linear_bytes(model: nn.Module) -> int:
    """Bytes read per decode step by the linear layers (weights + scales)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, Int8Linear):  # int8 weights, plain or packed (rows kept for an embedding: not read)
            total += m.in_features * m.out_features + m.scales.numel() * m.scales.element_size()
        elif isinstance(m, Int4Linear):  # a plain copy of the nibbles, if any, is read by prefill only
            total += sum(b.numel() * b.element_size() for b in (m.packed, m.scales_and_zeros))
        elif isinstance(m, BlocksLinear):
            total += m.blocks.numel()
    return total


__all__ = ["Int8Linear", "Int8Embedding", "Int4Linear", "W4A8Linear", "Q5Linear", "Q6Linear", "Q8Linear", "Q8Embedding",
           "BlockEmbedding", "quantize_", "QUANT_MODES", "linear_bytes"]
