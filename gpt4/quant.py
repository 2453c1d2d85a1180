"""Quantized linear layers for fast CPU decoding (gpt-fast style), on PyTorch's own CPU kernels.

    int8: per-output-channel symmetric int8 weights, `aten._weight_int8pack_mm` (bf16 activations)
    int4: group-wise affine int4 weights, `aten._weight_int4pack_mm_for_cpu` (bf16 activations)
    w8a8: the same int8 weights, and activations quantized to int8 per row as they come: integer matmuls
          (`torch._int_mm`). For a batch of 8 rows the matmuls are 2.4x faster than the weight-only kernels
          (whose time grows with every row); one row is slower than int4 (twice its bytes); +4% perplexity
          from the 8-bit activations. The mode for many concurrent sequences.

Decoding one token reads every weight once, so its speed is set by bytes of weights: int8 halves bf16's bytes,
int4 quarters them. Activations stay in bf16 (the kernels' fast path on AVX512-BF16/AMX CPUs) except in w8a8.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

QUANT_MODES = ("none", "int8", "int4", "w8a8")
# From this many input rows (a prefill chunk) dequantizing the matrix to bf16 and one bf16 matmul beats the
# weight-only kernels, whose time grows with every row (measured on AVX512/AMX, 512 rows: 9x for int8, 2x for
# int4; at 128 rows int4 breaks even). Decoding (a row per sequence) keeps the kernels: fewer bytes read.
DEQUANTIZE_ROWS = 128
QUANTIZE_ROWS = 4096  # rows quantized at once: the fp32 temporaries stay small (the LM head is 113 MB in fp32)


class Int8Linear(nn.Module):
    """Per-output-channel symmetric int8 weights: w = q * scale, q in -127..127.

    quantize_activations (w8a8): each input row is quantized to int8 over its own max |x| and multiplied as
    integers (`torch._int_mm`, oneDNN: VNNI / AMX-INT8). Its time hardly grows with the rows, unlike the
    weight-only kernel's, and each row's result does not depend on the other rows of the batch.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype=torch.bfloat16,
                 quantize_activations: bool = False):
        """weight (out, in): a tensor, or a row reader (.shape, and row slices as tensors, e.g. read from a file)."""
        super().__init__()
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
        self.register_buffer("weight_int8", weight_int8)
        # w8a8 scales its fp32 products: fp32 scales, converted once here rather than on every call.
        self.register_buffer("scales", scales.to(torch.float32 if quantize_activations else dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.in_features, self.out_features = in_features, out_features
        self.quantize_activations = quantize_activations

    def forward(self, x):
        shape, dtype = x.shape, x.dtype
        if self.quantize_activations:
            rows = x.reshape(-1, shape[-1]).float()  # (N, in)
            row_scales = rows.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30) / 127.0  # (N, 1)
            rows_int8 = (rows / row_scales).round_().to(torch.int8)  # (N, in) in -127..127
            products = torch._int_mm(rows_int8, self.weight_int8.t())  # (N, out) int32, exact
            y = products * (row_scales * self.scales)  # (N, out) fp32
        else:
            rows = x.reshape(-1, shape[-1]).to(self.scales.dtype)  # (N, in)
            if rows.shape[0] >= DEQUANTIZE_ROWS:
                y = rows @ (self.weight_int8.to(rows.dtype) * self.scales[:, None]).t()
            else:
                y = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.scales)  # (N, out)
        y = y.reshape(*shape[:-1], self.out_features)
        y = y if self.bias is None else y + self.bias
        return y.to(dtype)  # the caller's dtype: an fp32 model with quantized layers stays fp32 between them

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales.float()[:, None]


class Int8Embedding(nn.Module):
    """Token embedding looked up in int8 rows (w = q * scale per row) and scaled to the model dtype.

    Built from an Int8Linear: with a tied LM head it is that head's own table, so the vocabulary matrix is held
    once (the default model: 28 MB instead of a 57 MB bf16 table beside the 28 MB int8 head).
    """

    def __init__(self, table: Int8Linear, dtype: torch.dtype):
        super().__init__()
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
        self.register_buffer("scales_and_zeros", torch.stack([scales.t(), zeros.t()], dim=-1).to(dtype).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.group_size, self.in_features, self.out_features = group_size, in_features, scales.shape[0]

    @classmethod
    def from_block_nibbles(cls, nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           bias: torch.Tensor | None, dtype=torch.bfloat16) -> "Int4Linear":
        """From groups of 32 as GGUF's Q4_0 / Q4_1 blocks store them: nibbles (out, in // 2) uint8, byte j of a
        group's 16 holding element j (low nibble) and element 16 + j (high); scales, zeros (out, in // 32).

        Repacked for the kernel byte to byte, never as a byte per value (a third of the default model's load).
        """
        out_features, in_features = nibbles.shape[0], nibbles.shape[1] * 2
        if out_features % 64 or not _kernel_layout_is_known():
            return cls(unpack_block_nibbles(nibbles), scales, zeros, 32, bias, dtype)
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
        x = x.reshape(-1, shape[-1]).to(self.scales_and_zeros.dtype)  # (N, in)
        if x.shape[0] >= DEQUANTIZE_ROWS:
            y = x @ self.dequantized_t()
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)
        y = y.reshape(*shape[:-1], self.out_features)
        y = y if self.bias is None else y + self.bias
        return y.to(dtype)  # the caller's dtype: an fp32 model with quantized layers stays fp32 between them

    def dequantized(self) -> torch.Tensor:
        """The weight (out, in) in the compute dtype (a transposed view of dequantized_t)."""
        return self.dequantized_t().t()

    def dequantized_t(self) -> torch.Tensor:
        """The weight transposed, (in, out), in the compute dtype: (q - 8) * scale + zero, rounded once.

        The layout a prefill matmul reads; in it each group's scale and zero are rows broadcast down the group's
        input positions, one contiguous multiply-add pass (1.5-2x faster than broadcasting them along rows of
        (out, in), where they repeat every 32 elements).
        """
        out_features, in_features, groups = self.out_features, self.in_features, self.in_features // self.group_size
        if self.nibbles is None:
            q_t = _unpack_kernel_layout_t(self.packed, out_features, in_features)  # (in, out)
        else:
            q = torch.stack((self.nibbles & 15, self.nibbles >> 4), dim=-1).view(out_features, in_features)
            q_t = q.t().contiguous()  # (in, out)
        # q - 8 in 0..15 - 8 is exact in int8 and in the compute dtype; addcmul rounds its result once.
        q_t = (q_t.view(torch.int8) - 8).to(self.scales_and_zeros.dtype).view(groups, self.group_size, out_features)
        scale_zero = self.scales_and_zeros[:, None]  # (groups, 1, out, 2)
        w_t = torch.addcmul(scale_zero[..., 1].contiguous(), q_t, scale_zero[..., 0].contiguous())
        return w_t.view(in_features, out_features)


def _pack_kernel_layout(q: torch.Tensor) -> torch.Tensor:
    """q (out, in) uint8 in 0..15 -> (out, in // 2) bytes in `_convert_weight_to_int4pack_for_cpu`'s layout: each
    block of 64 output rows is (in, 32) bytes, the low nibble of byte i holding row i of the block and the high
    nibble row 32 + i."""
    out_features, in_features = q.shape
    halves = q.view(out_features // 64, 2, 32, in_features)  # (blocks, half, i, in)
    packed = (halves[:, 0] | (halves[:, 1] << 4)).transpose(1, 2)  # (blocks, in, 32)
    return packed.contiguous().view(out_features, in_features // 2)


def _pack_kernel_layout_from_blocks(nibbles: torch.Tensor) -> torch.Tensor:
    """_pack_kernel_layout(unpack_block_nibbles(nibbles)), computed on the bytes as they are."""
    out_features, half_in = nibbles.shape
    rows = nibbles.view(out_features // 64, 2, 32, half_in // 16, 16)  # (block, half, i, group, j)
    first, second = rows[:, 0], rows[:, 1]  # rows i and 32 + i of each block of 64: (block, i, group, j)
    element_j = (first & 15) | (second << 4)  # a group's element j: row i's nibble low, row 32 + i's high
    element_16_j = (first >> 4) | (second & 0xF0)  # its element 16 + j
    packed = torch.stack((element_j, element_16_j), dim=3)  # (block, i, group, 2, j)
    return packed.permute(0, 2, 3, 4, 1).reshape(out_features, half_in)  # (block, in, i) as (out, in // 2)


def unpack_block_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """(..., 16 g) bytes of 4-bit blocks (byte j: element j low, element 16 + j high) -> (..., 32 g) values."""
    blocks = nibbles.unflatten(-1, (-1, 16))
    return torch.cat((blocks & 15, blocks >> 4), dim=-1).flatten(-2)


def _unpack_kernel_layout_t(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """q transposed, (in, out) in 0..15, from the kernel's layout (see _pack_kernel_layout)."""
    blocks = packed.view(out_features // 64, in_features, 32)
    q = torch.cat((blocks & 15, blocks >> 4), dim=2)  # (out // 64, in, 64)
    return q.transpose(0, 1).reshape(in_features, out_features)


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


def quantize_(model: nn.Module, mode: str, group_size: int = 32, exact_int4=None, embedding_rows=None) -> nn.Module:
    """Replace the model's nn.Linear layers in place with quantized ones (see the module's docstring for the
    modes); returns the model.

    exact_int4 (anything with .get(module name), e.g. a dict) gives (nibbles, scale, zero) groups of 32 taken
    straight from a 4-bit file (Int4Linear.from_block_nibbles); those modules use them instead of re-quantizing.
    In int4 mode the LM head (tied to the embedding or not) is int8 unless the file holds it in 4 bits: every
    logit goes through it, and 4 bits there cost the default model 5% perplexity (its head is Q8_0 in the file)
    for a ~10% faster decode. The token embedding becomes an int8 lookup (Int8Embedding), sharing a tied head's
    table; embedding_rows (a row reader, see Int8Linear) stands for an embedding loaded as a shape-only
    placeholder.
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"Unknown quantization {mode!r}; choose one of {QUANT_MODES}.")
    if mode == "none":
        return model
    exact_int4 = exact_int4 or {}
    _quantize_embedding_(model, mode, exact_int4, embedding_rows)
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            full_name = f"{parent_name}.{name}" if parent_name else name
            exact = exact_int4.get(full_name) if mode == "int4" else None
            if mode in ("int8", "w8a8") or (full_name == "lm_head" and exact is None):
                new = Int8Linear(child.weight, child.bias, quantize_activations=mode == "w8a8")
            elif exact is not None:
                new = Int4Linear.from_block_nibbles(*exact, child.bias)
            else:
                k = child.in_features
                group = group_size if k % group_size == 0 else next(g for g in (128, 64, 32) if k % g == 0)
                new = Int4Linear.from_float(child.weight, child.bias, group)
            setattr(parent, name, new)
    return model


def _quantize_embedding_(model: nn.Module, mode: str, exact_int4, embedding_rows) -> None:
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
    if tied and not (mode == "int4" and exact_int4.get("lm_head") is not None):
        model.lm_head = table = Int8Linear(rows, head.bias, quantize_activations=mode == "w8a8")
    else:  # its own table
        table = Int8Linear(rows, None, dtype=dtype)
    model.embed_tokens = Int8Embedding(table, dtype)


def linear_bytes(model: nn.Module) -> int:
    """Bytes read per decode step by the linear layers (weights + scales)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, Int8Linear):
            total += sum(b.numel() * b.element_size() for b in m.buffers())
        elif isinstance(m, Int4Linear):  # a plain copy of the nibbles, if any, is read by prefill only
            total += sum(b.numel() * b.element_size() for b in (m.packed, m.scales_and_zeros))
    return total


__all__ = ["Int8Linear", "Int8Embedding", "Int4Linear", "quantize_", "QUANT_MODES", "linear_bytes"]
