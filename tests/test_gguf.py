"""GGUF loading: every common tensor type and both architectures agree with transformers' own GGUF loader."""

import pytest
import torch

from gpt4 import GPT4LMHeadModel

from .conftest import skip_without_w4a8
from .gguf_builder import write_tiny_gguf

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to read GGUF

QTYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def _compare(path):
    ours = GPT4LMHeadModel.from_pretrained(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)
    return ours


@pytest.mark.parametrize("qtype", QTYPES)
def test_llama_gguf_of_each_tensor_type_matches_transformers(qtype, tmp_path):
    _compare(write_tiny_gguf(tmp_path / f"tiny-{qtype}.gguf", qtype=qtype, seed=QTYPES.index(qtype)))


def test_qwen2_gguf_with_biases_matches_transformers(tmp_path):
    model = _compare(write_tiny_gguf(tmp_path / "tiny-qwen2.gguf", qtype="Q8_0", arch="qwen2"))
    assert model.config.model_type == "qwen2" and model.config.attention_bias


def test_tied_gguf_shares_embedding_and_head(tmp_path):
    model = _compare(write_tiny_gguf(tmp_path / "tiny-tied.gguf", qtype="Q4_K", tied=True))
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.embed_tokens.weight


def test_gguf_without_vocabulary_loads_without_tokenizer(tmp_path):
    model = GPT4LMHeadModel.from_pretrained(write_tiny_gguf(tmp_path / "bare.gguf", with_tokenizer=False))
    assert model.tokenizer is None


def test_gguf_model_saves_to_a_folder_transformers_loads(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", qtype="Q6_K")
    ours = GPT4LMHeadModel.from_pretrained(path)
    ours.save_pretrained(tmp_path / "saved")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    again = GPT4LMHeadModel.from_pretrained(tmp_path / "saved")
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(again(ids).logits, ours(ids).logits)
    assert again.tokenizer.encode("héllo") == ours.tokenizer.encode("héllo")


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_4bit_blocks_become_int4_groups_exactly(qtype, tmp_path):
    from gguf import GGMLQuantizationType, quants

    from gpt4.quant import Int4Linear, unpack_block_nibbles
    from gpt4.weights.gguf_file import GGUFFile

    path = write_tiny_gguf(tmp_path / f"tiny-{qtype}.gguf", qtype=qtype)
    gguf = GGUFFile(path)
    checked = 0
    for name, info in gguf.tensors.items():
        groups = gguf.int4_groups(name)
        if info.type_name != qtype:
            assert groups is None
            continue
        nibbles, scale, zero = groups  # w = (q - 8) * scale + zero, groups of 32 along the input dimension
        q = unpack_block_nibbles(nibbles.reshape(nibbles.shape[0], -1))
        rows, cols = q.shape
        w = (q.float().reshape(rows, cols // 32, 32) - 8) * scale[..., None] + zero[..., None]
        reference = quants.dequantize(gguf._read(info.offset, info.n_bytes).reshape(rows, -1),
                                      GGMLQuantizationType[qtype])  # the gguf package's decoder
        torch.testing.assert_close(w.reshape(rows, cols), torch.from_numpy(reference), atol=1e-6, rtol=1e-6)
        checked += 1
    gguf.close()
    assert checked >= 7
    # Loaded with --quant int4, every linear takes those groups: its output is the dequantized matmul,
    # up to bf16 activations and scales, with no second rounding of the weights.
    exact = GPT4LMHeadModel.from_pretrained(path)
    int4 = GPT4LMHeadModel.from_pretrained(path, quant="int4")
    layer = int4.layers[0].attn.qkv_proj
    assert isinstance(layer, Int4Linear)
    x = torch.randn(3, layer.in_features)
    want = torch.nn.functional.linear(x.bfloat16().float(), exact.layers[0].attn.qkv_proj.weight)
    # (the bf16 rounding is relative: Q4_K's random 6-bit sub-block scales make this file's weights 60x Q4_1's)
    torch.testing.assert_close(layer(x).float(), want, atol=0.01 * want.abs().max().item(), rtol=0.02)
    # The 4-bit layers were loaded without full-precision copies; the whole model still computes the same thing.
    ids = torch.tensor([[3, 70, 12, 250, 9]])
    with torch.no_grad():
        a, b = exact(ids).logits[0], int4(ids).logits[0].float()
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99


def test_int4_loading_skips_full_precision_only_for_layers_entirely_in_4_bits(tmp_path):
    import dataclasses

    from gpt4.weights import _linear_tensors
    from gpt4.weights.gguf_file import INT4_TYPES
    from gpt4.weights.gguf_file import GGUFFile

    gguf = GGUFFile(write_tiny_gguf(tmp_path / "tiny.gguf", qtype="Q4_0"))
    qkv = {f"blk.0.attn_{p}.weight" for p in "qkv"}
    everything = _linear_tensors(gguf, INT4_TYPES)
    assert qkv | {"blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.1.ffn_down.weight"} <= everything
    assert "token_embd.weight" not in everything  # a lookup table, not a linear layer
    # One part of a fused layer in another type: that layer needs real weights for all its parts.
    v = gguf.tensors["blk.0.attn_v.weight"]
    gguf.tensors["blk.0.attn_v.weight"] = dataclasses.replace(v, type_name="Q8_0")
    mixed = _linear_tensors(gguf, INT4_TYPES)
    gguf.close()
    assert not qkv & mixed and {"blk.0.attn_output.weight", "blk.1.attn_q.weight"} <= mixed


@pytest.mark.parametrize("mode,tied", [("int4", True), ("int4", False), ("int8", False), ("w8a8", True)])
def test_quantized_loads_read_the_embedding_from_the_file_as_the_full_table_would_give_it(mode, tied, tmp_path,
                                                                                          monkeypatch):
    from gpt4 import quant
    from gpt4.quant import quantize_

    path = write_tiny_gguf(tmp_path / "tiny.gguf", qtype="Q8_0", tied=tied)
    monkeypatch.setattr(quant, "QUANTIZE_ROWS", 7)  # the embedding read and quantized a few rows at a time
    loaded = GPT4LMHeadModel.from_pretrained(path, dtype="bfloat16", quant=mode)
    # The reference: the whole table dequantized to bf16 first, then quantized.
    reference = quantize_(GPT4LMHeadModel.from_pretrained(path, dtype="bfloat16"), mode)
    if not tied:  # a table only lookups read stays in the file's blocks, in every mode: the file's values
        assert type(loaded.embed_tokens) is quant.BlockEmbedding
        ids = torch.tensor([[0, 7, 255]])
        assert torch.equal(loaded.embed_tokens(ids), GPT4LMHeadModel.from_pretrained(path).embed_tokens(ids).bfloat16())
    else:
        assert loaded.lm_head.weight_int8 is loaded.embed_tokens.weight_int8
    for module in ("embed_tokens", "lm_head") if tied else ("lm_head",):
        mine, theirs = getattr(loaded, module).state_dict(), getattr(reference, module).state_dict()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.parametrize("mode", ["int8", "w8a8"])
@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False)])  # q/k rows permuted
def test_int8_loads_quantize_each_layer_as_read_from_the_file_as_the_full_model_would_give_it(mode, arch, tied,
                                                                                              tmp_path):
    from gpt4.quant import Int4Linear, Int8Linear, quantize_

    path = write_tiny_gguf(tmp_path / "tiny.gguf", qtype="Q4_1", arch=arch, tied=tied)
    loaded = GPT4LMHeadModel.from_pretrained(path, dtype="bfloat16", quant=mode)
    reference = quantize_(GPT4LMHeadModel.from_pretrained(path, dtype="bfloat16"), mode)  # all of it in bf16 first
    mine, theirs = dict(loaded.named_modules()), dict(reference.named_modules())
    assert mine.keys() == theirs.keys()
    linears = [name for name, m in mine.items() if isinstance(m, Int8Linear)]
    assert len(linears) == 4 * 2 + 1 and not any(isinstance(m, Int4Linear) for m in mine.values())
    for name in linears:  # the weights, also where only a packed copy holds them
        assert torch.equal(mine[name].dequantized(), theirs[name].dequantized()), name
    # (an untied embedding stays in the file's blocks: see the test above)
    state, want = ({k: v for k, v in m.state_dict().items() if tied or not k.startswith("embed_tokens.")}
                   for m in (loaded, reference))
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in state)


@pytest.mark.parametrize("qtype", ["BF16", "Q8_0", "Q4_1", "Q4_K"])  # the torch and the numpy dequantizers
def test_tensors_dequantize_the_same_a_row_at_a_time_and_straight_to_bf16(qtype, tmp_path, monkeypatch):
    from gpt4.weights import gguf_file

    gguf = gguf_file.GGUFFile(write_tiny_gguf(tmp_path / f"tiny-{qtype}.gguf", qtype=qtype))
    whole = {name: gguf.tensor(name) for name in gguf.tensors}  # the tiny matrices fit in one slice
    monkeypatch.setattr(gguf_file, "_DEQUANT_CHUNK", 1)  # now one row per slice
    for name, want in whole.items():
        torch.testing.assert_close(gguf.tensor(name), want, atol=0, rtol=0)
        torch.testing.assert_close(gguf.tensor(name, torch.bfloat16), want.bfloat16(), atol=0, rtol=0)
    assert any(gguf.tensors[name].type_name == qtype for name in whole)
    gguf.close()


def test_our_ggml_type_table_agrees_with_the_gguf_package():
    import gguf

    from gpt4.weights.gguf_file import GGML_TYPES, ggml_type

    for type_id, (name, block_values, block_bytes) in GGML_TYPES.items():
        kind = gguf.GGMLQuantizationType(type_id)
        assert (kind.name, *gguf.GGML_QUANT_SIZES[kind]) == (name, block_values, block_bytes)
    newer = [kind for kind in gguf.GGML_QUANT_SIZES if kind.value not in GGML_TYPES]
    for kind in newer:  # types added to ggml after our table: still known, through the package
        assert ggml_type(kind.value) == (kind.name, *gguf.GGML_QUANT_SIZES[kind])
    assert ggml_type(977) is None


def test_loading_pauses_the_garbage_collector_and_leaves_it_as_it_was(tmp_path, monkeypatch):
    import gc

    from gpt4.errors import ModelFileError
    from gpt4.weights import gguf_file

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    seen = []
    parse = gguf_file._parse
    monkeypatch.setattr(gguf_file, "_parse", lambda *a: seen.append(gc.isenabled()) or parse(*a))
    assert gc.isenabled()
    GPT4LMHeadModel.from_pretrained(path)
    assert seen == [False] and gc.isenabled()
    (tmp_path / "broken.gguf").write_bytes(path.read_bytes()[:300])
    with pytest.raises(ModelFileError):
        GPT4LMHeadModel.from_pretrained(tmp_path / "broken.gguf")
    assert gc.isenabled()  # a failed load too
    gc.disable()
    try:
        GPT4LMHeadModel.from_pretrained(path)
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()


@pytest.mark.parametrize("with_nul", [False, True])  # a NUL byte inside a string: each string decoded alone
def test_string_arrays_decode_as_each_string_alone_would(with_nul, tmp_path):
    """The parser decodes a string array in one piece, split at its lengths: the same strings as decoding each
    alone, for empty strings, multi-byte characters, invalid UTF-8 (a cut character, a stray byte) and lengths
    of 256 and more (a second length byte)."""
    import gguf

    from gpt4.weights.gguf_file import GGUFFile

    values = [b"", b"a", "Ġthe".encode(), "日本語".encode(), "日本".encode()[:4], b"\xff\xfeab", b"", b"x" * 300,
              "ü".encode()[:1], b"end"] + ([b"a\x00b", b"\x00"] if with_nul else [])
    path = tmp_path / "strings.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("test.strings", values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    file = GGUFFile(path)
    try:
        assert file.get("test.strings") == [v.decode("utf-8", "replace") for v in values]
    finally:
        file.close()


def test_auto_quant_keeps_4_bit_files_in_their_own_groups_and_other_quantized_files_in_8_bits(tmp_path, monkeypatch):
    import dataclasses

    from gpt4 import kernels
    from gpt4.quant import Int4Linear, Int8Linear, Q6Linear, Q8Linear, W4A8Linear
    from gpt4.weights import choose_quant
    from gpt4.weights.gguf_file import GGUFFile

    ids = torch.tensor([[3, 70, 12, 250, 9]])
    ready = kernels.w4a8_ready()  # our kernel if it runs: 4-bit groups as they are, the other formats in 8-bit groups
    int4, int4_layer = ("w4a8", W4A8Linear) if ready else ("int4", Int4Linear)
    int8, int8_layer = ("w4a8", Q8Linear) if ready else ("int8", Int8Linear)
    for qtype, mode, layer in (("Q4_0", int4, int4_layer), ("Q4_1", int4, int4_layer),
                               ("Q4_K", int4, int4_layer),  # (its sub-blocks of 32 are 4-bit groups)
                               ("Q8_0", int8, int8_layer),  # int4 would round these a second time, to fewer bits
                               ("Q6_K", int8, Q6Linear if ready else Int8Linear),  # (w4a8: its 6-bit groups)
                               ("F32", "none", torch.nn.Linear), ("F16", "none", torch.nn.Linear)):
        path = write_tiny_gguf(tmp_path / f"tiny-{qtype}.gguf", qtype=qtype)
        auto = GPT4LMHeadModel.from_pretrained(path, quant="auto")
        assert auto.quant == mode and type(auto.layers[1].mlp.down_proj) is layer, qtype
        with torch.no_grad():  # the same model as asking for that mode
            assert torch.equal(auto(ids).logits, GPT4LMHeadModel.from_pretrained(path, quant=mode)(ids).logits)

    gguf = GGUFFile(tmp_path / "tiny-Q4_1.gguf")
    assert choose_quant(gguf, "cpu") == int4
    down = gguf.tensors["blk.1.ffn_down.weight"]
    gguf.tensors["blk.1.ffn_down.weight"] = dataclasses.replace(down, type_name="Q6_K")  # a Q4_K_M file's mix
    assert choose_quant(gguf, "cpu") == int8
    gguf.tensors["blk.1.ffn_down.weight"] = down
    monkeypatch.setattr(kernels, "w4a8_ready", lambda: False)  # no AVX-512 VNNI, no toolchain, a failed build
    assert choose_quant(gguf, "cpu") == "int4"
    for other, mode in (("Q6_K", "int8"), ("F16", "none")):  # one layer of another type decides
        gguf.tensors["blk.1.ffn_down.weight"] = dataclasses.replace(down, type_name=other)
        assert choose_quant(gguf, "cpu") == mode, other
    gguf.tensors["blk.1.ffn_down.weight"] = down
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")  # no vectorized kernels
    assert choose_quant(gguf, "cpu") == "none"
    gguf.close()

    folder = tmp_path / "saved"
    GPT4LMHeadModel.from_pretrained(tmp_path / "tiny-Q4_1.gguf").save_pretrained(folder)
    assert GPT4LMHeadModel.from_pretrained(folder, quant="auto").quant == "none"  # float weights: kept as they are


def test_an_unknown_quantization_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="Unknown quantization 'int3'.*auto"):
        GPT4LMHeadModel.from_pretrained(tmp_path / "not-even-there.gguf", quant="int3")


def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it_natively(tmp_path, monkeypatch):
    from gpt4.weights import choose_dtype

    path = write_tiny_gguf(tmp_path / "tiny.gguf", qtype="Q8_0")
    # (CPU, ATen capability, AMX, AVX512-BF16) -> the dtype "auto" picks
    for capability, amx, avx512_bf16, expected in (("AVX512", True, True, torch.bfloat16),  # Sapphire Rapids
                                                   ("AVX512", False, True, torch.bfloat16),  # Zen 4, Cooper Lake
                                                   ("AVX512", False, False, torch.float32),  # Skylake-SP
                                                   ("AVX2", True, True, torch.float32),  # kernels limited to AVX2
                                                   ("DEFAULT", False, False, torch.float32)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        assert choose_dtype("cpu") == expected, (capability, amx, avx512_bf16)
        model = GPT4LMHeadModel.from_pretrained(path, dtype="auto", quant="auto")
        assert model.dtype == expected, (capability, amx, avx512_bf16)
        assert GPT4LMHeadModel.from_pretrained(path).dtype == torch.float32  # the default stays float32
    assert choose_dtype("meta") == torch.float32  # other devices: float32, as before


@pytest.mark.parametrize("qtype,width,scale_fields", [
    ("Q8_0", 34, [0]), ("Q4_0", 18, [0]), ("Q4_1", 20, [0, 2]), ("Q5_0", 22, [0]), ("Q5_1", 24, [0, 2]),
    ("Q4_K", 144, [0, 2]), ("Q5_K", 176, [0, 2]), ("Q6_K", 210, [208])])
def test_torch_block_decoders_equal_the_gguf_packages_bit_for_bit(qtype, width, scale_fields):
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    from gpt4.weights.gguf_file import _TORCH_DEQUANT

    rng = np.random.default_rng(width)
    blocks = rng.integers(0, 256, (512, width), dtype=np.uint8)  # every bit pattern of the quantized values
    for at in scale_fields:  # finite fp16 scales (random bytes would include NaN and inf)
        blocks[:, at:at + 2] = (rng.standard_normal(512) * 0.01).astype(np.float16).view(np.uint8).reshape(512, 2)
    reference = torch.from_numpy(quants.dequantize(blocks, GGMLQuantizationType[qtype]).reshape(-1))
    assert torch.equal(_TORCH_DEQUANT[qtype](torch.from_numpy(blocks.reshape(-1))), reference)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q3_K"])
def test_w4a8_holds_other_block_formats_in_8_bit_groups_and_decodes_them_fused(qtype, tmp_path):
    """w4a8 on a file whose layers are not 4-bit groups (a Q4_K_M file holds Q5_0, Q8_0, Q6_K besides Q4_K): Q5_0's
    groups as they are (Q5Linear) and Q8_0's (Q8Linear), bit for bit; other formats (Q3_K) rounded once more, to 8
    bits against float16 scales; every layer in our kernels, so decode steps run fused, with the eager layers' tokens.
    An untied embedding stays in the file's blocks where our decoders read them (BlockEmbedding: not Q3_K's)."""
    skip_without_w4a8()
    from gpt4.quant import BlockEmbedding, Q5Linear, Q8Embedding, Q8Linear
    from gpt4.weights.gguf_file import GGUFFile

    path = write_tiny_gguf(tmp_path / f"tiny-{qtype}.gguf", qtype=qtype, arch="qwen2")  # (no rope permutation)
    model = GPT4LMHeadModel.from_pretrained(path, dtype="bfloat16", quant="w4a8")
    layers = [m for layer in model.layers for m in (layer.attn.qkv_proj, layer.attn.o_proj, layer.mlp.up_proj,
                                                    layer.mlp.down_proj)]
    kind = Q5Linear if qtype == "Q5_0" else Q8Linear  # Q5_0 in its own 5-bit groups
    assert all(type(m) is kind for m in [*layers, model.lm_head])
    assert type(model.embed_tokens) is (Q8Embedding if qtype == "Q3_K" else BlockEmbedding)
    gguf = GGUFFile(path)
    try:
        for ours, theirs in ((model.layers[1].mlp.down_proj, "blk.1.ffn_down.weight"),
                             (model.lm_head, "output.weight")):
            weight = getattr(torch.ops.gpt4_kernels, f"{ours.kind}_dequantize")(ours.blocks, torch.float32).t()
            file = gguf.tensor(theirs, torch.float32)
            if qtype in ("Q8_0", "Q5_0"):
                assert torch.equal(weight, file), theirs
            else:  # within half a step of each group's 8-bit grid
                step = file.unflatten(1, (-1, 32)).abs().amax(-1, keepdim=True) / 127
                assert ((weight - file).unflatten(1, (-1, 32)).abs() <= step * 0.51 + 1e-7).all(), theirs
        if qtype != "Q3_K":  # the file's values, rounded once to bf16
            ids = torch.tensor([[0, 5], [255, 5]])
            assert torch.equal(model.embed_tokens(ids), gguf.tensor("token_embd.weight", torch.float32)[ids].bfloat16())
    finally:
        gguf.close()
    assert model._fused_decode is not None
    prompt = torch.tensor([[3, 70, 12, 250, 9]])
    fused = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
    model.use_fused_decode(False)
    assert torch.equal(fused, model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None))


def test_a_load_drops_the_vocabulary_arrays_once_the_tokenizer_has_them(tmp_path):
    from gpt4.weights.gguf_file import GGUFFile

    gguf = GGUFFile(write_tiny_gguf(tmp_path / "tiny.gguf"))
    try:
        assert len(gguf.get("tokenizer.ggml.tokens")) == 256  # (the tiny vocabulary: bytes, no merges)
        gguf.drop_vocabulary()
        assert gguf.get("tokenizer.ggml.tokens") is None and gguf.get("tokenizer.ggml.merges") is None
        assert gguf.get("tokenizer.ggml.token_type") is None
        assert gguf.get("tokenizer.ggml.model") == "gpt2" and gguf.get("tokenizer.ggml.eos_token_id") is not None
        assert gguf.get("general.architecture") == "llama"
    finally:
        gguf.close()


@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_K", "Q4_K"])
def test_5_bit_groups_hold_q5_0_and_q5_k_blocks_as_the_file_does(qtype, tmp_path):
    """GGUFFile.int5_groups: (nibbles, fifth, d, m), w = d (nibble + 16 fifth bit) + m, the gguf package's values;
    None for other formats."""
    from gguf import GGMLQuantizationType, quants

    from gpt4.quant import unpack_bits, unpack_block_nibbles
    from gpt4.weights.gguf_file import GGUFFile

    gguf = GGUFFile(write_tiny_gguf(tmp_path / f"tiny-{qtype}.gguf", qtype=qtype))
    try:
        for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight"):
            groups = gguf.int5_groups(name)
            if qtype == "Q4_K":
                assert groups is None
                continue
            nibbles, fifth, d, m = groups
            rows, count = d.shape
            q = unpack_block_nibbles(nibbles.reshape(rows, -1)) + 16 * unpack_bits(fifth.reshape(rows, -1))
            q = q.view(rows, count, 32)
            info = gguf.tensors[name]
            raw = gguf._read(info.offset, info.n_bytes).reshape(rows, -1)
            reference = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[qtype]))
            torch.testing.assert_close((q * d[..., None] + m[..., None]).flatten(1), reference, atol=0, rtol=1e-6)
            if qtype == "Q5_0":
                assert torch.equal(m, -16 * d)
    finally:
        gguf.close()


@pytest.mark.parametrize("qtype", ["Q5_K", "Q6_K"])
def test_5_and_6_bit_groups_whose_scales_float16_cannot_hold_become_int8_layers(qtype, tmp_path, monkeypatch):
    skip_without_w4a8()
    from gpt4.quant import Int8Linear, Q5Linear, Q6Linear
    from gpt4.weights.gguf_file import GGUFFile

    path = write_tiny_gguf(tmp_path / f"tiny-{qtype}.gguf", qtype=qtype, arch="qwen2")
    reader, kind = ("int5_groups", Q5Linear) if qtype == "Q5_K" else ("int6_groups", Q6Linear)
    real = getattr(GGUFFile, reader)

    def huge(self, name):  # one layer's scales (d, and Q5_K's m) beyond float16's range
        groups = real(self, name)
        if name != "blk.1.ffn_down.weight":
            return groups
        return (*groups[:-2], *(t * 1e5 for t in groups[-2:])) if qtype == "Q5_K" else (*groups[:-1], groups[-1] * 1e5)

    monkeypatch.setattr(GGUFFile, reader, huge)
    model = GPT4LMHeadModel.from_pretrained(path, dtype="bfloat16", quant="w4a8")
    down = model.layers[1].mlp.down_proj
    assert type(down) is Int8Linear and type(model.layers[0].mlp.down_proj) is kind
    gguf = GGUFFile(path)
    try:
        want = kind.weights(*getattr(gguf, reader)("blk.1.ffn_down.weight"))  # the groups' own weights
    finally:
        gguf.close()
    step = want.abs().amax(1, keepdim=True) / 127  # int8's step, a row: half of it, and the bf16 weights and scales
    assert ((down.dequantized().float() - want).abs() <= step).all()


def test_w4a8_holds_q6_k_layers_in_6_bit_groups_with_a_float16_d_a_half(tmp_path):
    """GGUFFile.int6_groups: Q6_K's sub-blocks of 16 two to a group of 32, (nibbles, fifth, sixth, d), the gguf
    package's values; w4a8 holds them as Q6Linear (0.875 bytes a weight, each d rounded once, to float16) and decodes
    them fused, with the eager layers' tokens."""
    skip_without_w4a8()
    from gguf import GGMLQuantizationType, quants

    from gpt4.quant import Q6Linear
    from gpt4.weights.gguf_file import GGUFFile

    path = write_tiny_gguf(tmp_path / "tiny-Q6_K.gguf", qtype="Q6_K", arch="qwen2")  # (no rope permutation)
    gguf = GGUFFile(path)
    try:
        assert gguf.int6_groups("blk.0.attn_q.weight") is not None and gguf.int5_groups("blk.0.attn_q.weight") is None
        info = gguf.tensors["blk.1.ffn_down.weight"]
        raw = gguf._read(info.offset, info.n_bytes).reshape(info.shape[0], -1)
        file = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q6_K))  # the gguf package's decoder
        groups = gguf.int6_groups("blk.1.ffn_down.weight")
    finally:
        gguf.close()
    assert torch.equal(Q6Linear.weights(*groups), file)
    model = GPT4LMHeadModel.from_pretrained(path, dtype="bfloat16", quant="auto")
    assert model.quant == "w4a8"
    layers = [m for layer in model.layers for m in (layer.attn.qkv_proj, layer.attn.o_proj, layer.mlp.up_proj,
                                                    layer.mlp.down_proj)]
    assert all(type(m) is Q6Linear for m in [*layers, model.lm_head])
    weight = torch.ops.gpt4_kernels.q6_dequantize(model.layers[1].mlp.down_proj.blocks, torch.float32).t()
    bound = 2.0 ** -11 * 32 * groups[3].abs() + 1e-7  # float16's half unit in the last place of d, |q - 32| <= 32
    assert ((weight - file).view(*bound.shape, 16).abs() <= bound[..., None]).all()
    assert model._fused_decode is not None
    prompt = torch.tensor([[3, 70, 12, 250, 9]])
    fused = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
    model.use_fused_decode(False)
    assert torch.equal(fused, model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K"])
def test_w4a8_holds_k_quant_layers_in_their_own_bits_with_float16_scales(qtype, tmp_path):
    """Q4_K's and Q5_K's sub-blocks of 32 (scale d * sc, offset -dmin * m) are w4a8's 4-bit and 5-bit groups: the
    file's values q as they are, each group's scale and offset rounded once, to float16 (not the weights to 8 bits,
    as before: 0.63 and 0.75 bytes a weight instead of 1.06, and closer to the file)."""
    skip_without_w4a8()
    from gguf import GGMLQuantizationType, quants

    from gpt4.quant import Q5Linear, W4A8Linear
    from gpt4.weights.gguf_file import GGUFFile, _k_scales

    path = write_tiny_gguf(tmp_path / f"tiny-{qtype}.gguf", qtype=qtype, arch="qwen2")  # (no rope permutation)
    model = GPT4LMHeadModel.from_pretrained(path, dtype="bfloat16", quant="auto")
    assert model.quant == "w4a8"
    layers = [m for layer in model.layers for m in (layer.attn.qkv_proj, layer.attn.o_proj, layer.mlp.up_proj,
                                                    layer.mlp.down_proj)]
    kind, top = (W4A8Linear, 15) if qtype == "Q4_K" else (Q5Linear, 31)
    assert all(type(m) is kind for m in layers)
    gguf = GGUFFile(path)
    try:
        info = gguf.tensors["blk.1.ffn_down.weight"]
        raw = gguf._read(info.offset, info.n_bytes).reshape(info.shape[0], -1)
        file = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[qtype]))  # the gguf package's decoder
        blocks = torch.from_numpy(raw).view(-1, info.row_bytes * 256 // info.shape[1])  # (super-blocks, bytes)
        scale, offset = (t.reshape(file.shape[0], -1) for t in _k_scales(blocks))  # (out, in / 32)
    finally:
        gguf.close()
    down = model.layers[1].mlp.down_proj
    weight = getattr(torch.ops.gpt4_kernels, f"{down.kind}_dequantize")(down.blocks, torch.float32).t()
    assert not torch.equal(weight, file)  # (scales rounded)
    bound = 2.0 ** -11 * (top * scale.abs() + offset.abs()) + 1e-6  # float16's half unit in the last place, per group
    assert ((weight - file).unflatten(1, (-1, 32)).abs() <= bound[..., None]).all()
    assert model._fused_decode is not None
    prompt = torch.tensor([[3, 70, 12, 250, 9]])
    fused = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
    model.use_fused_decode(False)
    assert torch.equal(fused, model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q4_0", "Q4_K"])
def test_8_bit_groups_hold_q8_0_q5_0_and_q4_0_blocks_exactly(qtype, tmp_path):
    """GGUFFile.int8_groups: the file's groups of 32 as int8 q and d, w = d q bit for bit; None for the formats
    they cannot hold (an offset, as Q4_1's, or sub-block scales, as the K-quants')."""
    from gpt4.weights.gguf_file import GGUFFile

    gguf = GGUFFile(write_tiny_gguf(tmp_path / f"tiny-{qtype}.gguf", qtype=qtype))
    try:
        for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight"):
            groups = gguf.int8_groups(name)
            if qtype == "Q4_K":
                assert groups is None
                continue
            q, d = groups
            assert q.dtype == torch.int8 and q.shape == (*d.shape, 32)
            assert torch.equal((q.float() * d[..., None]).flatten(1), gguf.tensor(name, torch.float32)), name
    finally:
        gguf.close()
