"""llama.cpp, the reference the benchmarks measure us against: llama-cpp-python built from source for this CPU, in a
venv of its own (its wheels are generic builds; `-DGGML_NATIVE=ON` compiles ggml for the CPU at hand, as a user who
wants its speed would). bench_inference.py and bench_serving.py find it at --llama-python and, given
--build-llama-cpp, build it there first (about 10 minutes on 2 cores). Standard library only: bench_inference.py's
llama.cpp worker imports it in that venv, where there is no torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LLAMA_CPP_REQUIREMENT = "llama-cpp-python[server]==0.3.36"  # [server]: bench_serving.py runs its OpenAI server
BUILD_HINT = "build it with --build-llama-cpp (about 10 minutes on 2 cores)"


def llama_cpp_found(python: str | os.PathLike) -> bool:
    """Whether `python` runs and imports llama-cpp-python with its server."""
    if not os.access(python, os.X_OK):
        return False
    check = subprocess.run([str(python), "-c", "import llama_cpp.server, uvicorn"], capture_output=True)
    return check.returncode == 0


def build_llama_cpp(python: str | os.PathLike, run=subprocess.run) -> None:
    """Create the venv whose interpreter `python` (VENV/bin/python) is, where missing, and build
    LLAMA_CPP_REQUIREMENT from source into it for this CPU. Raises SystemExit with the reason if either step fails."""
    python = Path(python)
    if python.parent.name != "bin":
        raise SystemExit(f"--llama-python {python}: give a venv's interpreter, VENV/bin/python, for the build")
    venv = python.parent.parent
    if python.exists() and not (venv / "pyvenv.cfg").is_file():  # never pip into a system's own interpreter
        raise SystemExit(f"--llama-python {python} is not in a venv (no {venv / 'pyvenv.cfg'}); give a venv's "
                         "interpreter, or one where a venv can be created")
    if not python.exists():
        print(f"creating the venv {venv} for llama.cpp ...", file=sys.stderr, flush=True)
        if run([sys.executable, "-m", "venv", str(venv)]).returncode != 0:
            raise SystemExit(f"could not create the venv {venv}")
    print(f"building {LLAMA_CPP_REQUIREMENT} from source for this CPU into {venv} (about 10 minutes on 2 cores) ...",
          file=sys.stderr, flush=True)
    # --no-binary and --no-cache-dir: compiled here, never a wheel built elsewhere or for another CPU, pip's cache too
    build = run([str(python), "-m", "pip", "install", "--no-cache-dir", "--no-binary", "llama-cpp-python",
                 LLAMA_CPP_REQUIREMENT],
                env=dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=ON"))
    if build.returncode != 0:
        raise SystemExit(f"building {LLAMA_CPP_REQUIREMENT} failed (pip's output above); it needs a C++ compiler "
                         "and cmake")


def ensure_llama_cpp(python: str | os.PathLike, build: bool) -> bool:
    """Whether llama.cpp is there at `python`, having built it first if asked to and missing (SystemExit if that
    build fails or leaves it unimportable)."""
    if llama_cpp_found(python):
        return True
    if not build:
        return False
    build_llama_cpp(python)
    if not llama_cpp_found(python):
        raise SystemExit(f"{LLAMA_CPP_REQUIREMENT} was built, but {python} does not import llama_cpp.server")
    return True
