"""The decode step compiled ahead of time (AOTInductor), cached on disk: compiled once, loaded in milliseconds.

torch.compile traces the step again in every process (10-12 s a graph here even with inductor's on-disk cache).
Here the step is exported (torch.export) and compiled by AOTInductor into three packages, one for a single sequence,
one for batches of 2 to 127 rows, and one for 2 to 16 tokens of a single sequence (prompt lookup's check of a draft,
the logits after each), without the weights: a later process loads them with PyTorch's C++ loader
(a few ms, no import of inductor) and binds the model's own tensors to them, so nothing is copied.

The packages live in $GPT4_HOME/compiled/<key>/ (see models.cache_dir), where the key hashes what the compiled
code depends on: the weights' source (file identity, or the tensors themselves for a model built in memory), the
config, dtype and quantization, this CPU, the torch version and the source of the modules the step runs through.
A build is checked against the eager step before it is kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .cache import KVCache
from .model import attention_mask_for
from .quant import DEQUANTIZE_ROWS, Int4Linear, Int8Linear

GRAPHS = ("one", "batch", "draft")  # a single sequence; 2..MAX_BATCH rows; 2..MAX_DRAFT tokens of one sequence
MAX_BATCH = DEQUANTIZE_ROWS - 1  # from DEQUANTIZE_ROWS rows on, the quantized layers take another path
MAX_DRAFT = 16  # prompt lookup checks up to MAX_DRAFT - 1 draft tokens after the newest one in the compiled graph
_TRACED_SOURCES = ("model.py", "quant.py", "cache.py", "aot.py", "kernels/w4a8.cpp")  # w4a8: the operator's schema


class _Step(nn.Module):
    """The model's eager decode step (or, with every_position, its check of a draft) over a cache given as per-layer
    tensors (what export can flatten)."""

    def __init__(self, model: nn.Module, every_position: bool = False):
        super().__init__()
        self.model, self.every_position = model, every_position

    def forward(self, input_ids, positions, mask, keys: list[torch.Tensor], values: list[torch.Tensor]):
        cache = object.__new__(KVCache)
        cache.keys, cache.values = keys, values
        step = self.model._verify_step if self.every_position else self.model._decode_step
        return step(input_ids, positions, mask, cache)


def package_folder(model) -> Path:
    from .models import cache_dir

    return cache_dir() / "compiled" / cache_key(model)


def cache_key(model) -> str:
    digest = hashlib.sha256()
    source = getattr(model, "source", None)
    if source is not None and Path(source).exists():
        files = sorted(Path(source).rglob("*")) if Path(source).is_dir() else [Path(source)]
        identity = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
        digest.update(json.dumps(identity).encode())
    else:  # built in memory (or its file is gone): the tensors themselves
        for name, tensor in sorted(_named_tensors(model).items()):
            digest.update(name.encode())
            digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    here = Path(__file__).parent
    described = {
        "config": asdict(model.config), "dtype": str(model.dtype), "quant": model.quant,
        "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
        "amx": torch.cpu._is_amx_tile_supported(), "vnni": torch.cpu._is_vnni_supported(),
        "code": [hashlib.sha256((here / name).read_bytes()).hexdigest() for name in _TRACED_SOURCES],
    }
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of the model, under every name they have (a tied head's table under the head's name too)."""
    return {**dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False))}


def unsupported(model) -> str | None:
    """Why the model's step cannot be compiled ahead of time, or None. (Said before building: a build that could
    not be bound would be repeated, minutes each time, by every later run.)"""
    if model.device.type != "cpu":
        return f"it is compiled for the CPU only, not {model.device.type}"
    if any(getattr(m, "packed", None) is not None for m in model.modules() if isinstance(m, Int8Linear)):
        return ("int8 layers packed for oneDNN's integer matmuls (--quant int8 on a CPU with VNNI, w8a8) are not "
                "supported ahead of time; --compile compiles them")
    if len({m.group_size for m in model.modules() if isinstance(m, Int4Linear)}) > 1:
        return "int4 layers of different group sizes are not supported ahead of time"
    return None


def is_built(folder: Path) -> bool:
    return all((folder / f"{graph}.pt2").is_file() for graph in GRAPHS)


def build(model, folder: Path) -> None:
    """Export and compile the graphs of the model's decode step into folder (about a minute each on 2 cores).
    Only a step that agrees with the eager one (check_against_eager) makes the folder."""
    config = model.config
    batch = torch.export.Dim("batch", min=2, max=MAX_BATCH)
    tokens = torch.export.Dim("tokens", min=2, max=MAX_DRAFT)
    slots = torch.export.Dim("slots", min=2, max=1 << 20)  # the cache's length
    seen = torch.export.Dim("seen", min=2, max=1 << 20)  # kv_length: the mask's last dimension
    layers = config.num_hidden_layers
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".building-"))
    try:
        for graph, rows, width in zip(GRAPHS, (1, 3, 1), (1, 1, 3)):
            step = _Step(model, every_position=graph == "draft").eval()
            cache = KVCache(config, rows, 8, dtype=torch.float32)
            positions = torch.arange(4, 4 + width).repeat(rows, 1)
            mask = torch.ones(rows, 1, width, 4 + width, dtype=torch.bool)
            example = (torch.zeros(rows, width, dtype=torch.long), positions, mask, cache.keys, cache.values)
            b = {0: batch} if rows > 1 else {}
            s = {1: tokens} if width > 1 else {}
            dynamic = ({**b, **s}, {**b, **s}, {**b, **({2: tokens} if s else {}), 3: seen},
                       [{**b, 2: slots}] * layers, [{**b, 2: slots}] * layers)
            with torch.no_grad(), warnings.catch_warnings():
                # (torch 2.13's own pytree code trips its deprecation of LeafSpec checks: noise for our users)
                warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`", category=FutureWarning)
                exported = torch.export.export(step, example, dynamic_shapes=dynamic, strict=False)
                torch._inductor.aoti_compile_and_package(
                    exported, package_path=str(staging / f"{graph}.pt2"),
                    inductor_configs={"aot_inductor.package_constants_in_so": False})
        check_against_eager(model, CompiledDecode(model, staging))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)  # complete, checked packages or none: a build cut short is never loaded
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_against_eager(model, compiled) -> None:
    """One step of one row and of two rows, and the check of a 3-token draft, after a 2-token prompt, compiled and
    eager from the same cache, must agree within the rounding of a fused graph (the default model: 1-2% of the
    logits' norm in bf16)."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows, width in ((1, 1), (2, 1), (1, 3)):
            prompts = torch.randint(0, config.vocab_size, (rows, 2), generator=generator)
            caches = [KVCache(config, rows, 6, dtype=torch.float32, device=model.device) for _ in "ab"]
            model.hidden_states(prompts, torch.arange(2).expand(rows, 2), caches[0], kv_length=2)
            caches[1].copy_from(caches[0])
            ids = torch.randint(0, config.vocab_size, (rows, width), generator=generator)
            positions = torch.arange(2, 2 + width).repeat(rows, 1)
            mask = attention_mask_for(positions, 2 + width, config.sliding_window)
            if width == 1:
                got = compiled(ids, positions, mask, caches[0])
                want = model._decode_step(ids, positions, mask, caches[1])
            else:
                got = compiled.verify(ids, positions, mask, caches[0])
                want = model._verify_step(ids, positions, mask, caches[1])
            error = float((got - want).norm() / want.norm())
            if not error < 0.05:
                raise RuntimeError(f"its logits{' for a draft' if width > 1 else ''} differ from the eager "
                                   f"step's by {error:.1%}")


class CompiledDecode:
    """decode_logits' compiled step from the loaded packages: (input_ids, positions, mask, cache) -> logits, for
    up to max_rows rows (decode_logits decodes larger batches eagerly); and verify_logits' for up to max_draft
    tokens of one sequence."""

    max_rows = MAX_BATCH
    max_draft = MAX_DRAFT

    def __init__(self, model, folder: Path):
        tensors = {f"model.{name}": t for name, t in _named_tensors(model).items()}
        group_sizes = {m.group_size for m in model.modules() if isinstance(m, Int4Linear)}
        self.runners, self._bound = {}, []
        for graph in GRAPHS:
            loader = torch._C._aoti.AOTIModelPackageLoader(str(folder / f"{graph}.pt2"), "model", False, 1, -1)
            names = loader.get_constant_fqns()
            constants = {name: tensors[name] for name in names if name in tensors}
            unnamed = [name for name in names if name not in tensors]
            if unnamed:
                # The graph's only constants that are not the model's tensors are the int4 matmuls' group sizes
                # (AOTInductor's C shim takes them as 0-d tensors; see unsupported()). The build checked this
                # binding against the eager step; a load binds the same.
                if len(group_sizes) != 1:
                    raise ValueError(f"{len(unnamed)} constants of the compiled step are not the model's tensors")
                size = torch.tensor(next(iter(group_sizes)))
                constants.update({name: size for name in unnamed})
            # user_managed: the loader keeps pointers to these tensors, not copies (nor references: kept here)
            loader.load_constants(constants, False, True, True, False)
            self._bound.append(constants)
            self.runners[graph] = loader

    def __call__(self, input_ids, positions, mask, cache) -> torch.Tensor:
        rows = input_ids.shape[0]
        assert rows <= self.max_rows, rows
        keys, values = cache.keys, cache.values
        if keys[0].shape[0] != rows:  # the first rows of a larger cache (views)
            keys, values = [t[:rows] for t in keys], [t[:rows] for t in values]
        assert keys[0].dtype == torch.float32 and mask.dtype == torch.bool and input_ids.dtype == torch.long
        return self.runners["one" if rows == 1 else "batch"].boxed_run(
            [input_ids, positions, mask, *keys, *values])[0]

    def verify(self, input_ids, positions, mask, cache) -> torch.Tensor:
        """(S, V) logits after each of one sequence's 2..max_draft tokens (input_ids (1, S))."""
        assert input_ids.shape[0] == 1 and 2 <= input_ids.shape[1] <= self.max_draft, input_ids.shape
        keys, values = [t[:1] for t in cache.keys], [t[:1] for t in cache.values]
        assert keys[0].dtype == torch.float32 and mask.dtype == torch.bool and input_ids.dtype == torch.long
        return self.runners["draft"].boxed_run([input_ids, positions, mask, *keys, *values])[0]
