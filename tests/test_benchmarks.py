"""The benchmark scripts' own machinery: finding and building the llama.cpp reference, the kernel benchmark's table."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _references():
    spec = importlib.util.spec_from_file_location("references", BENCHMARKS / "references.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _executable(path: Path, exit_code: int) -> Path:
    path.write_text(f"#!/bin/sh\nexit {exit_code}\n")
    path.chmod(0o755)
    return path


def test_llama_cpp_is_found_only_where_its_interpreter_imports_it(tmp_path):
    references = _references()
    assert not references.llama_cpp_found(tmp_path / "missing" / "bin" / "python")
    assert references.llama_cpp_found(_executable(tmp_path / "imports", 0))
    assert not references.llama_cpp_found(_executable(tmp_path / "lacks", 1))


class Recorder:
    """subprocess.run's stand-in: records each command and its environment, answers with the given exit codes."""

    def __init__(self, *codes):
        self.calls, self.codes = [], list(codes)

    def __call__(self, cmd, env=None):
        self.calls.append((cmd, env))
        return subprocess.CompletedProcess(cmd, self.codes.pop(0))


def test_the_build_creates_the_venv_then_compiles_llama_cpp_for_this_cpu(tmp_path):
    references = _references()
    python = tmp_path / "venv" / "bin" / "python"
    run = Recorder(0, 0)
    references.build_llama_cpp(python, run=run)
    (venv_cmd, _), (pip_cmd, env) = run.calls
    assert venv_cmd == [sys.executable, "-m", "venv", str(tmp_path / "venv")]
    assert pip_cmd == [str(python), "-m", "pip", "install", "--no-cache-dir", "--no-binary", "llama-cpp-python",
                       references.LLAMA_CPP_REQUIREMENT]  # compiled here, not a wheel from the index or pip's cache
    assert env["CMAKE_ARGS"] == "-DGGML_NATIVE=ON"  # built for the CPU at hand, not a generic wheel
    assert "[server]" in references.LLAMA_CPP_REQUIREMENT  # bench_serving.py runs its server


def test_the_build_reuses_an_existing_venv_and_says_why_it_failed(tmp_path):
    references = _references()
    (tmp_path / "bin").mkdir()
    python = _executable(tmp_path / "bin" / "python", 0)
    with pytest.raises(SystemExit, match="is not in a venv"):  # a system's interpreter: never pip into it
        references.build_llama_cpp(python, run=Recorder())
    (tmp_path / "pyvenv.cfg").write_text("home = /usr/bin\n")
    run = Recorder(1)
    with pytest.raises(SystemExit, match="needs a C\\+\\+ compiler and cmake"):
        references.build_llama_cpp(python, run=run)
    assert [cmd[1:4] for cmd, _ in run.calls] == [["-m", "pip", "install"]]  # no new venv over the existing one
    with pytest.raises(SystemExit, match="VENV/bin/python"):
        references.build_llama_cpp(tmp_path / "python", run=Recorder())


def test_a_missing_reference_is_built_only_when_asked(tmp_path, monkeypatch):
    references = _references()
    python = tmp_path / "venv" / "bin" / "python"
    builds = []
    monkeypatch.setattr(references, "build_llama_cpp", lambda path: builds.append(path))
    assert not references.ensure_llama_cpp(python, build=False) and builds == []
    with pytest.raises(SystemExit, match="was built, but .* does not import llama_cpp.server"):
        references.ensure_llama_cpp(python, build=True)  # (the stand-in built nothing)
    assert builds == [python]
    monkeypatch.setattr(references, "llama_cpp_found", lambda path: bool(builds))
    assert references.ensure_llama_cpp(python, build=True) and builds == [python]  # found: not built again


def test_the_kernel_benchmark_times_each_row_count_at_each_thread_count():
    """benchmarks/bench_kernels.py --threads: one line per format, row count and thread count, in that order."""
    script = BENCHMARKS / "bench_kernels.py"
    run = subprocess.run([sys.executable, str(script), "--formats", "w4a8", "q8", "--shape", "32x64", "--rows", "1",
                          "3", "--threads", "1", "2", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith(("| w4a8", "| q8"))]
    assert [(f.strip(), int(r), int(t)) for f, r, t, *_ in rows] == [
        (f, r, t) for f in ("w4a8", "q8") for r in (1, 3) for t in (1, 2)]
    assert all(float(gmacs) > 0 for *_, gmacs, _ in rows)
    refused = subprocess.run([sys.executable, str(script), "--threads", "0"], capture_output=True, text=True)
    assert refused.returncode == 2 and "--threads: counts of at least 1" in refused.stderr


def test_the_kernel_benchmark_times_decode_attention_at_each_slot_count():
    """benchmarks/bench_kernels.py --attention: a line per slot count, warm and from memory, in that order, over an
    fp16 cache or an int8 one."""
    script = BENCHMARKS / "bench_kernels.py"
    for kv_dtype in ("float16", "int8"):
        run = subprocess.run([sys.executable, str(script), "--attention", "8", "70", "--threads", "1", "--repeats",
                              "1", "--kv-dtype", kv_dtype], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert f"({kv_dtype} cache)" in run.stdout
        lines = run.stdout.splitlines()
        rows = [line.split("|")[1:-1] for line in lines if line.startswith("| ") and line[2].isdigit()]
        assert [(int(slots), int(threads)) for slots, threads, *_ in rows] == [(8, 1), (70, 1)]
        assert all(float(value) > 0 for row in rows for value in row[2:])
    refused = subprocess.run([sys.executable, str(script), "--attention", "0"], capture_output=True, text=True)
    assert refused.returncode == 2 and "--attention: slot counts of at least 1" in refused.stderr


def test_the_ab_benchmark_times_a_prompt_through_each_mode_in_turns():
    """benchmarks/bench_ab.py --prompt: fused and eager-layer prompts of real text in one process, a line per mode."""
    from .conftest import skip_without_w4a8

    skip_without_w4a8()
    run = subprocess.run([sys.executable, str(BENCHMARKS / "bench_ab.py"), "--dtype", "float32", "--quant", "w4a8",
                          "w4a8:layers", "--prompt", "40", "--rounds", "2"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("a 40-token prompt")]
    assert [line.split(":")[0] for line in lines] == ["a 40-token prompt, w4a8 eager", "a 40-token prompt, w4a8 layers"]
    assert all(float(line.split("median ")[1].split()[0]) > 0 for line in lines)


def test_the_kv_cache_quality_script_scores_each_dtype_through_the_cache():
    """benchmarks/kv_cache_quality.py: a row per cache dtype, perplexities near one another, the first dtype agreeing
    with itself everywhere; too short a text refused."""
    script = BENCHMARKS / "kv_cache_quality.py"
    run = subprocess.run([sys.executable, str(script), "--tokens", "300", "--quant", "none", "--dtypes", "float32",
                          "int8"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith(("| float32", "| int8"))]
    assert [name.strip() for name, *_ in rows] == ["float32", "int8"]
    (full, same), (rounded, agree) = [(float(p), float(a.strip(" %"))) for _, p, a in rows]
    assert same == 100 and 1 < full and abs(rounded - full) < 0.02 * full and agree > 90
    refused = subprocess.run([sys.executable, str(script), "--tokens", "1"], capture_output=True, text=True)
    assert refused.returncode == 2 and "--tokens: at least 2" in refused.stderr


def test_the_inference_benchmark_without_its_reference_names_it_and_writes_nothing(tmp_path):
    run = subprocess.run([sys.executable, str(BENCHMARKS / "bench_inference.py"), "--engines", "llama.cpp",
                          "--llama-python", str(tmp_path / "none" / "bin" / "python"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "not found at" in run.stderr and "--build-llama-cpp" in run.stderr
    assert "no engine left to measure" in run.stderr
    assert not (tmp_path / "out").exists()  # no empty results over earlier ones


def test_the_avx2_tile_probe_builds_and_prints_its_table(tmp_path):
    """The command the docs give for avx2_tile_probe.cpp works (its timings are not checked: not a test's job)."""
    import shutil

    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), []) if Path("/proc/cpuinfo").exists() else []
    if shutil.which("g++") is None or not {"avx2", "fma", "f16c"} <= set(flags):
        pytest.skip("needs g++ and a CPU with AVX2, FMA and F16C")
    probe = tmp_path / "probe"
    subprocess.run(["g++", "-O3", "-mavx2", "-mfma", "-mf16c", str(BENCHMARKS / "avx2_tile_probe.cpp"), "-o",
                    str(probe)], check=True, capture_output=True)
    out = subprocess.run([str(probe)], check=True, capture_output=True, text=True, timeout=120).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and "GMAC" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| A: as the kernel"] * 2 + [
        "| B: one broadcast, both parts", "| C: no broadcasts (bound)", "| D: no float epilogue (bound)",
        "| E: products summed as a tree"] + ["| F: no m term (bound)"] * 2 + [
        "| G: integer scales, no m term (bound)"] * 2 + ["| H: integer scales, m term in float"] * 2
    assert all(float(row.split(" | ")[2]) > 0 for row in rows)
    assert "vpmaddubsw alone:" in out
