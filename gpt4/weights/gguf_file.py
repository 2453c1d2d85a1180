"""GGUF files (llama.cpp's format): checked header, config from metadata, tensors dequantized to torch.

Parsing and dequantization use the `gguf` package; this module adds the checks a hostile or damaged file needs
(magic, version, counts, every tensor's byte range inside the file) and turns its failures into one clear error.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

import numpy as np
import torch

from ..config import GPT4Config
from ..errors import ModelFileError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")


class GGUFFile:
    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path)
        _check_header(self.path)
        try:
            self.reader = GGUFReader(self.path, "r")
        except (ValueError, KeyError, IndexError, struct.error, OverflowError, MemoryError, TypeError) as e:
            if "GGMLQuantizationType" in str(e):
                raise ModelFileError(f"{self.path} uses a tensor type unknown to the installed gguf package ({e}); "
                                     "upgrade gguf (`pip install -U gguf`) or use a file with a common quant "
                                     "type.") from e
            raise ModelFileError(f"{self.path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                                 "the file is truncated or corrupted: download it again.") from e
        size = self.path.stat().st_size
        self.tensors = {}
        for t in self.reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size or t.data.size * t.data.itemsize != t.n_bytes:
                raise ModelFileError(f"{self.path}: tensor {t.name!r} ends at byte {end:,}, past the file's "
                                     f"{size:,} bytes; the file is truncated: download it again.")
            self.tensors[t.name] = t

    def close(self) -> None:
        # GGUFReader holds a numpy memmap; dropping the references closes it.
        self.tensors, self.reader = {}, None

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise ModelFileError(f"{self.path}: metadata {key!r} is corrupted ({e}).") from e

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
    def tensor(self, name: str) -> torch.Tensor:
        """A tensor dequantized to fp32, in PyTorch layout (out_features, in_features)."""
        from gguf import GGMLQuantizationType, quants

        t = self.tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
        try:
            if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                array = np.array(t.data, dtype=np.float32)  # a copy: the memmap is read-only
            else:
                array = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ModelFileError(f"{self.path}: tensor {name!r} has type {t.tensor_type.name}, which the gguf "
                                 "package cannot dequantize; use a file with a common quant type "
                                 "(F16, Q8_0, Q4_K_M, ...).") from e
        if array.size != math.prod(shape):
            raise ModelFileError(f"{self.path}: tensor {name!r} holds {array.size} values, its shape {shape} "
                                 "needs more; the file is corrupted.")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).reshape(shape))

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
            vocab = int(self.tensors["token_embd.weight"].shape[-1])
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


def _int_or_none(value):
    return None if value is None else int(value)


# Sizes of GGUF metadata value types (4: uint32 ... 12: float64); 8 is string, 9 is array.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_MAX_DIMS = 4  # ggml tensors have at most 4 dimensions


def _check_header(path: Path) -> None:
    """Walk the header with every count, length and type checked before it is used (llama.cpp style).

    The gguf package trusts the file's counts; a corrupted one can make it crawl through a huge array. This
    pass costs a read of the header only and turns any inconsistency into one clear error.
    """
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
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        _walk_header(data, path, n_tensors, n_kv)


def _walk_header(data, path: Path, n_tensors: int, n_kv: int) -> None:
    size, pos = len(data), 24

    def take(n, what):
        nonlocal pos
        if pos + n > size:
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

    def value(kind, what):
        if kind in _SCALAR_SIZES:
            take(_SCALAR_SIZES[kind], what)
        elif kind == 8:
            take(u64(what + " length"), what)
        elif kind == 9:
            item, count = u32(what + " item type"), u64(what + " count")
            if item in _SCALAR_SIZES:
                take(count * _SCALAR_SIZES[item], what)
            elif item == 8:
                if count * 8 > size - pos:  # every string has at least its 8-byte length: cheap bound first
                    take(count * 8, what)
                for _ in range(count):
                    take(u64(what + " string length"), what)
            else:
                raise ModelFileError(f"{path}: metadata {what} is an array of unknown type {item}; corrupted file.")
        else:
            raise ModelFileError(f"{path}: metadata {what} has unknown value type {kind}; the file is corrupted.")

    for _ in range(n_kv):
        key = string("a metadata key")
        value(u32(f"{key!r} type"), repr(key))
    for _ in range(n_tensors):
        name = string("a tensor name")
        n_dims = u32(f"tensor {name!r} rank")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise ModelFileError(f"{path}: tensor {name!r} has {n_dims} dimensions (1 to 4 allowed); corrupted file.")
        elements = math.prod(u64(f"tensor {name!r} shape") for _ in range(n_dims))
        if elements > 8 * size:  # no quant type packs more than 8 values into a byte
            raise ModelFileError(f"{path}: tensor {name!r} claims {elements:,} values, more than the file can hold.")
        take(4 + 8, f"tensor {name!r} type and offset")


def permute_for_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order (interleaved rope pairs) back to the rotate-half layout.

    llama.cpp's converter reorders each head's rows from [pairs of first half | second half] to interleaved;
    the inverse groups each head's rows as (D/2, 2) and swaps those axes.
    """
    rows = weight.shape[0]
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))
