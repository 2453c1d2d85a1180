"""Text corpora -> token shards on disk, and the batches training reads from them.

Inputs are text files, folders (walked recursively) and JSONL files (one document per line, a text field).
`prepare` streams documents through the tokenizer into `train.bin` / `val.bin` (flat numpy arrays of token ids,
uint16 when the vocabulary fits, else uint32) plus `meta.json`; nothing holds the corpus in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import GPT4Error, check_flags

TEXT_SUFFIXES_SKIP = {".pyc", ".so", ".o", ".a", ".png", ".jpg", ".gif", ".gz", ".zip", ".bin", ".exe", ".pdf"}


def is_binary(path: Path) -> bool:
    """A file is binary if its first 8 KiB hold a NUL byte or are not UTF-8."""
    with open(path, "rb") as f:
        head = f.read(8192)
    if b"\0" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(head) - 4  # a multi-byte character cut at the 8 KiB edge is fine
    return False


def list_files(inputs: list[str]) -> list[Path]:
    """The files behind the inputs (folders walked recursively, sorted so every run sees the same order)."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix not in TEXT_SUFFIXES_SKIP)
        elif path.is_file():
            files.append(path)
        else:
            raise GPT4Error(f"Input {item} does not exist; give text files, folders or .jsonl files.")
    if not files:
        raise GPT4Error(f"No files found under {inputs}; give text files, folders or .jsonl files.")
    return files


def jsonl_records(path: Path, errors: str = "strict") -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line; a line that is not JSON is a clear error."""
    with open(path, encoding="utf-8", errors=errors) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise GPT4Error(f"{path}:{n} is not valid JSON ({e}); fix or remove that line.") from e


def iter_documents(files: list[Path], text_field: str = "text", warn=print) -> Iterator[str]:
    """Each document's text: a whole text file, or one JSONL line's `text_field`. Skips (with a warning)
    binary files, files that are not UTF-8 and empty files."""
    for path in files:
        if path.stat().st_size == 0:
            warn(f"skipping empty file {path}")
            continue
        if is_binary(path):
            warn(f"skipping binary file {path}")
            continue
        if path.suffix == ".jsonl":
            for n, record in jsonl_records(path, errors="replace"):
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise GPT4Error(f"{path}:{n} has no string field {text_field!r}; "
                                    f"pass --text-field with the name of the field that holds the text.")
                if text:
                    yield text
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                warn(f"skipping {path}: not UTF-8 text")
                continue
            if text.strip():
                yield text


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def fingerprint(files: list[Path], tokenizer_file: Path, settings: dict) -> str:
    """Identity of a preparation: inputs (path, size, mtime), tokenizer contents and settings."""
    h = hashlib.sha256(tokenizer_file.read_bytes())
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def prepare(inputs: list[str], tokenizer_path: str, out_dir: str, val_fraction: float = 0.005,
            text_field: str = "text", batch_docs: int = 64, progress: bool = True) -> dict:
    """Tokenize the inputs into out_dir/{train,val}.bin + meta.json; returns meta. Idempotent: when meta.json
    records the same inputs, tokenizer and settings, nothing is redone."""
    from tokenizers import Tokenizer as Backend
    from tqdm import tqdm

    from ..tokenizer import Tokenizer

    tok_dir = Path(tokenizer_path)
    tok_file = tok_dir / "tokenizer.json" if tok_dir.is_dir() else tok_dir
    if not tok_file.is_file():
        raise GPT4Error(f"No tokenizer at {tokenizer_path}; run `gpt4 train-tokenizer` first or give a model folder.")
    check_flags(("--val-fraction", val_fraction, 0 <= val_fraction < 1, "in [0, 1)"))
    files = list_files(inputs)
    backend = Backend.from_file(str(tok_file))
    vocab_size = backend.get_vocab_size()
    dtype = token_dtype(vocab_size)
    tok = Tokenizer.from_pretrained(tok_file.parent) if (tok_file.parent / "tokenizer_config.json").is_file() else None
    eos = tok.eos_token_id if tok is not None else None
    settings = dict(val_fraction=val_fraction, text_field=text_field)
    fp = fingerprint(files, tok_file, settings)
    out = Path(out_dir)
    meta_path = out / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fp and all((out / f"{s}.bin").is_file() for s in ("train", "val")):
            print(f"{out} is up to date ({meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens)",
                  file=sys.stderr)
            return meta
    out.mkdir(parents=True, exist_ok=True)
    # Write under temporary names and rename at the end: an interrupted run never leaves a half shard that
    # looks finished.
    tmp = {s: out / f"{s}.bin.tmp" for s in ("train", "val")}
    counts = {"train": 0, "val": 0}
    docs = {"train": 0, "val": 0}
    stride = max(1, round(1 / val_fraction)) if val_fraction > 0 else 0
    total_bytes = sum(p.stat().st_size for p in files)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not progress, file=sys.stderr)
    warnings = []
    try:
        with open(tmp["train"], "wb") as ftrain, open(tmp["val"], "wb") as fval:
            sinks = {"train": ftrain, "val": fval}
            index = 0

            def flush(batch):
                nonlocal index
                for enc in backend.encode_batch(batch, add_special_tokens=False):
                    ids = enc.ids + ([eos] if eos is not None else [])  # EOS separates documents
                    split = "val" if stride and index % stride == stride - 1 else "train"
                    np.asarray(ids, dtype=dtype).tofile(sinks[split])
                    counts[split] += len(ids)
                    docs[split] += 1
                    index += 1

            batch = []
            for path in files:
                for text in iter_documents([path], text_field, warn=warnings.append):
                    batch.append(text)
                    if len(batch) >= batch_docs:
                        flush(batch)
                        batch = []
                bar.update(path.stat().st_size)
            flush(batch)
    except BaseException:
        for p in tmp.values():
            p.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    for w in warnings[:20]:
        print(f"warning: {w}", file=sys.stderr)
    if len(warnings) > 20:
        print(f"warning: ... and {len(warnings) - 20} more skipped files", file=sys.stderr)
    if counts["train"] == 0:
        for p in tmp.values():
            p.unlink(missing_ok=True)
        raise GPT4Error(f"No text found in {inputs} (all files empty, binary or not UTF-8); give text inputs.")
    if val_fraction > 0 and counts["val"] == 0:
        # Too few documents for the stride: hold out the tail of the training tokens instead.
        train = np.fromfile(tmp["train"], dtype=dtype)
        cut = max(1, int(len(train) * val_fraction))
        train[-cut:].tofile(tmp["val"])
        train[:-cut].tofile(tmp["train"])
        counts["train"], counts["val"] = len(train) - cut, cut
    for s, p in tmp.items():
        os.replace(p, out / f"{s}.bin")
    tok_out = out / "tokenizer"
    if tok is not None:
        tok.save_pretrained(tok_out)
    else:
        tok_out.mkdir(exist_ok=True)
        backend.save(str(tok_out / "tokenizer.json"))
    meta = dict(fingerprint=fp, vocab_size=vocab_size, dtype=dtype.name, train_tokens=counts["train"],
                val_tokens=counts["val"], train_documents=docs["train"], val_documents=docs["val"],
                files=len(files), skipped=len(warnings), eos_token_id=eos)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")  # written last: its presence means "complete"
    print(f"wrote {counts['train']:,} train / {counts['val']:,} val tokens to {out}", file=sys.stderr)
    return meta


# ------------------------------------------------------------------------------------------------------
@dataclass
class Shards:
    """The prepared token arrays of a data folder (memory-mapped, read lazily)."""
    train: np.ndarray
    val: np.ndarray
    meta: dict
    folder: Path

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "Shards":
        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise GPT4Error(f"{folder} has no meta.json: it is not a finished `gpt4 prepare` output; "
                            "run `gpt4 prepare` (again) into it.")
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        arrays = []
        for split in ("train", "val"):
            path = folder / f"{split}.bin"
            expected = meta[f"{split}_tokens"] * dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise GPT4Error(f"{path} is missing or has the wrong size (expected {expected} bytes); "
                                "run `gpt4 prepare` again.")
            arrays.append(np.memmap(path, dtype=dtype, mode="r") if expected else np.zeros(0, dtype))
        return cls(arrays[0], arrays[1], meta, folder)


def batch_at(tokens: np.ndarray, step: int, rows: slice, global_batch: int, seq_len: int, seed: int):
    """The rows `rows` of the global batch number `step`: token windows (b, seq_len) as int64.

    Window starts are drawn from a generator seeded by (seed, step), so a batch depends only on its step:
    resuming at step k reads exactly what an uninterrupted run reads, and N ranks that each take their slice
    of the global batch see the same data as one process taking all of it.
    """
    n = len(tokens) - seq_len
    if n <= 0:
        raise GPT4Error(f"The data has {len(tokens)} tokens, too few for --seq-len {seq_len}; "
                        "use more text or a shorter --seq-len.")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, n + 1, (global_batch,), generator=g)[rows].tolist()
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq_len], dtype=np.int64) for s in starts]))


def unigram_baseline(train: np.ndarray, val: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> float:
    """Cross-entropy (nats/token) of the validation tokens under the add-one-smoothed unigram distribution of
    the training tokens: the loss of a model that ignores context."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    for i in range(0, len(train), chunk):
        counts += np.bincount(np.asarray(train[i:i + chunk]), minlength=vocab_size)[:vocab_size]
    logp = np.log((counts + 1) / (counts.sum() + vocab_size))
    total = 0.0
    for i in range(0, len(val), chunk):
        total -= logp[np.asarray(val[i:i + chunk], dtype=np.int64)].sum()
    return float(total / max(1, len(val)))
