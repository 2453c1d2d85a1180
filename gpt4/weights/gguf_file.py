"""GGUF files (llama.cpp's format): a checked parser, config from metadata, tensors dequantized to torch.

The header is parsed here, straight from a memory map, with every count, length, type and offset checked before
it is used (a hostile or damaged file gets one clear error, never a hang or a huge allocation). Block formats are
decoded by the `gguf` package (numpy), except the plain float types and the default model's Q8_0 / Q4_0 / Q4_1
(torch), a slice of rows at a time.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import GPT4Config
from ..errors import ModelFileError
from ..quant import pack_bits, pack_block_nibbles, unpack_bits, unpack_block_nibbles

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")
# The 4-bit block types that are affine int4 groups of 32 (see GGUFFile.int4_groups): Q4_K's are its sub-blocks.
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
INT5_TYPES = ("Q5_0", "Q5_K")  # ... that are 5-bit groups of 32 (see GGUFFile.int5_groups)
INT6_TYPES = ("Q6_K",)  # ... and 6-bit ones (see GGUFFile.int6_groups)
INT8_TYPES = ("Q8_0", "Q5_0", "Q4_0")  # the block formats whose groups of 32 are int8 q times a d each, exactly


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        _check_preamble(self.path)
        self.file = open(self.path, "rb", buffering=0)  # tensors are read from it (see _read)
        try:
            self.data = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ)
            self.metadata, self.tensors = _parse(self.data, self.path)
        except BaseException:
            self.file.close()
            raise

    def close(self) -> None:
        self.tensors, self.metadata = {}, {}
        self.data.close()
        self.file.close()

    def drop_vocabulary(self) -> None:
        """Forget the tokenizer's arrays (tokens, merges, types, scores): Qwen2.5's 300k strings are ~50 MB that a
        load frees once its tokenizer is built, before the weights are read."""
        for key in [k for k, v in self.metadata.items() if k.startswith("tokenizer.ggml.")
                    and isinstance(v, (list, np.ndarray))]:
            del self.metadata[key]

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise ModelFileError(f"{self.path}: required metadata {key!r} is missing; this is not a complete "
                                 "llama.cpp model file.")
        return value

    @property
    def architecture(self) -> str:
        return self.require("general.architecture")

    # --------------------------------------------------------------------------------------------------
    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A tensor dequantized to `dtype`, in PyTorch layout (out_features, in_features).

        Rows are dequantized a slice at a time (in fp32) straight into the result, so loading a large matrix
        in bf16 never holds a full fp32 copy (the default model's embedding: 113 MB).
        """
        info = self.tensors[name]
        width = info.shape[-1]
        rows = info.n_bytes // info.row_bytes  # all dimensions but the fastest
        out = torch.empty(rows, width, dtype=dtype)
        step = max(1, _DEQUANT_CHUNK // width)
        for start in range(0, rows, step):
            n = min(step, rows - start)
            out[start:start + n] = self._rows(name, start, n)
        return out.reshape(info.shape)

    def _rows(self, name: str, start: int, count: int) -> torch.Tensor:
        """Rows start..start+count-1 of a tensor (all dimensions but the fastest flattened), in fp32."""
        info = self.tensors[name]
        raw = self._read(info.offset + start * info.row_bytes, count * info.row_bytes)
        return self._dequantize(name, info, raw).reshape(count, info.shape[-1])

    def row_reader(self, name: str, dtype: torch.dtype) -> "RowReader":
        """A 2-D tensor's rows in `dtype`, read and dequantized when sliced (no copy of the whole matrix)."""
        return RowReader(self, name, dtype)

    def _read(self, offset: int, count: int) -> np.ndarray:
        """A copy of `count` bytes at `offset`, read with system calls rather than through the memory map, which
        only the header's parser uses: no page of the file is mapped into the process (a load's resident memory
        does not grow by the size of the file), and no page is faulted in (the default model's 95 MB of tensors:
        18 ms, where copying out of the map and then releasing its pages took 42)."""
        raw = np.empty(count, dtype=np.uint8)
        view, done = memoryview(raw), 0
        self.file.seek(offset)
        while done < count:  # a read may return fewer bytes than asked
            n = self.file.readinto(view[done:])
            if not n:
                raise ModelFileError(f"{self.path}: the file ended while reading a tensor at byte {offset + done:,}; "
                                     "it was truncated or replaced while loading.")
            done += n
        return raw

    def _dequantize(self, name: str, info: "TensorInfo", raw: np.ndarray) -> torch.Tensor:
        """Whole rows of `info`'s type, as bytes -> fp32 values (flat)."""
        if info.type_name in _TORCH_DEQUANT:
            return _TORCH_DEQUANT[info.type_name](torch.from_numpy(raw))
        from gguf import GGMLQuantizationType, quants  # the other block formats: the gguf package's numpy decoders

        try:
            return torch.from_numpy(quants.dequantize(raw.reshape(-1, info.row_bytes),
                                                      GGMLQuantizationType(info.type_id)))
        except NotImplementedError as e:
            raise ModelFileError(f"{self.path}: tensor {name!r} has type {info.type_name}, which the gguf "
                                 "package cannot dequantize; use a file with a common quant type "
                                 "(F16, Q8_0, Q4_K_M, ...).") from e

    def block_rows(self, name: str):
        """A matrix's rows as the file holds them, (rows, bytes a row) uint8, and the function that decodes whole rows
        (their bytes, flat) to float32 values (flat); None for a type only the gguf package decodes."""
        info = self.tensors[name]
        if info.type_name not in _TORCH_DEQUANT or len(info.shape) != 2:
            return None
        return torch.from_numpy(self._read(info.offset, info.n_bytes)).view(info.shape[0], -1), \
            _TORCH_DEQUANT[info.type_name]

    def int4_groups(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """A Q4_0 / Q4_1 / Q4_K matrix as affine int4 groups of 32: (nibbles, scale, zero), None for other types.

        nibbles (out, in / 32, 16) are each group's 16 bytes as Q4_0 stores them (low nibbles the group's first 16
        values, high nibbles the others): Q4_0's and Q4_1's a view into the blocks as read (not copied out from
        between the scales: the int4 layers are packed from them; only fusing or permuting rows copies them), Q4_K's
        sub-blocks of 32 repacked so. gpt4.quant.unpack_block_nibbles of nibbles.reshape(out, -1) gives q (out, in) in
        0..15. scale and zero (out, in / 32) float32, with w = (q - 8) * scale + zero: exactly the file's values (a
        Q4_K sub-block's scale d * sc and offset -dmin * m are products of a float16 and a 6-bit integer)."""
        info = self.tensors[name]
        if info.type_name not in INT4_TYPES:
            return None
        raw = torch.from_numpy(self._read(info.offset, info.n_bytes))
        rows = info.shape[0]
        if info.type_name == "Q4_K":
            q, scale, offset = _q4_k_sub_blocks(raw)  # (N, 8, 32), (N, 8), (N, 8): w = scale * q + offset
            nibbles = pack_block_nibbles(q).reshape(rows, -1, 16)
            zero = torch.add(offset, scale, alpha=8)
            return nibbles, scale.reshape(rows, -1), zero.reshape(rows, -1)
        width = 18 if info.type_name == "Q4_0" else 20
        blocks = raw.view(-1, width)
        halves = raw.view(torch.float16).view(-1, width // 2)  # each block as fp16 values: d (, m), then nibbles
        d = halves[:, 0].float()  # (blocks,)
        if info.type_name == "Q4_0":  # w = d * (q - 8)
            zero = torch.zeros_like(d)
        else:  # w = d * q + m = (q - 8) * d + (m + 8 d)
            zero = torch.add(halves[:, 1].float(), d, alpha=8)
        nibbles = blocks[:, width - 16:].unflatten(0, (rows, -1))  # (out, in / 32, 16)
        return nibbles, d.reshape(rows, -1), zero.reshape(rows, -1)

    def int5_groups(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """A Q5_0 / Q5_K matrix's groups of 32: (nibbles, fifth, d, m), None for other types. nibbles (out, in / 32,
        16) the groups' low 4 bits as Q4_0 stores them (Q5_0's a view into the blocks as read) and fifth (out, in / 32,
        4) their fifth bits (bit k of the little-endian word: element k); d, m (out, in / 32) float32; w = d * q + m,
        q = nibble + 16 * fifth bit, exactly the file's values: Q5_0's m = -16 d; a Q5_K sub-block's d * sc and
        -dmin * min."""
        info = self.tensors[name]
        if info.type_name not in INT5_TYPES:
            return None
        raw = torch.from_numpy(self._read(info.offset, info.n_bytes))
        rows = info.shape[0]
        if info.type_name == "Q5_K":
            q, fifth, scale, offset = _q5_k_sub_blocks(raw)  # (N, 8, 32), (N, 8, 4), (N, 8), (N, 8)
            nibbles = pack_block_nibbles(q).reshape(rows, -1, 16)
            return nibbles, fifth.reshape(rows, -1, 4), scale.reshape(rows, -1), offset.reshape(rows, -1)
        blocks = raw.view(-1, 22)  # d, fifth bits, nibbles
        d = blocks[:, :2].contiguous().view(torch.float16).float().reshape(rows, -1)
        return blocks[:, 6:].unflatten(0, (rows, -1)), blocks[:, 2:6].unflatten(0, (rows, -1)), d, -16 * d

    def int6_groups(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """A Q6_K matrix's groups of 32, each two of its sub-blocks of 16: (nibbles, fifth, sixth, d), None for other
        types. nibbles (out, in / 32, 16) the groups' low 4 bits as Q4_0 stores them; fifth and sixth (out, in / 32, 4)
        their fifth and sixth bits (bit k of the little-endian word: element k); d (out, in / 32, 2) float32, the d
        of elements 0..15 and of 16..31 (d * sc, exact); w = d * (q - 32), q in 0..63, the file's values."""
        info = self.tensors[name]
        if info.type_name not in INT6_TYPES:
            return None
        q, scale = _q6_k_sub_blocks(torch.from_numpy(self._read(info.offset, info.n_bytes)))
        rows = info.shape[0]
        q = q.reshape(rows, -1, 32)  # (out, in / 32, 32)
        return pack_block_nibbles(q & 15), pack_bits((q >> 4) & 1), pack_bits(q >> 5), scale.reshape(rows, -1, 2)

    def int8_groups(self, name: str, start: int = 0,
                    stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A Q8_0, Q5_0 or Q4_0 matrix as int8 groups of 32, exactly: (q, d), None for other types. q (out, in / 32,
        32) int8 (Q8_0's: a view into the blocks as read; Q5_0's 5-bit values minus 16, Q4_0's nibbles minus 8); d
        (out, in / 32) the groups' float16 scales as float32; w = d * q. start, stop: only those rows (read alone)."""
        info = self.tensors[name]
        if info.type_name not in INT8_TYPES:
            return None
        stop = info.shape[0] if stop is None else stop
        row_bytes = info.n_bytes // info.shape[0]
        rows = stop - start
        raw = torch.from_numpy(self._read(info.offset + start * row_bytes, rows * row_bytes))
        if info.type_name == "Q8_0":
            blocks = raw.view(-1, 34)  # fp16 d, then 32 int8
            q = blocks[:, 2:].view(torch.int8)
        elif info.type_name == "Q4_0":
            blocks = raw.view(-1, 18)  # fp16 d, 16 bytes of nibbles: w = d * (q - 8)
            q = unpack_block_nibbles(blocks[:, 2:]).view(torch.int8) - 8
        else:
            blocks = raw.view(-1, 22)  # fp16 d, 4 bytes of fifth bits, 16 bytes of nibbles: w = d * (q - 16)
            q = _five_bit(blocks[:, 6:], blocks[:, 2:6]).view(torch.int8) - 16
        d = blocks[:, :2].contiguous().view(torch.float16).float().reshape(rows, -1)
        return q.unflatten(0, (rows, -1)), d

    def config(self) -> GPT4Config:
        arch = self.architecture
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelFileError(f"{self.path}: GGUF architecture {arch!r} is not supported; "
                                 f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}.")
        key = lambda k: self.require(f"{arch}.{k}")  # noqa: E731
        opt = lambda k, d=None: self.get(f"{arch}.{k}", d)  # noqa: E731
        hidden, n_heads = int(key("embedding_length")), int(key("attention.head_count"))
        head_dim = int(opt("attention.key_length", hidden // n_heads))
        tokens = self.get("tokenizer.ggml.tokens")
        vocab = int(opt("vocab_size", 0)) or (len(tokens) if tokens is not None else 0)
        if not vocab and "token_embd.weight" in self.tensors:
            vocab = int(self.tensors["token_embd.weight"].shape[0])
        rope_theta = float(opt("rope.freq_base", 10000.0))
        return GPT4Config(
            model_type="qwen2" if arch == "qwen2" else "llama",
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=int(key("block_count")),
            num_attention_heads=n_heads, num_key_value_heads=int(opt("attention.head_count_kv", n_heads)),
            head_dim=head_dim, intermediate_size=int(key("feed_forward_length")),
            max_position_embeddings=int(opt("context_length", 2048)),
            position_embedding="rope", norm="rmsnorm", mlp="swiglu",
            attention_bias="blk.0.attn_q.bias" in self.tensors, output_bias="blk.0.attn_output.bias" in self.tensors,
            mlp_bias="blk.0.ffn_up.bias" in self.tensors, tie_word_embeddings="output.weight" not in self.tensors,
            norm_eps=float(key("attention.layer_norm_rms_epsilon")), rope_theta=rope_theta,
            rope_scaling=self._rope_scaling(head_dim, rope_theta, opt),
            bos_token_id=_int_or_none(self.get("tokenizer.ggml.bos_token_id")),
            eos_token_id=self._eos_ids(), pad_token_id=_int_or_none(self.get("tokenizer.ggml.padding_token_id")),
            extra={"source": str(self.path), "gguf_name": self.get("general.name")},
        )

    def _eos_ids(self):
        ids = [self.get("tokenizer.ggml.eos_token_id"), self.get("tokenizer.ggml.eot_token_id")]
        ids = [int(i) for i in ids if i is not None]
        ids = list(dict.fromkeys(ids))
        return (ids[0] if len(ids) == 1 else ids) if ids else None

    def _rope_scaling(self, head_dim, rope_theta, opt):
        kind = opt("rope.scaling.type")
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(opt("rope.scaling.factor"))}
        if "rope_freqs.weight" not in self.tensors:
            if kind not in (None, "none"):
                raise ModelFileError(f"{self.path}: rope scaling {kind!r} is not supported.")
            return None
        # Llama 3.x files store per-frequency divisors instead of the scaling parameters: recover the
        # parameters and check that they reproduce the divisors exactly.
        from ..model import rope_inverse_frequencies

        divisors = self.tensor("rope_freqs.weight").flatten()
        scaling = {"rope_type": "llama3", "factor": float(divisors.max()), "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0,
                   "original_max_position_embeddings": int(opt("rope.scaling.original_context_length", 8192))}
        probe = GPT4Config(num_attention_heads=1, hidden_size=head_dim, position_embedding="rope",
                           rope_theta=rope_theta, norm="rmsnorm", mlp="swiglu", model_type="llama")
        base = rope_inverse_frequencies(probe)
        probe.rope_scaling = scaling
        if not torch.allclose(base / rope_inverse_frequencies(probe), divisors, rtol=1e-3):
            raise ModelFileError(f"{self.path}: its rope_freqs tensor matches no Llama-3 rope scaling this "
                                 "package knows.")
        return scaling


@dataclass(frozen=True)
class RowReader:
    """A matrix in a GGUF file, read as row slices: reader[a:b] is rows a..b-1 dequantized to `dtype`, exactly as
    GGUFFile.tensor(name, dtype)[a:b] would be, without the whole matrix ever existing (see Int8Linear)."""

    gguf: GGUFFile
    name: str
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.gguf.tensors[self.name].shape

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, step = rows.indices(self.shape[0])
        assert step == 1 and len(self.shape) == 2, "row readers give contiguous row slices of matrices"
        return self.gguf._rows(self.name, start, max(0, stop - start)).to(self.dtype)


def _int_or_none(value):
    return None if value is None else int(value)


# The common block formats (the default model's; Q4_K_M files' Q5_0, Q4_K, Q6_K), decoded with torch: several
# times faster than the numpy reference.
def _fp16(field: torch.Tensor) -> torch.Tensor:
    """(N, 2) bytes of little-endian fp16 -> (N, 1) fp32."""
    return field.contiguous().view(torch.float16).float()


def _decode_f32(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.float32)


def _decode_f16(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.float16).float()


def _decode_bf16(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.bfloat16).float()


def _dequant_q8_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 34)  # fp16 scale d, then 32 int8 values: w = d * q
    return (_fp16(blocks[:, :2]) * blocks[:, 2:].contiguous().view(torch.int8).float()).flatten()


def _dequant_q4_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 18)  # d, 16 bytes of nibbles: w = d * (q - 8)
    return (_fp16(blocks[:, :2]) * (unpack_block_nibbles(blocks[:, 2:]).float() - 8)).flatten()


def _dequant_q4_1(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 20)  # d, m, 16 bytes of nibbles: w = d * q + m
    return (_fp16(blocks[:, :2]) * unpack_block_nibbles(blocks[:, 4:]).float() + _fp16(blocks[:, 2:4])).flatten()


def _five_bit(nibbles: torch.Tensor, high_bits: torch.Tensor) -> torch.Tensor:
    """Q5_0 / Q5_1 values (N, 32) in 0..31: 16 bytes of low nibbles (element j low, 16 + j high) and a 32-bit
    word of fifth bits (bit i for element i)."""
    shifts = torch.arange(8, dtype=torch.uint8)
    fifth = ((high_bits[:, :, None] >> shifts) & 1).view(-1, 32)  # (N, 32): bit b of byte k is element 8 k + b
    return unpack_block_nibbles(nibbles) | (fifth << 4)


def _dequant_q5_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 22)  # d, 4 bytes of fifth bits, 16 bytes of nibbles: w = d * (q - 16)
    return (_fp16(blocks[:, :2]) * (_five_bit(blocks[:, 6:], blocks[:, 2:6]).float() - 16)).flatten()


def _dequant_q5_1(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 24)  # d, m, fifth bits, nibbles: w = d * q + m
    q = _five_bit(blocks[:, 8:], blocks[:, 4:8]).float()
    return (_fp16(blocks[:, :2]) * q + _fp16(blocks[:, 2:4])).flatten()


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's and Q5_K's super-blocks (N, bytes) start with d, dmin and 12 bytes of eight 6-bit (scale, min) pairs:
    float32 (N, 8) scale d * scale and offset -dmin * min of their sub-blocks of 32."""
    packed = blocks[:, 4:16].view(-1, 3, 4)  # rows: low 6 bits of scales 0-3 (top 2: of scales 4-7), of mins 0-3,
    low, mid, top = packed[:, 0], packed[:, 1], packed[:, 2]  # and the low 4 bits of scales / mins 4-7
    scales = torch.cat((low & 63, (top & 15) | ((low >> 2) & 48)), dim=1).float()  # (N, 8)
    mins = torch.cat((mid & 63, (top >> 4) | ((mid >> 2) & 48)), dim=1).float()
    return _fp16(blocks[:, :2]) * scales, -(_fp16(blocks[:, 2:4]) * mins)


def _low_nibbles_k(qs: torch.Tensor) -> torch.Tensor:
    """(N, 128) bytes, each 32 of them two sub-blocks of 32 (low nibbles, then high) -> (N, 8, 32) values 0..15."""
    nibbles = qs.reshape(-1, 4, 1, 32)
    return torch.cat((nibbles & 15, nibbles >> 4), dim=2).view(-1, 8, 32)


def _q4_k_sub_blocks(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K's super-blocks of 256 (d, dmin, the scales, 128 bytes of nibbles) as N x 8 sub-blocks: q (N, 8, 32) uint8
    in 0..15, and float32 (N, 8) scale and offset, w = scale * q + offset."""
    blocks = raw.view(-1, 144)
    return _low_nibbles_k(blocks[:, 16:]), *_k_scales(blocks)


def _q5_k_sub_blocks(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q5_K's super-blocks of 256 (d, dmin, the scales, 32 bytes of fifth bits, 128 bytes of low nibbles as Q4_K's)
    as N x 8 sub-blocks: the low 4 bits q (N, 8, 32) uint8, the fifth bits (N, 8, 4) bytes (bit k of the little-endian
    word: element k), and float32 (N, 8) scale and offset: w = scale * (q + 16 * fifth bit) + offset. Byte l of the
    fifth bits holds element l of sub-block s at bit s."""
    blocks = raw.view(-1, 176)
    high = (blocks[:, None, 16:48] >> torch.arange(8, dtype=torch.uint8)[:, None]) & 1  # (N, s, l)
    return _low_nibbles_k(blocks[:, 48:]), pack_bits(high), *_k_scales(blocks)


def _dequant_q4_k(raw: torch.Tensor) -> torch.Tensor:
    """w = d * scale * q - dmin * min over Q4_K's sub-blocks of 32 (see _q4_k_sub_blocks)."""
    q, scale, offset = _q4_k_sub_blocks(raw)
    return (scale[..., None] * q.float() + offset[..., None]).flatten()


def _dequant_q5_k(raw: torch.Tensor) -> torch.Tensor:
    """w = d * scale * q - dmin * min over Q5_K's sub-blocks of 32, q in 0..31 (see _q5_k_sub_blocks)."""
    q, fifth, scale, offset = _q5_k_sub_blocks(raw)
    return (scale[..., None] * (q + 16 * unpack_bits(fifth)).float() + offset[..., None]).flatten()


def _q6_k_sub_blocks(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q6_K's super-blocks of 256 (128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 int8 scales, one per 16
    values, d) as N x 16 sub-blocks of 16: q (N, 16, 16) uint8 in 0..63 and float32 (N, 16) scale d * sc, w = scale *
    (q - 32). In each half of 128 values, value i takes its low nibble from byte i % 64 (low nibble for i < 64, high
    after) and its high bits from byte i % 32, bits 2 * (i // 32)."""
    blocks = raw.view(-1, 210)
    low = blocks[:, :128].view(-1, 2, 1, 64)
    low = torch.cat((low & 15, low >> 4), dim=2).view(-1, 2, 128)  # (N, half, i)
    high = blocks[:, 128:192].view(-1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[:, None]
    high = (high & 3).view(-1, 2, 128)
    scales = _fp16(blocks[:, 208:]) * blocks[:, 192:208].contiguous().view(torch.int8).float()  # (N, 16)
    return (low | (high << 4)).view(-1, 16, 16), scales


def _dequant_q6_k(raw: torch.Tensor) -> torch.Tensor:
    """w = d * scale * (q - 32) over Q6_K's sub-blocks of 16 (see _q6_k_sub_blocks)."""
    q, scale = _q6_k_sub_blocks(raw)
    return (scale[..., None] * (q.view(torch.int8) - 32).float()).flatten()


_DEQUANT_CHUNK = 1 << 21  # values dequantized at once (8 MB in fp32)
_TORCH_DEQUANT = {"F32": _decode_f32, "F16": _decode_f16, "BF16": _decode_bf16, "Q8_0": _dequant_q8_0,
                  "Q4_0": _dequant_q4_0, "Q4_1": _dequant_q4_1, "Q5_0": _dequant_q5_0, "Q5_1": _dequant_q5_1,
                  "Q4_K": _dequant_q4_k, "Q5_K": _dequant_q5_k, "Q6_K": _dequant_q6_k}


# GGUF metadata value types: numpy dtypes of the scalars (8 is a string, 9 an array).
_SCALARS = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
            7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_U64 = struct.Struct("<Q")
_MAX_DIMS = 4  # ggml tensors have at most 4 dimensions


# ggml's tensor types: id -> (name, values per block, bytes per block), as ggml.h defines them. The gguf package
# has the same table, but importing it takes ~150 ms (a quarter of loading the default model); a test checks that
# the two agree, and types missing here are looked up there.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}


def ggml_type(type_id: int) -> tuple[str, int, int] | None:
    """(name, values per block, bytes per block) of a ggml tensor type; None if neither we nor gguf know it."""
    if type_id in GGML_TYPES:
        return GGML_TYPES[type_id]
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        kind = GGMLQuantizationType(type_id)
    except ValueError:
        return None
    return (kind.name, *GGML_QUANT_SIZES[kind]) if kind in GGML_QUANT_SIZES else None


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]  # PyTorch order (slowest dimension first)
    type_id: int  # ggml's tensor type
    type_name: str
    offset: int  # absolute byte offset in the file
    n_bytes: int
    row_bytes: int  # bytes of one row (the fastest dimension) in the block format


def _check_preamble(path: Path) -> None:
    if not path.is_file():
        raise ModelFileError(f"{path} does not exist or is not a file.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24:
        raise ModelFileError(f"{path} is {size} bytes, too short to be a GGUF file; the file is truncated.")
    if head[:4] != b"GGUF":
        raise ModelFileError(f"{path} is not a GGUF file (its first bytes are {head[:4]!r}, expected b'GGUF').")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise ModelFileError(f"{path} is GGUF version {version}; versions 2 and 3 are supported.")
    # Each tensor info and each key/value pair takes well over 8 bytes: larger counts are corruption.
    if n_tensors * 8 > size or n_kv * 8 > size:
        raise ModelFileError(f"{path} claims {n_tensors:,} tensors and {n_kv:,} metadata entries, more than "
                             f"its {size:,} bytes can hold; the file is corrupted.")


def _parse(data, path: Path) -> tuple[dict, dict[str, TensorInfo]]:
    """Metadata and tensor infos, every count, length, type and offset checked against the file size."""
    size, pos = len(data), 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)

    def take(n, what):
        nonlocal pos
        if n < 0 or pos + n > size:
            raise ModelFileError(f"{path}: {what} at byte {pos:,} runs past the end of the file ({size:,} bytes); "
                                 "the file is truncated or corrupted: download it again.")
        pos += n
        return pos - n

    def u32(what):
        return struct.unpack_from("<I", data, take(4, what))[0]

    def u64(what):
        return struct.unpack_from("<Q", data, take(8, what))[0]

    def string(what):
        n = u64(what + " length")
        start = take(n, what)
        return data[start:start + n].decode("utf-8", "replace")

    def strings(count, what):
        # An array of strings (a vocabulary: ~100k). A loop finds where each starts (the lengths chain them);
        # then, unless a string holds a NUL byte, each 8-byte length becomes 8 NULs and the whole array is
        # decoded at once and split at them (the default model's header, 98k strings: 50-55 -> 37-40 ms).
        nonlocal pos
        # (Appended as found, not preallocated: a corrupted count must not allocate before the file runs out.)
        starts, p, read_length = [], pos, _U64.unpack_from
        for _ in range(count):
            n = read_length(data, p)[0] if p + 8 <= size else size
            if p + 8 + n > size:
                pos = p
                take(8 + n, what)  # raises: the string runs past the end of the file
            starts.append(p)
            p += 8 + n
        region = np.frombuffer(data, dtype=np.uint8, count=p - pos, offset=pos).copy()
        lengths_at = np.asarray(starts, dtype=np.int64) - pos  # (count,)
        region[(lengths_at[:, None] + np.arange(8)).ravel()] = 0
        if np.count_nonzero(region == 0) == 8 * count:  # the NULs are the lengths' and no string's
            items = region.tobytes().decode("utf-8", "replace").split("\x00" * 8)[1:]
        else:
            items = [data[a + 8:b].decode("utf-8", "replace") for a, b in zip(starts, starts[1:] + [p])]
        pos = p
        return items

    def value(kind, what):
        if kind in _SCALARS:
            dtype = np.dtype(_SCALARS[kind])
            return np.frombuffer(data, dtype=dtype, count=1, offset=take(dtype.itemsize, what))[0].item()
        if kind == 8:
            return string(what)
        if kind == 9:
            item, count = u32(what + " item type"), u64(what + " count")
            if item in _SCALARS:
                dtype = np.dtype(_SCALARS[item])
                return np.frombuffer(data, dtype=dtype, count=count, offset=take(count * dtype.itemsize, what))
            if item == 8:
                if count * 8 > size - pos:  # every string has at least its 8-byte length: a cheap bound first
                    take(count * 8, what)
                return strings(count, what)
            raise ModelFileError(f"{path}: metadata {what} is an array of unknown type {item}; corrupted file.")
        raise ModelFileError(f"{path}: metadata {what} has unknown value type {kind}; the file is corrupted.")

    metadata = {}
    for _ in range(n_kv):
        key = string("a metadata key")
        metadata[key] = value(u32(f"{key!r} type"), repr(key))
    infos = []
    for _ in range(n_tensors):
        name = string("a tensor name")
        n_dims = u32(f"tensor {name!r} rank")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise ModelFileError(f"{path}: tensor {name!r} has {n_dims} dimensions (1 to 4 allowed); corrupted file.")
        dims = [u64(f"tensor {name!r} shape") for _ in range(n_dims)]
        type_id, offset = u32(f"tensor {name!r} type"), u64(f"tensor {name!r} offset")
        kind = ggml_type(type_id)
        if kind is None:
            raise ModelFileError(f"{path}: tensor {name!r} has tensor type {type_id}, unknown to the installed gguf "
                                 "package; upgrade gguf (`pip install -U gguf`) or use a file with a common quant "
                                 "type.")
        infos.append((name, dims, type_id, kind, offset))
    alignment = int(metadata.get("general.alignment", 32))
    if alignment <= 0 or alignment & (alignment - 1):
        raise ModelFileError(f"{path}: general.alignment={alignment} is not a power of two; corrupted file.")
    data_start = -(-pos // alignment) * alignment
    tensors = {}
    for name, dims, type_id, (type_name, block_values, block_bytes), offset in infos:
        if dims[0] % block_values or any(d == 0 for d in dims):
            raise ModelFileError(f"{path}: tensor {name!r} of shape {dims} does not fit {type_name} blocks of "
                                 f"{block_values}; corrupted file.")
        row_bytes = dims[0] // block_values * block_bytes
        n_bytes = row_bytes * math.prod(dims[1:])
        start = data_start + offset
        if start + n_bytes > size:
            raise ModelFileError(f"{path}: tensor {name!r} ends at byte {start + n_bytes:,}, past the file's "
                                 f"{size:,} bytes; the file is truncated: download it again.")
        tensors[name] = TensorInfo(tuple(reversed(dims)), type_id, type_name, start, n_bytes, row_bytes)
    return metadata, tensors


def permute_for_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order (interleaved rope pairs) back to the rotate-half layout.

    llama.cpp's converter reorders each head's rows from [pairs of first half | second half] to interleaved;
    the inverse groups each head's rows as (D/2, 2) and swaps those axes.
    """
    rows = weight.shape[0]
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))
