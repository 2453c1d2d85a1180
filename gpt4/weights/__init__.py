"""Where weights come from and go to: named models, Hugging Face folders (safetensors), GGUF files, the hub.

Every foreign tensor name is translated in this package (see names.py); the model only sees its own names.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import re
from pathlib import Path

import torch

from ..config import GPT4Config
from ..errors import ModelFileError, ModelNotFoundError
from . import names
from .gguf_file import INT4_TYPES, INT5_TYPES, INT6_TYPES, INT8_TYPES, GGUFFile, permute_for_rope

HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
_GPT2_BUFFERS = re.compile(r"(^|\.)attn\.(masked_)?bias$")  # causal-mask buffers in old GPT-2 checkpoints


# ------------------------------------------------------------------------------------------------------
# Resolution: name or path -> ("gguf", file) or ("hf", folder)
def resolve(name_or_path: str | os.PathLike, gguf_file: str | None = None, revision: str | None = None):
    from .. import models

    text = str(name_or_path)
    if models.lookup(text) is not None:
        return "gguf", models.resolve(text)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf" and not _has_gguf_magic(path):
                raise ModelFileError(f"{path} is a file but not a GGUF model; give a .gguf file or a folder "
                                     "with config.json and *.safetensors.")
            return "gguf", path
        if gguf_file:
            return "gguf", path / gguf_file
        if (path / "config.json").is_file():
            return "hf", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise ModelNotFoundError(f"{path} has no config.json (and not exactly one .gguf file); it is not a model "
                                 "folder.")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        return _from_hub(text, gguf_file, revision)
    raise ModelNotFoundError(f"{text!r} is neither a known model name ({', '.join(models.all_names())}), an "
                             "existing file or folder, nor a Hugging Face hub id (owner/name).")


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _from_hub(repo_id: str, gguf_file: str | None, revision: str | None):
    """Download (or reuse the local hub cache of) a repository; a clear error when offline."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ModelNotFoundError("Loading from the Hugging Face hub needs `pip install huggingface_hub`.") from e
    patterns = [gguf_file] if gguf_file else HUB_PATTERNS
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # network, auth and not-found errors come in many types; all mean the same here
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ModelNotFoundError(
            f"Could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {reason}). If you are offline, "
            "download the model elsewhere and pass its local folder or .gguf file instead.") from e
    if gguf_file:
        return "gguf", folder / gguf_file
    return "hf", folder


# ------------------------------------------------------------------------------------------------------
def load_config(name_or_path, gguf_file: str | None = None, revision: str | None = None, **_) -> GPT4Config:
    kind, path = resolve(name_or_path, gguf_file, revision)
    if kind == "gguf":
        return GGUFFile(path).config()
    return _hf_config(path)


def _hf_config(folder: Path) -> GPT4Config:
    try:
        hf = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{folder / 'config.json'} is not valid JSON ({e}).") from e
    try:
        return GPT4Config.from_hf_dict(hf)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{folder / 'config.json'} does not describe a supported model: {e}") from e


def _parse_dtype(dtype, device) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return choose_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(table)}.")
    return table[dtype]


def load_model(name_or_path, dtype=None, torch_dtype=None, device: str | torch.device = "cpu",
               gguf_file: str | None = None, revision: str | None = None, load_tokenizer: bool = True,
               quant: str = "none", compile: bool | str = False, **kwargs):
    """Build a GPT4LMHeadModel with the weights (and tokenizer) of a named model, folder, GGUF or hub id.

    dtype: float32 by default (what training wants); "auto" is bfloat16 where the CPU computes it natively (see
    choose_dtype), float32 elsewhere.
    quant="int8"|"int4"|"w8a8"|"w4a8" keeps the linear layers quantized (see gpt4.quant) for fast decoding;
    quant="auto" picks one of those from a GGUF's block formats (see choose_quant), "none" for other weights;
    compile=True compiles the decode step with torch.compile, compile="max-autotune" in that mode, compile="aot"
    ahead of time into packages cached on disk (see GPT4LMHeadModel.compile_decode and gpt4.aot).
    """
    from ..model import COMPILE_MODES
    from ..quant import QUANT_MODES

    if kwargs:
        raise TypeError(f"from_pretrained() got unexpected arguments: {', '.join(kwargs)}.")
    if quant not in ("auto", *QUANT_MODES):
        raise ValueError(f"Unknown quantization {quant!r}; choose one of {('auto', *QUANT_MODES)}.")
    if compile not in (False, True, None, *COMPILE_MODES):  # before the minutes of loading, not after
        raise ValueError(f"Unknown compile mode {compile!r}; pass True or one of {COMPILE_MODES}.")
    dtype = _parse_dtype(dtype if dtype is not None else torch_dtype, device)
    kind, path = resolve(name_or_path, gguf_file, revision)
    if torch.device(device).type == "cpu":
        reuse_freed_memory()
    with _garbage_collection_paused():
        return _load(kind, path, dtype, device, load_tokenizer, quant, compile)


def _load(kind, path, dtype, device, load_tokenizer, quant, compile):
    from ..generation import GenerationConfig
    from ..quant import INT4_MODES
    from ..tokenizer import Tokenizer

    gguf, placeholders = None, set()
    try:
        if kind == "gguf":
            gguf = GGUFFile(path)
            config = gguf.config()
            quant = choose_quant(gguf, device) if quant == "auto" else quant
            # Weights the quantized model takes straight from the file are shape-only placeholders here (the
            # whole model in full precision is never made: less memory and a faster load): int4 from Q4_0/Q4_1/Q4_K
            # layers, whose 4-bit groups are used as they are; int8 and w8a8 every linear layer, read and
            # quantized a transformer block at a time; and the token embedding, made int8 a slice of rows at a time.
            if quant != "none" and "token_embd.weight" in gguf.tensors:
                placeholders = {"token_embd.weight"}
            if quant in INT4_MODES:
                placeholders |= _linear_tensors(gguf, INT4_TYPES)
            if quant == "w4a8":  # and its layers in other block formats as 8-bit groups of 32 (see _w4a8_groups)
                placeholders |= _linear_tensors(gguf, _block_types(gguf))
            elif quant not in INT4_MODES and quant != "none":
                placeholders |= _linear_tensors(gguf)
            state = _gguf_state(gguf, config, dtype, placeholders=placeholders)
            has_vocab = gguf.get("tokenizer.ggml.model") is not None
            tokenizer = Tokenizer.from_gguf(gguf) if load_tokenizer and has_vocab else None
            gguf.drop_vocabulary()  # (the tokenizer holds what it needs)
        else:
            quant = "none" if quant == "auto" else quant
            config = _hf_config(path)
            state = _hf_state(path, config)
            tokenizer = Tokenizer.from_pretrained(path) if load_tokenizer and (path / "tokenizer.json").is_file() \
                else None
        model = build_model(config, state, dtype=dtype, device=device, source=str(path))
        del state  # the model holds the weights now: each is freed as its layer is quantized
        if quant != "none":
            from ..quant import BlockEmbedding, quantize_

            # Placeholder layers' tensors, read a transformer block at a time.
            layers = int8_layers = int5_layers = int6_layers = None
            if gguf is not None:
                linear = placeholders - {"token_embd.weight"}
                if quant in INT4_MODES:
                    four_bit = linear & _linear_tensors(gguf, INT4_TYPES)
                    layers = _GGUFBlockTensors(gguf, config, gguf.int4_groups, four_bit)
                    if quant == "w4a8":  # Q5_0 / Q5_K layers in 5-bit groups, Q6_K in 6, other formats in 8
                        five_bit = linear & _linear_tensors(gguf, INT5_TYPES)
                        six_bit = linear & _linear_tensors(gguf, INT6_TYPES)
                        int5_layers = _GGUFBlockTensors(gguf, config, gguf.int5_groups, five_bit)
                        int6_layers = _GGUFBlockTensors(gguf, config, gguf.int6_groups, six_bit)
                        int8_layers = _GGUFBlockTensors(gguf, config, lambda name: _w4a8_groups(gguf, name),
                                                        linear - four_bit - five_bit - six_bit)
                else:
                    layers = _GGUFBlockTensors(gguf, config, lambda name: gguf.tensor(name, dtype), linear)
            from_file = "token_embd.weight" in placeholders  # (only a GGUF load has placeholders)
            untied = model.lm_head.weight is not model.embed_tokens.weight
            blocks = from_file and gguf.tensors["token_embd.weight"].type_name not in FLOAT_TYPES
            rows = gguf.block_rows("token_embd.weight") if blocks and untied else None
            if rows is not None:  # a table only lookups read: as the file holds it (exact; no larger than 8-bit groups)
                table, decode = rows
                model.embed_tokens = BlockEmbedding(table, config.hidden_size, decode, dtype)
                from_file = False
            groups = None  # a Q8_0, Q5_0 or Q4_0 embedding's groups, exactly, read a slice of rows at a time
            if from_file and quant == "w4a8" and gguf.tensors["token_embd.weight"].type_name in INT8_TYPES:
                groups = functools.partial(gguf.int8_groups, "token_embd.weight")
            quantize_(model, quant, exact_int4=layers if quant in INT4_MODES else None, exact_int8=int8_layers,
                      exact_int5=int5_layers, exact_int6=int6_layers,
                      weights=None if quant in INT4_MODES else layers,
                      embedding_rows=gguf.row_reader("token_embd.weight", dtype) if from_file else None,
                      embedding_groups=groups)
        assert not any(t.is_meta for t in (*model.parameters(), *model.buffers())), "a placeholder was not replaced"
        return_freed_memory()
    finally:
        if gguf is not None:
            gguf.close()
    model.tokenizer = tokenizer
    model.source = path
    model.generation_config = GenerationConfig.for_model(config, tokenizer, path if kind == "hf" else None)
    if compile:
        model.compile_decode("default" if compile is True else compile)
    return model.eval()


def build_model(config: GPT4Config, state: dict[str, torch.Tensor], dtype=torch.float32, device="cpu",
                source: str = "checkpoint"):
    """Check `state` against the network `config` describes, then assign it (no random init, no copies)."""
    from ..model import GPT4LMHeadModel, rope_inverse_frequencies

    with torch.device("meta"), _initialisation_skipped():
        model = GPT4LMHeadModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        state.pop("lm_head.weight", None)  # some files store the tied head anyway
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs config {expected[k]}"
             for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(f"shape mismatches {wrong[:3]}{' ...' if len(wrong) > 3 else ''}")
        raise ModelFileError(f"The weights in {source} do not match its config: {'; '.join(parts)}. "
                             "The config and weight files come from different models, or the file is damaged.")
    # Placeholders (device "meta": layers about to be replaced by exact int4 ones) stay placeholders.
    state = {k: v.to(device=v.device if v.is_meta else device, dtype=dtype if v.is_floating_point() else v.dtype)
             for k, v in state.items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if config.position_embedding == "rope":
        model.register_buffer("rope_inv_freq", rope_inverse_frequencies(config).to(device), persistent=False)
    return model


@contextlib.contextmanager
def _garbage_collection_paused():
    """Loading makes ~100k lasting objects (the vocabulary and its merges) and no reference cycles. Left on, the
    cyclic collector sweeps every object of the process (torch's ~170k) as they pile up: the default model's merges
    took 120 ms to build instead of 20."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def _initialisation_skipped():
    """Random initialisation is wasted on weights about to be replaced, and on "meta" tensors torch runs it
    through Python reference kernels that import torch._dynamo: 1.6 s of a 2.5 s load (transformers' loaders
    skip it the same way)."""
    names_ = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_")
    saved = {name: getattr(torch.nn.init, name) for name in names_}
    for name in names_:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _gguf_state(gguf: GGUFFile, config: GPT4Config, dtype=torch.float32,
                placeholders=()) -> dict[str, torch.Tensor]:
    """Our state dict from a GGUF file; tensors named in `placeholders` are shape-only (device "meta")."""
    from tqdm import tqdm

    state = {}
    permuted = gguf.architecture in ("llama", "mistral")  # llama.cpp reorders q/k rows for these only
    tensors = [n for n in gguf.tensors if n not in names.GGUF_IGNORED]
    for foreign in tqdm(tensors, desc="loading", unit="tensor", leave=False, disable=None if len(tensors) >= 200 else True):
        ours = names.rename(foreign, names.GGUF)
        if ours is None:
            raise ModelFileError(f"{gguf.path}: tensor {foreign!r} is not part of a {gguf.architecture} model "
                                 "this package knows.")
        if foreign in placeholders:
            t = torch.empty(gguf.tensors[foreign].shape, dtype=dtype, device="meta")
        else:
            t = gguf.tensor(foreign, dtype)  # straight to dtype: a bf16 load never holds the model in fp32
        if permuted and ours.endswith("attn.q_proj.weight"):
            t = permute_for_rope(t, config.num_attention_heads)
        elif permuted and ours.endswith("attn.k_proj.weight"):
            t = permute_for_rope(t, config.num_key_value_heads)
        state[ours] = t
    return names.fuse(state)


FLOAT_TYPES = ("F32", "F16", "BF16", "F64")  # the GGUF types that are not block formats
# The linear layers int4 can take straight from a file's 4-bit groups (fused names, as the model has them).
_LINEAR_WEIGHTS = ("qkv_proj.weight", "o_proj.weight", "up_proj.weight", "down_proj.weight", "lm_head.weight")


def _block_of(name: str) -> str:
    """'layers.3.' for anything in transformer block 3, else the top-level module ('lm_head', 'embed_tokens')."""
    return ".".join(name.split(".")[:2]) + "." if name.startswith("layers.") else name.split(".")[0]


class _GGUFBlockTensors:
    """{linear module name: read(file tensor name)} for the GGUF linear-layer tensors named in `tensors` (the
    load's placeholders), permuted and fused like the weights, read one transformer block at a time (only one
    block's tensors exist at once). `read` returns a tensor or a tuple of tensors (each permuted and fused alike).

    With GGUFFile.int4_groups (nibbles, scale, zero): Q4_0 / Q4_1 / Q4_K blocks are affine int4 groups of 32, and
    the int4 layers take them as they are instead of re-quantizing a dequantized copy (a second rounding). With
    GGUFFile.tensor: the full-precision weights, for int8 layers quantized as they are read.
    """

    def __init__(self, gguf: GGUFFile, config: GPT4Config, read, tensors: set[str]):
        self.gguf, self.config, self.read = gguf, config, read
        self.tensors_of_block: dict[str, list[tuple[str, str]]] = {}  # block -> [(file name, our name)]
        for foreign in gguf.tensors:  # in the file's order
            if foreign in tensors:
                ours = names.rename(foreign, names.GGUF)
                self.tensors_of_block.setdefault(_block_of(ours), []).append((foreign, ours))
        self.block, self.values = None, {}

    def get(self, module: str):
        if _block_of(module) != self.block:
            self.block, self.values = None, {}  # the previous block's tensors are freed before the next is read
            self.values = self._read(self.tensors_of_block.get(_block_of(module), []))
            self.block = _block_of(module)
        return self.values.get(module)

    def _read(self, tensors: list[tuple[str, str]]) -> dict:
        parts: list[dict[str, torch.Tensor]] = []  # one {our name: tensor} per element of what read returns
        single = True
        permuted = self.gguf.architecture in ("llama", "mistral")
        for foreign, ours in tensors:
            value = self.read(foreign)
            assert value is not None, f"{foreign} was made a placeholder, and its reader cannot give it"
            single = isinstance(value, torch.Tensor)
            for i, t in enumerate((value,) if single else value):
                if permuted and ours.endswith("attn.q_proj.weight"):
                    t = permute_for_rope(t, self.config.num_attention_heads)
                elif permuted and ours.endswith("attn.k_proj.weight"):
                    t = permute_for_rope(t, self.config.num_key_value_heads)
                if i == len(parts):
                    parts.append({})
                parts[i][ours] = t
        fused = [names.fuse(d) for d in parts]
        return {name.removesuffix(".weight"): fused[0][name] if single else tuple(f[name] for f in fused)
                for name in (fused[0] if fused else ()) if name.endswith(_LINEAR_WEIGHTS)}


def choose_quant(gguf: GGUFFile, device) -> str:
    """quant="auto", on a CPU whose PyTorch has AVX2 / AVX-512 kernels, by the types of the file's block layers:
    - every linear layer Q4_0 / Q4_1 / Q4_K: the file's own 4-bit groups (the weights llama.cpp runs; only Q4_K's
      sub-block scales rounded, to float16), "w4a8" where its kernel runs (AVX-512 VNNI or AVX2, and a C++ toolchain:
      gpt4.kernels.w4a8_ready), "int4" elsewhere;
    - every linear layer in a block format of at most 8 bits (Q8_0, Q5_0, K-quants, ...): "w4a8" where its kernel
      runs, its Q4_0 / Q4_1 / Q4_K layers in 4 bits, Q5_0 / Q5_K layers in 5, Q6_K in 6, and the others in 8-bit
      groups of 32 (Q8_0 and Q4_0 exactly, the others rounded to 8 bits once more); "int8" elsewhere, one more
      rounding, to 8 bits a row;
    - otherwise (F32 / F16 / BF16 layers) "none", the file's precision, as on other CPUs: without vector kernels
      ("default" capability, e.g. other architectures) PyTorch's int4 kernel decodes 5x slower than "none".

    Measured (fp32 activations, AMX Xeon; docs/performance.md, "Defaults"): the default model (Q4_1) with int4
    decodes 33 -> 59 tokens/s in 960 -> 427 MB, perplexity 11.815 -> 11.827; Qwen2.5-Coder-0.5B (Q4_K_M: Q5_0,
    Q8_0, Q4_K, Q6_K) with int8 14 -> 27 tokens/s in 2934 -> 1253 MB, perplexity 8.118 -> 8.150. With kernels
    limited to AVX2 (and no VNNI for int8): int4 1.6x and int8 1.4x "none"'s decoding speed. bf16 on the AMX Xeon
    (run 19): Qwen with w4a8 decodes 51-56 tokens/s against int8's 24-29, perplexity 11.379 against 11.369 (fp32
    11.333), peak 1091 against 1113 MB.
    """
    if torch.device(device).type != "cpu" or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "none"
    block_layers = {name for name in _linear_tensors(gguf) if name.startswith("blk.")}  # (the head stays int8)
    if not block_layers:
        return "none"
    if block_layers <= _linear_tensors(gguf, INT4_TYPES):
        from ..kernels import w4a8_ready

        return "w4a8" if w4a8_ready() else "int4"
    if any(gguf.tensors[name].type_name in FLOAT_TYPES for name in block_layers):
        return "none"
    from ..kernels import w4a8_ready

    return "w4a8" if w4a8_ready() else "int8"


def _block_types(gguf: GGUFFile) -> set[str]:
    """The file's tensor types that are block formats (every one but the plain floats)."""
    return {info.type_name for info in gguf.tensors.values()} - set(FLOAT_TYPES)


def _w4a8_groups(gguf: GGUFFile, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w4a8's 8-bit groups of 32 (q, d) for a matrix of a layer that the file does not hold wholly in 4-bit groups
    (INT4_TYPES) or wholly in 5-bit or 6-bit ones (INT5_TYPES, INT6_TYPES; its q, k and v, or gate and up, are one
    layer here): Q8_0's, Q5_0's and Q4_0's exactly, others (Q6_K beside another type, Q5_1, Q3_K, ...) quantized as
    llama.cpp quantizes Q8_0 from their values (a rounding to 8 bits of weights rounded to 3-6 before), against scales
    rounded to float16 first."""
    from ..quant import Q8Linear

    groups = gguf.int8_groups(name)
    if groups is not None:
        return groups
    return Q8Linear.quantize(gguf.row_reader(name, torch.float32), float16_scales=True)  # a slice of rows at a time


def choose_dtype(device) -> torch.dtype:
    """dtype="auto": bfloat16 on a CPU with AMX or AVX512-BF16 (and PyTorch's AVX-512 kernels), whose matmul and
    attention kernels compute bf16 natively; float32 on other CPUs, where bf16 is converted in software, and on
    other devices.

    Measured on the AMX Xeon (docs/performance.md, "Defaults"), the default model with int4 layers: a 512-token
    prompt 1389 -> 2203 tokens/s, decoding unchanged (63 -> 64 tokens/s), perplexity 11.827 -> 11.819; without
    quantization, prefill 984 -> 3068 tokens/s in 929 -> 602 MB, perplexity 11.815 -> 11.830.
    """
    if torch.device(device).type != "cpu" or torch.backends.cpu.get_cpu_capability() != "AVX512":
        return torch.float32
    from ..quant import bf16_matmul_is_native

    return torch.bfloat16 if bf16_matmul_is_native() else torch.float32


def _linear_tensors(gguf: GGUFFile, types=None) -> set[str]:
    """GGUF names of the linear layers' weights; with `types`, of the layers every part of which (q, k, v; gate,
    up) is of one of those types (the layers int4 loading takes as exact 4-bit groups)."""
    layers: dict[str, list[str]] = {}
    for foreign in gguf.tensors:
        ours = names.rename(foreign, names.GGUF) or ""
        layer = re.sub(r"attn\.[qkv]_proj", "attn.qkv_proj", ours).replace("mlp.gate_proj", "mlp.up_proj")
        if layer.endswith(_LINEAR_WEIGHTS):
            layers.setdefault(layer, []).append(foreign)
    return {foreign for parts in layers.values() if types is None or all(gguf.tensors[f].type_name in types
                                                                         for f in parts)
            for foreign in parts}


def return_freed_memory() -> None:
    """Hand freed memory back to the OS: glibc keeps large freed blocks otherwise, wherever a live block sits
    above them in its heap. Called after loading (its temporaries: fp32 dequantization, replaced full-precision
    weights; the default model's int4 load was resident at 1.0 GB without this, 0.54 GB with it) and by the
    server's engine when it goes idle (its KV cache)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def reuse_freed_memory() -> bool:
    """Have glibc serve allocations of up to 32 MB from its heap and keep up to 64 MB freed at its top, once per
    process (returns whether it did): a prompt's matmuls then reuse the pages of the previous layer's dequantized
    weights and activations instead of mapping fresh ones. By default glibc maps each large block anew, faulted in
    and zeroed page by page, until a free raises its threshold, and hands freed memory back above a threshold twice
    that: the default model's 512-token prefill made ~900 MB of such allocations and took 200-210 ms, bimodally 168;
    with these settings 138-143 ms (2.4k -> 3.7k tokens/s through the benchmark's work), its peak memory the same
    (405-416 MB: the prefill's working set sets it either way). Where the user set glibc's malloc tunables
    (GLIBC_TUNABLES, MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_), or the C library is not glibc, nothing is
    changed. return_freed_memory still hands everything freed back (after a load; the server when idle)."""
    chosen = "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(
        name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
    libc = _libc()
    if chosen or libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20))


@functools.cache
def _libc():
    """The C library, found once (find_library takes ~1.4 ms)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{path} is not a readable safetensors file ({e}); the file is truncated or "
                             "corrupted: download or save it again.") from e


def _hf_state(folder: Path, config: GPT4Config) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        raw = _read_safetensors(folder / "model.safetensors")
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ModelFileError(f"{index} is not a valid safetensors index ({e}).") from e
        raw = {}
        for shard in shards:
            if not (folder / shard).is_file():
                raise ModelFileError(f"{index} lists shard {shard!r}, which is missing from {folder}.")
            raw.update(_read_safetensors(folder / shard))
    elif (folder / "pytorch_model.bin").is_file():
        raw = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ModelFileError(f"{folder} has config.json but no model.safetensors, sharded index or "
                             "pytorch_model.bin.")
    gpt2 = config.model_type == "gpt2"
    table = names.HF_GPT2 if gpt2 else names.HF_LLAMA
    state = {}
    for foreign, t in raw.items():
        if gpt2 and not foreign.startswith(("transformer.", "lm_head.")):
            foreign = "transformer." + foreign  # the original GPT-2 files omit the prefix
        if (gpt2 and _GPT2_BUFFERS.search(foreign)) or foreign.endswith("rotary_emb.inv_freq"):
            continue  # buffers, not weights
        ours = names.rename(foreign, table)
        if ours is None:
            raise ModelFileError(f"{folder}: tensor {foreign!r} is not part of a {config.model_type} model.")
        state[ours] = t.t() if gpt2 and names.GPT2_TRANSPOSED.fullmatch(ours) else t
    return names.fuse(state)


# ------------------------------------------------------------------------------------------------------
def save_model(model, directory: str | os.PathLike, max_shard_size: int | None = None, **_) -> None:
    """config.json + model.safetensors (sharded above max_shard_size bytes) + tokenizer, in HF names."""
    from safetensors.torch import save_file

    config = model.config
    config.check_supported_by_hf()
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    gpt2 = config.model_type == "gpt2"
    table = names.HF_GPT2 if gpt2 else names.HF_LLAMA
    q_out, kv_out = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    state = names.unfuse(model.state_dict(), (q_out, kv_out, kv_out), gated=config.mlp == "swiglu",
                         keep_qkv_fused=gpt2)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    out = {}
    for ours, t in state.items():
        t = t.t() if gpt2 and names.GPT2_TRANSPOSED.fullmatch(ours) else t
        out[names.foreign_name(ours, table)] = t.detach().to("cpu").contiguous().clone()
    shards = _shard(out, max_shard_size)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in out.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    hf = config.to_hf_dict()
    hf["torch_dtype"] = hf["dtype"] = str(model.dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(folder)


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [tensors]
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    return shards + [current]
