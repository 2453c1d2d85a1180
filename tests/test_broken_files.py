"""A corpus of broken model files (llama.cpp style): each is rejected quickly with one clear error."""

import json
import struct

import pytest
import torch

from gpt4 import GPT4LMHeadModel, GPT4Config
from gpt4.errors import GPT4Error, ModelFileError, ModelNotFoundError

from .conftest import tiny_model
from .gguf_builder import write_tiny_gguf


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "good.gguf", qtype="Q8_0").read_bytes()


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "model"
    tiny_model("llama-gqa-untied").save_pretrained(folder)
    return folder


def _tensor_info_offset(data: bytes, name: str) -> int:
    """Offset of the type field of tensor `name`'s info record (name, n_dims, dims, type, offset)."""
    encoded = name.encode()
    start = data.index(struct.pack("<Q", len(encoded)) + encoded)
    pos = start + 8 + len(encoded)
    (n_dims,) = struct.unpack_from("<I", data, pos)
    return pos + 4 + 8 * n_dims


def _gguf_cases(good: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, a fragment the error message must contain)."""
    cases = {
        "empty": (b"", "too short"),
        "text file": (b"this is not a model, just some text in a file\n" * 3, "not a GGUF file"),
        "bad magic": (b"GGUG" + good[4:], "not a GGUF file"),
        "future version": (good[:4] + struct.pack("<I", 99) + good[8:], "version 99"),
        "huge tensor count": (good[:8] + struct.pack("<Q", 1 << 60) + good[16:], "more than its"),
        "huge kv count": (good[:16] + struct.pack("<Q", 1 << 60) + good[24:], "more than its"),
        "truncated header": (good[:200], "truncated"),
        "truncated data": (good[:-5000], "truncated"),
    }
    # A string length past the end of the file: the first metadata key's length field (right after the header).
    cases["string length past end"] = (good[:24] + struct.pack("<Q", 1 << 40) + good[32:], "truncated")
    # The same inside the vocabulary (an array of strings): its 10th token's length.
    at = good.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 4 + 4 + 8  # type, item type, count
    for _ in range(9):
        at += 8 + struct.unpack_from("<Q", good, at)[0]
    cases["vocabulary string past end"] = (good[:at] + struct.pack("<Q", 1 << 40) + good[at + 8:],
                                           "tokenizer.ggml.tokens")
    type_at = _tensor_info_offset(good, "token_embd.weight")
    cases["unknown tensor type"] = (good[:type_at] + struct.pack("<I", 977) + good[type_at + 4:], "")
    return cases


@pytest.mark.parametrize("case", ["empty", "text file", "bad magic", "future version", "huge tensor count",
                                  "huge kv count", "truncated header", "truncated data", "string length past end",
                                  "vocabulary string past end", "unknown tensor type"])
def test_broken_gguf_is_rejected_with_a_clear_error(case, good_gguf, tmp_path):
    data, fragment = _gguf_cases(good_gguf)[case]
    path = tmp_path / "broken.gguf"
    path.write_bytes(data)
    with pytest.raises(ModelFileError) as err:
        GPT4LMHeadModel.from_pretrained(path)
    assert str(path) in str(err.value)
    assert fragment in str(err.value)


def test_gguf_of_unsupported_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "bert.gguf", arch="bert")
    with pytest.raises(ModelFileError, match="architecture 'bert' is not supported"):
        GPT4LMHeadModel.from_pretrained(path)


def test_gguf_whose_metadata_does_not_match_its_tensors(tmp_path):
    path = write_tiny_gguf(tmp_path / "liar.gguf", overrides={"block_count": 3})
    with pytest.raises(ModelFileError, match=r"do not match its config: missing tensors \['layers.2"):
        GPT4LMHeadModel.from_pretrained(path)
    path = write_tiny_gguf(tmp_path / "liar2.gguf", overrides={"feed_forward_length": 768})
    with pytest.raises(ModelFileError, match="shape mismatches"):
        GPT4LMHeadModel.from_pretrained(path)


def _copy_folder(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_safetensors(good_folder, tmp_path):
    folder = _copy_folder(good_folder, tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        GPT4LMHeadModel.from_pretrained(folder)


@pytest.mark.parametrize("header", [b"\xff" * 8, struct.pack("<Q", 40) + b"{not json" + b" " * 31,
                                    struct.pack("<Q", 1 << 50)])
def test_corrupted_safetensors_header(header, good_folder, tmp_path):
    folder = _copy_folder(good_folder, tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(header + data[len(header):])
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        GPT4LMHeadModel.from_pretrained(folder)


def test_safetensors_offsets_past_the_end(good_folder, tmp_path):
    folder = _copy_folder(good_folder, tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 10_000_000
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        GPT4LMHeadModel.from_pretrained(folder)


def test_config_that_does_not_match_the_weights(good_folder, tmp_path):
    folder = _copy_folder(good_folder, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=r"shape mismatches.*mlp.up_proj.weight"):
        GPT4LMHeadModel.from_pretrained(folder)


@pytest.mark.parametrize("text,fragment", [("{oops", "not valid JSON"),
                                           ('{"model_type": "bert"}', "model_type='bert'"),
                                           ('{"model_type": "llama"}', "does not describe a supported model")])
def test_bad_config_json(text, fragment, good_folder, tmp_path):
    folder = _copy_folder(good_folder, tmp_path / "m")
    (folder / "config.json").write_text(text)
    with pytest.raises(ModelFileError, match=fragment):
        GPT4LMHeadModel.from_pretrained(folder)


def test_missing_shard(tmp_path):
    tiny_model("llama-gqa-untied").save_pretrained(tmp_path, max_shard_size=20_000)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ModelFileError, match="which is missing"):
        GPT4LMHeadModel.from_pretrained(tmp_path)


def test_folder_without_weights(tmp_path):
    GPT4Config().save_pretrained(tmp_path)
    with pytest.raises(ModelFileError, match="no model.safetensors"):
        GPT4LMHeadModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("name,fragment", [("no-such-model", "neither a known model name"),
                                           ("/does/not/exist.gguf", "neither a known model name"),
                                           ("gpt5", "neither a known model name")])
def test_unknown_names_and_missing_paths(name, fragment):
    with pytest.raises(ModelNotFoundError, match=fragment):
        GPT4LMHeadModel.from_pretrained(name)


def test_hub_id_offline_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="Could not fetch 'someone/some-model'.*offline"):
        GPT4LMHeadModel.from_pretrained("someone/some-model")


def test_over_long_prompt_is_refused():
    model = tiny_model("llama-gqa-untied")  # 64 positions
    with pytest.raises(GPT4Error, match="context is 64 tokens"):
        model.generate(torch.zeros(1, 64, dtype=torch.long), max_new_tokens=4)


def test_token_id_outside_vocabulary():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 2, 96]]))


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="norm='batchnorm'"):
        GPT4Config(norm="batchnorm")
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        GPT4Config(num_attention_heads=12, num_key_value_heads=5)


@pytest.mark.parametrize("key,count", [(b"tokenizer.ggml.tokens", 1 << 40), (b"tokenizer.ggml.tokens", 300),
                                       (b"tokenizer.ggml.token_type", 1 << 40),
                                       (b"tokenizer.ggml.token_type", 1 << 20)])
def test_corrupted_array_counts_fail_fast(key, count, good_gguf, tmp_path):
    import time

    data = bytearray(good_gguf)
    at = data.index(key) + len(key) + 8  # after the value type and the array's item type
    struct.pack_into("<Q", data, at, count)
    path = tmp_path / "counts.gguf"
    path.write_bytes(bytes(data))
    start = time.perf_counter()
    with pytest.raises(ModelFileError, match="runs past the end of the file"):
        GPT4LMHeadModel.from_pretrained(path)
    assert time.perf_counter() - start < 5  # the gguf package alone crawls for ~20 s on these


def test_tensor_with_absurd_rank(good_gguf, tmp_path):
    data = bytearray(good_gguf)
    name = b"token_embd.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    struct.pack_into("<I", data, at, 77)
    path = tmp_path / "rank.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="has 77 dimensions"):
        GPT4LMHeadModel.from_pretrained(path)


def test_gguf_truncated_while_it_loads_gives_a_clear_error(good_gguf, tmp_path):
    """Tensor data is read with system calls after the header is parsed: a file cut short in between gives an
    error naming it (through the memory map the header was read with, the process would die of SIGBUS)."""
    from gpt4.weights.gguf_file import GGUFFile

    path = tmp_path / "shrinking.gguf"
    path.write_bytes(good_gguf)
    gguf = GGUFFile(path)
    try:
        info = gguf.tensors["token_embd.weight"]
        with open(path, "r+b") as f:
            f.truncate(info.offset + info.n_bytes // 2)
        with pytest.raises(ModelFileError, match="truncated or replaced while loading") as err:
            gguf.tensor("token_embd.weight")
        assert str(path) in str(err.value)
    finally:
        gguf.close()
