"""C++ kernels of our own, built on first use with PyTorch's cpp_extension (g++ and ninja) and cached.

w4a8.cpp: 4-bit weights times activations quantized to int8 in groups of 32, multiplied in integers with AVX-512 VNNI,
as llama.cpp multiplies its Q4 blocks by Q8 activations (`--quant w4a8`, auto's choice where it runs;
gpt4.quant.W4A8Linear), and the same blocks dequantized for prompt chunks. On the default model a decode step's 4-bit
matmuls take 1.3-2.1x less time than with PyTorch's int4 kernel at one row and 2-2.6x less at 8-16 rows
(benchmarks/bench_int4_vnni_kernel.py; docs/performance.md, runs 16-17). The same for an LM head's 8-bit Q8_0 groups
(gpt4.quant.Q8Linear, run 18) and a file's 5-bit and 6-bit groups (gpt4.quant.Q5Linear, Q6Linear; runs 19-20), and
a decode step's attention (gpt4.model.Attention.use_decode_kernel), which w4a8 models use too. decode_layers runs a
whole decode step's layers of such a model in one call, these kernels back to back with the norms, rotations and
activations between them (gpt4.model.GPT4LMHeadModel.use_fused_decode, run 19).
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import warnings
from pathlib import Path

import torch

from ..errors import GPT4Error
from ..models import cache_dir

HERE = Path(__file__).resolve().parent
# The ISA the kernel is written for, passed to the compiler explicitly (not -march=native: the cached build must
# not depend on which machine built it beyond these).
W4A8_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni", "-fopenmp"]


@functools.cache
def w4a8_unavailable_reason() -> str | None:
    """Why --quant w4a8 cannot run here, or None when it can (the CPU and a C++ toolchain; not whether it builds)."""
    if "avx512_vnni" not in _cpu_flags():  # (torch.cpu._is_vnni_supported also counts 256-bit AVX-VNNI)
        return "--quant w4a8 needs a CPU with AVX-512 VNNI (avx512_vnni in /proc/cpuinfo); use --quant int4."
    # (shutil.which: cpp_extension's own check would import it, 0.13 s of every process's start)
    if shutil.which("ninja") is None:
        return "--quant w4a8 builds its kernel with ninja, which is not installed (pip install ninja); or use int4."
    return None


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: the kernel's build was never tried there
        return ""


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
    key = hashlib.sha256((HERE / "w4a8.cpp").read_bytes() + torch.__version__.encode() + " ".join(W4A8_FLAGS).encode())
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
            load("gpt4_w4a8", [str(source)], extra_cflags=W4A8_FLAGS, extra_ldflags=["-fopenmp"],
                 build_directory=str(build), is_python_module=False, verbose=False)
        except (RuntimeError, OSError) as e:  # a compiler error or none installed: the user's toolchain
            raise GPT4Error(f"Building the w4a8 kernel failed ({e}); it needs g++ with AVX-512 support. Use "
                            "--quant int4.") from e
        built.touch()

    for kind in ("w4a8", "q5", "q5k", "q6", "q8"):
        torch.library.register_fake(f"gpt4_kernels::{kind}_matmul")(_matmul_shape)
        torch.library.register_fake(f"gpt4_kernels::{kind}_dequantize")(_dequantize_shape)
    torch.library.register_fake("gpt4_kernels::q8_rows")(_rows_shape)
    torch.library.register_fake("gpt4_kernels::decode_attention")(_attention_shape)


def _matmul_shape(x, blocks):
    return x.new_empty((x.shape[0], blocks.shape[0] * 16))


def _dequantize_shape(blocks, dtype):
    return blocks.new_empty((blocks.shape[1] * 32, blocks.shape[0] * 16), dtype=dtype)


def _rows_shape(blocks, ids, dtype):
    return blocks.new_empty((*ids.shape, blocks.shape[1] * 32), dtype=dtype)


def _attention_shape(q, k, v, mask, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
