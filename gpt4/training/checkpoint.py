"""Crash-safe, resumable training checkpoints.

    out/checkpoints/step_00000100/
        model/            save_pretrained folder (config.json, model.safetensors, tokenizer files)
        trainer.pt        optimizer, step, schedule position, config (rank 0)
        rng_rank{r}.pt    torch / python RNG states of rank r
        COMPLETE          written last: JSON of file sizes, checked before resuming

A checkpoint is written into `step_XXXXXXXX.tmp`, renamed into place, then marked COMPLETE. A kill at any point
leaves either a complete checkpoint or a folder without a marker, which resuming skips and rotation removes.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path

import torch

from ..errors import GPT4Error

MARKER = "COMPLETE"


def checkpoint_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def step_dir(out_dir, step: int) -> Path:
    return checkpoint_root(out_dir) / f"step_{step:08d}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER}


def write_rank_files(tmp: Path, rank: int) -> None:
    """Every rank's own part (its RNG state); called on all ranks before rank 0 commits."""
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")


def save_checkpoint(out_dir, step: int, model, trainer_state: dict, keep_last: int | None = None,
                    before_commit=None) -> Path:
    """Rank 0: write the model and trainer state into the temporary folder (where the ranks already wrote
    their RNG files), commit by rename, write the marker, then rotate. Returns the committed folder.

    `before_commit` (tests) runs after the files are written and before the rename."""
    final = step_dir(out_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp / "model")
        torch.save(trainer_state, tmp / "trainer.pt")
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
        if before_commit is not None:
            before_commit(tmp)
        if final.exists():  # a marker-less leftover of a crashed run at the same step
            shutil.rmtree(final)
        os.replace(tmp, final)
        (final / (MARKER + ".tmp")).write_text(json.dumps(_manifest(final)))
        os.replace(final / (MARKER + ".tmp"), final / MARKER)
        _fsync_dir(final)
        _fsync_dir(final.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise GPT4Error(f"Disk full while writing checkpoint {final}; the partial files were removed and "
                            "earlier checkpoints are intact. Free space (or lower --keep-last) and resume "
                            "with --resume.") from e
        raise
    if keep_last:
        rotate(out_dir, keep_last)
    return final


def is_complete(folder: Path) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        expected = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return expected == _manifest(folder)


def complete_checkpoints(out_dir) -> list[Path]:
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and
                     not p.name.endswith(".tmp"))
    return [p for p in folders if is_complete(p)]


def rotate(out_dir, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; remove older ones and abandoned partial folders older
    than the newest complete one. The newest complete checkpoint is never removed."""
    complete = complete_checkpoints(out_dir)
    if not complete:
        return
    newest = complete[-1]
    for p in complete[:-max(1, keep_last)]:
        shutil.rmtree(p)
    for p in checkpoint_root(out_dir).iterdir():
        if p.is_dir() and p not in complete and p.name < newest.name:
            shutil.rmtree(p)


def resolve_resume(out_dir, resume: str) -> Path | None:
    """'auto' -> newest complete checkpoint under out_dir (None if there is none); a path -> that checkpoint,
    which must be complete."""
    if resume == "auto":
        complete = complete_checkpoints(out_dir)
        root = checkpoint_root(out_dir)
        if root.is_dir():
            skipped = [p.name for p in root.iterdir() if p.is_dir() and p not in complete and
                       (not complete or p.name > complete[-1].name)]
            if skipped:
                print(f"warning: skipping incomplete checkpoint(s) {sorted(skipped)}", flush=True)
        return complete[-1] if complete else None
    folder = Path(resume)
    if not folder.is_dir():
        raise GPT4Error(f"--resume {resume}: no such checkpoint folder.")
    if not is_complete(folder):
        others = [p.name for p in complete_checkpoints(folder.parent.parent)] if folder.parent.name == \
            "checkpoints" else []
        hint = f" Complete checkpoints there: {others}." if others else ""
        raise GPT4Error(f"--resume {resume} is a partial or corrupt checkpoint (missing COMPLETE marker or files "
                        f"whose sizes differ from it); resume from a complete one, or use --resume auto.{hint}")
    return folder


def load_trainer_state(folder: Path, rank: int) -> tuple[dict, dict | None]:
    """(trainer state, this rank's RNG state or None when the run had fewer ranks)."""
    try:
        state = torch.load(folder / "trainer.pt", weights_only=True, map_location="cpu")
        rng_file = folder / f"rng_rank{rank}.pt"
        rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    except Exception as e:  # torch raises several types for truncated or foreign pickles
        raise GPT4Error(f"Checkpoint {folder} cannot be read ({e}); resume from another one.") from e
    return state, rng
