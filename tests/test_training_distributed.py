"""Training under torchrun with 2 gloo processes on CPU: DDP equals one process at the same global batch, exact
resume across a restart, FSDP (fully_shard) equals DDP."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt4 import GPT4LMHeadModel

from .test_training import SIZES, data_dir, losses  # noqa: F401  (module-scoped corpus fixture)

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--preset", "tiny", "--hidden-size", str(SIZES["hidden_size"]), "--layers", str(SIZES["num_hidden_layers"]),
          "--heads", str(SIZES["num_attention_heads"]), "--steps", "6", "--seq-len", "32", "--lr", "3e-3",
          "--warmup-steps", "2", "--eval-interval", "3", "--eval-batches", "2", "--sample-tokens", "0",
          "--checkpoint-interval", "3", "--precision", "fp32", "--no-progress", "--threads", "1"]


def gpt4(args, nproc=1, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", "0", "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0"] if nproc > 1 else \
        [sys.executable]
    proc = subprocess.run(launcher + ["-m", "gpt4", "pretrain"] + args, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("single")
    gpt4(["--data", str(data_dir), "--out", str(out), "--batch-size", "4"] + COMMON)
    return out


def test_ddp_two_processes_match_one_process_and_resume_exactly(data_dir, single, tmp_path):  # noqa: F811
    full = tmp_path / "ddp"
    gpt4(["--data", str(data_dir), "--out", str(full), "--batch-size", "2"] + COMMON, nproc=2)
    # Same global batch (2 ranks x 2 = 4): same data, same losses up to float reduction order.
    assert losses(full) == pytest.approx(losses(single), abs=2e-4)
    summary_lines = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert len(summary_lines) == 6  # only rank 0 writes
    assert (full / "rng_rank1.pt").exists() is False and any(
        (p / "rng_rank1.pt").exists() for p in (full / "checkpoints").iterdir())

    # Interrupted after step 4 (between checkpoints at 3 and 6), then resumed by a fresh torchrun.
    part = tmp_path / "resumed"
    gpt4(["--data", str(data_dir), "--out", str(part), "--batch-size", "2", "--stop-after", "4"] + COMMON, nproc=2)
    gpt4(["--data", str(data_dir), "--out", str(part), "--batch-size", "2", "--resume"] + COMMON, nproc=2)
    assert losses(part) == losses(full)
    a = GPT4LMHeadModel.from_pretrained(str(full / "final")).state_dict()
    b = GPT4LMHeadModel.from_pretrained(str(part / "final")).state_dict()
    assert all((a[k] == b[k]).all() for k in a)


def test_fsdp_two_processes_match_one_process(data_dir, single, tmp_path):  # noqa: F811
    out = tmp_path / "fsdp"
    gpt4(["--data", str(data_dir), "--out", str(out), "--batch-size", "2", "--parallel", "fsdp"] + COMMON, nproc=2)
    assert losses(out) == pytest.approx(losses(single), abs=2e-4)
    model = GPT4LMHeadModel.from_pretrained(str(out / "final"))  # gathered into an ordinary checkpoint
    ref = GPT4LMHeadModel.from_pretrained(str(single / "final"))
    for (name, p), q in zip(model.state_dict().items(), ref.state_dict().values()):
        assert (p - q).abs().max() < 1e-3, name
    # Resume under FSDP: the gathered optimizer state is re-sharded onto the ranks.
    part = tmp_path / "fsdp-resumed"
    args = ["--data", str(data_dir), "--out", str(part), "--batch-size", "2", "--parallel", "fsdp"] + COMMON
    gpt4(args + ["--stop-after", "4"], nproc=2)
    gpt4(args + ["--resume"], nproc=2)
    assert losses(part) == pytest.approx(losses(out), abs=1e-6)


def _workers_of(out: Path) -> list[int]:
    """PIDs of the training processes (not the torchrun agent) writing to `out`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone, or not a process folder
            continue
        if str(out).encode() in cmd and b"pretrain" in cmd and b"torch.distributed.run" not in cmd:
            pids.append(int(proc.name))
    return pids


def test_a_rank_killed_under_max_restarts_resumes_and_loses_nothing(data_dir, tmp_path):  # noqa: F811
    """kill -9 of one rank mid-run: torchrun --max-restarts restarts the group, `--resume` (auto) continues from the
    newest complete checkpoint, and the losses equal an uninterrupted run."""
    longer = COMMON + ["--steps", "40", "--checkpoint-interval", "4"]
    full = tmp_path / "uninterrupted"
    gpt4(["--data", str(data_dir), "--out", str(full), "--batch-size", "2"] + longer, nproc=2)

    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "--max-restarts", "1", "-m", "gpt4", "pretrain", "--data", str(data_dir), "--out", str(out), "--batch-size", "2",
                            "--resume"] + longer, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)  # its own process group: cleaned up whole
    try:
        marker = out / "checkpoints" / "step_00000004" / "COMPLETE"
        deadline = time.monotonic() + 120
        while not marker.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        victims = _workers_of(out)
        assert marker.exists() and len(victims) == 2, "training did not reach its first checkpoint"
        os.kill(victims[1], signal.SIGKILL)
        output, _ = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)  # the agent and its workers: nothing left behind on failure
        run.wait()
    assert run.returncode == 0, output[-3000:]
    assert "resumed from" in output and str(out / "checkpoints") in output  # the restarted group resumed
    assert losses(out) == losses(full)


def test_a_torchrun_worker_skips_interpreter_shutdown_but_keeps_its_output_and_exit_code():
    """Under torchrun (WORLD_SIZE > 1) the command line ends its process with os._exit (training.distributed.
    exit_worker): the gloo threads FSDP leaves running must not meet a finalizing interpreter. Buffered output still
    arrives, a user error still exits 1, and atexit handlers, the sign of a normal shutdown, do not run."""
    script = ("import atexit, sys; atexit.register(print, 'interpreter shutdown'); from gpt4.cli import main; "
              "sys.exit(main(sys.argv[1:]))")

    def cli(*args, world_size):
        env = dict(os.environ, WORLD_SIZE=str(world_size), PYTHONPATH=str(ROOT))
        env.pop("PYTHONUNBUFFERED", None)  # piped output stays in its buffer until flushed
        return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=120)

    alone = cli("models", world_size=1)
    assert alone.returncode == 0 and "interpreter shutdown" in alone.stdout
    worker = cli("models", world_size=2)
    assert worker.returncode == 0 and "SmolLM2-135M-Instruct" in worker.stdout, worker.stderr
    assert "interpreter shutdown" not in worker.stdout
    failed = cli("generate", "hi", "--model", "no-such-model", world_size=2)
    assert failed.returncode == 1 and "neither a known model name" in failed.stderr
