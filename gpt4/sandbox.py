"""Run untrusted (model-written) Python in a child process that can neither hang nor harm the caller.

Limits, applied in the child between fork and exec:
* CPU time (RLIMIT_CPU) and a wall-clock timeout after which the whole process group is killed;
* address space (RLIMIT_AS): unbounded allocation fails with MemoryError instead of swapping the machine;
* file size (RLIMIT_FSIZE): output files, stdout and stderr included (they go to files, not pipes, so a
  program printing forever cannot fill the caller's memory);
* no new processes (RLIMIT_NPROC = 1): fork bombs fail at the first fork. Linux does not apply this limit
  to root, so when the caller is root the child also drops to the unprivileged 'nobody' user;
* a fresh temporary working directory, removed afterwards; `python -I` (isolated: no user site, no
  PYTHON* variables, no script directory on sys.path) and an almost empty environment.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534


@dataclass
class Limits:
    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 10
    memory_mb: int = 512  # address space
    file_mb: int = 8  # largest file the program may write (stdout/stderr included)
    output_chars: int = 4000  # of stdout/stderr kept in the result


@dataclass
class SandboxResult:
    status: str  # "passed" | "failed" | "timeout" | "memory" | "killed"
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def summary(self) -> str:
        what = {"passed": "ran without error", "failed": f"failed (exit code {self.returncode})",
                "timeout": "was stopped: it ran past the time limit",
                "memory": "was stopped: it ran out of its memory limit",
                "killed": f"was killed by signal {-(self.returncode or 0)}"}[self.status]
        return f"The program {what} in {self.duration_s:.2f}s."


def _limit_child(limits: Limits, drop_to_nobody: bool):
    def apply():  # runs in the child after fork, before exec
        mb = 1024 * 1024
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mb, limits.file_mb * mb))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
        if drop_to_nobody:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
    return apply


def _world_executable(path: Path) -> bool:
    """Whether an unprivileged user can run `path` (execute bits along the whole resolved path)."""
    path = path.resolve()
    if not path.is_file() or not path.stat().st_mode & 0o001:
        return False
    return all(p.stat().st_mode & 0o001 for p in path.parents)


def _interpreter(drop: bool) -> str:
    """This interpreter; when the child drops to 'nobody', the first one that user may run."""
    if not drop:
        return sys.executable
    for candidate in (sys.executable, getattr(sys, "_base_executable", sys.executable), "/usr/bin/python3"):
        if _world_executable(Path(candidate)):
            return candidate
    return ""


def _tail(path: Path, chars: int) -> str:
    data = path.read_bytes() if path.exists() else b""
    text = data.decode("utf-8", errors="replace")
    return text if len(text) <= chars else "...\n" + text[-chars:]


def run_python(code: str, limits: Limits | None = None, stdin: str = "") -> SandboxResult:
    """Run `code` as a Python program in the sandbox and report how it ended."""
    limits = limits or Limits()
    python = _interpreter(os.geteuid() == 0)
    # No interpreter 'nobody' may run: stay root; every limit but the process count still holds.
    drop, python = (True, python) if python else (False, sys.executable)
    drop = drop and os.geteuid() == 0
    with tempfile.TemporaryDirectory(prefix="gpt4-sandbox-") as tmp:
        work = Path(tmp)
        if drop:
            os.chmod(work, 0o777)  # the 'nobody' child writes its files here
        script, out, err = work / "main.py", work / "stdout.txt", work / "stderr.txt"
        script.write_text(code, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": tmp, "PYTHONIOENCODING": "utf-8"}
        start = time.perf_counter()
        with open(out, "wb") as fo, open(err, "wb") as fe:
            if drop:
                for f in (out, err):
                    os.chmod(f, 0o666)
            proc = subprocess.Popen([python, "-I", "-B", str(script)], cwd=tmp, env=env,
                                    stdin=subprocess.PIPE, stdout=fo, stderr=fe, start_new_session=True,
                                    preexec_fn=_limit_child(limits, drop), close_fds=True)
            timed_out = False
            try:
                proc.communicate(stdin.encode(), timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # The program's own group: anything it started dies with it, finished or not.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        duration = time.perf_counter() - start
        stdout, stderr = _tail(out, limits.output_chars), _tail(err, limits.output_chars)
    rc = proc.returncode
    if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL) and duration >= limits.cpu_s * 0.9:
        status = "timeout"
    elif "MemoryError" in stderr:
        status = "memory"
    elif rc == 0:
        status = "passed"
    elif rc < 0:
        status = "killed"
    else:
        status = "failed"
    return SandboxResult(status, rc, stdout, stderr, duration)
