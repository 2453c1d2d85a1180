"""C++ kernels of our own, built on first use with PyTorch's cpp_extension (g++ and ninja) and cached.

w4a8.cpp: 4-bit weights times activations quantized to int8 in groups of 32, multiplied in integers with AVX-512 VNNI
(on CPUs without AVX-512, with AVX2's byte multiplies: a build of the same source), as llama.cpp multiplies its Q4
blocks by Q8 activations (`--quant w4a8`, auto's choice where it runs; gpt4.quant.W4A8Linear), and the same blocks
dequantized for prompt chunks. On the default model a decode step's 4-bit matmuls take 1.3-2.1x less time than
with PyTorch's int4 kernel at one row and 2-2.6x less at 8-16 rows (benchmarks/bench_int4_vnni_kernel.py;
docs/performance.md, runs 16-17). The same for an LM head's 8-bit Q8_0 groups (gpt4.quant.Q8Linear, run 18) and a
file's 5-bit and 6-bit groups (gpt4.quant.Q5Linear, Q6Linear; runs 19-20), and attention over a KV cache, a decode
step's and a prompt chunk's (gpt4.model.Attention.use_attention_kernels; run 30 for prompts), which w4a8 models use
too. decode_layers runs a whole decode step's layers of such a model in one call, these kernels back to back with
the norms, rotations and activations between them (gpt4.model.GPT4LMHeadModel.use_fused_decode, run 19), and
prefill_layers a prompt chunk's (run 29). The AVX2 build: run 21.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import warnings
from pathlib import Path

import torch

from ..errors import GPT4Error
from ..models import cache_dir

HERE = Path(__file__).resolve().parent
# The ISAs the kernel is written for, each build's passed to the compiler explicitly (not -march=native: the cached
# build must not depend on which machine built it beyond these): AVX-512 with VNNI, else AVX2 with FMA and F16C.
AVX512_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni", "-fopenmp"]
AVX2_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
# name: (flags, the /proc/cpuinfo flags they need); the first that runs here is built
_ISAS = {"avx512": (AVX512_FLAGS, {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"}),
         "avx2": (AVX2_FLAGS, {"avx2", "fma", "f16c"})}
# The kernel's block formats (gpt4_kernels.{kind}_matmul, _dequantize): a block's bytes, and where its float16
# values begin (d, then m or the second half's d where it has one; w4a8.cpp's Block structs).
BLOCK_LAYOUTS = {"w4a8": (320, 256), "q5": (352, 320), "q5k": (384, 320), "q6": (448, 384), "q8": (544, 512)}


@functools.cache
def w4a8_flags() -> list[str] | None:
    """The compiler flags of the kernel's build for this CPU, or None where neither ISA runs. GPT4_KERNEL_ISA=avx2
    builds the AVX2 kernel on an AVX-512 CPU too (to compare them; tests/test_quant.py does)."""
    cpu, forced = _cpu_flags(), os.environ.get("GPT4_KERNEL_ISA")
    if forced is not None and forced not in _ISAS:
        raise GPT4Error(f"GPT4_KERNEL_ISA={forced!r}: choose one of {', '.join(_ISAS)}.")
    return next((flags for name, (flags, needs) in _ISAS.items() if needs <= cpu and forced in (None, name)), None)


@functools.cache
def w4a8_unavailable_reason() -> str | None:
    """Why --quant w4a8 cannot run here, or None when it can (the CPU and a C++ toolchain; not whether it builds)."""
    if w4a8_flags() is None:
        return ("--quant w4a8 needs a CPU with AVX-512 VNNI, or AVX2 with FMA and F16C (flags in /proc/cpuinfo); "
                "use --quant int4.")
    # (shutil.which: cpp_extension's own check would import it, 0.13 s of every process's start)
    if shutil.which("ninja") is None:
        return "--quant w4a8 builds its kernel with ninja, which is not installed (pip install ninja); or use int4."
    return None


def _cpu_flags() -> set[str]:
    """The first CPU's flags in /proc/cpuinfo (an empty set off Linux: the kernel's build was never tried there)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


@functools.cache
def w4a8_ready() -> bool:
    """Whether quant="auto" takes w4a8: the kernel runs here, built now if it was not yet (10-30 s, once). A build
    that fails is reported in a warning, and auto takes int4."""
    if w4a8_unavailable_reason() is not None:
        return False
    try:
        load_w4a8()
    except GPT4Error as e:
        warnings.warn(f"{e} (--quant auto takes int4.)", RuntimeWarning, stacklevel=2)
        return False
    return True


def w4a8_build_dir() -> Path:
    """Where w4a8.cpp is built: one folder per source, PyTorch version and flags."""
    flags = " ".join(w4a8_flags() or [])
    key = hashlib.sha256((HERE / "w4a8.cpp").read_bytes() + torch.__version__.encode() + flags.encode())
    return cache_dir() / "kernels" / f"w4a8-{key.hexdigest()[:16]}"


@functools.cache
def load_w4a8() -> None:
    """Build (once per source and PyTorch version, 10-30 s) and load w4a8.cpp, registering
    torch.ops.gpt4_kernels.w4a8_matmul and its shape function for torch.compile. GPT4Error if it cannot run here."""
    reason = w4a8_unavailable_reason()
    if reason:
        raise GPT4Error(reason)
    source, build = HERE / "w4a8.cpp", w4a8_build_dir()
    build.mkdir(parents=True, exist_ok=True)
    built = build / "built"  # written once a build of this source has loaded: a killed build leaves none
    if built.exists():  # loaded as it is: cpp_extension.load's up-to-date check (ninja) costs ~0.15 s a process
        torch.ops.load_library(str(build / "gpt4_w4a8.so"))
    else:
        from torch.utils.cpp_extension import load

        if not any(build.glob("*.so")):
            warnings.warn(f"Building the w4a8 kernel into {build} (once; 10-30 s)...", RuntimeWarning,
                          stacklevel=3)
        try:
            load("gpt4_w4a8", [str(source)], extra_cflags=w4a8_flags(), extra_ldflags=["-fopenmp"],
                 build_directory=str(build), is_python_module=False, verbose=False)
        except (RuntimeError, OSError) as e:  # a compiler error or none installed: the user's toolchain
            raise GPT4Error(f"Building the w4a8 kernel failed ({e}); it needs g++ with AVX-512 or AVX2 support. "
                            "Use --quant int4.") from e
        built.touch()

    for kind in BLOCK_LAYOUTS:
        torch.library.register_fake(f"gpt4_kernels::{kind}_matmul")(_matmul_shape)
        torch.library.register_fake(f"gpt4_kernels::{kind}_dequantize")(_dequantize_shape)
    torch.library.register_fake("gpt4_kernels::q8_rows")(_rows_shape)
    torch.library.register_fake("gpt4_kernels::decode_attention")(_attention_shape)
    torch.library.register_fake("gpt4_kernels::prefill_attention")(_prefill_attention_shape)


def _matmul_shape(x, blocks):
    return x.new_empty((x.shape[0], blocks.shape[0] * 16))


def _dequantize_shape(blocks, dtype):
    return blocks.new_empty((blocks.shape[1] * 32, blocks.shape[0] * 16), dtype=dtype)


def _rows_shape(blocks, ids, dtype):
    return blocks.new_empty((*ids.shape, blocks.shape[1] * 32), dtype=dtype)


def _attention_shape(q, k, v, mask, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _prefill_attention_shape(q, k, v, mask, scale):  # (B, Hq, S, D), a view of a contiguous (B, S, Hq, D)
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], q.shape[3])).transpose(1, 2)
