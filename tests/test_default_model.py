"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers on the same file."""

import subprocess
import sys

import pytest
import torch

from gpt4 import GPT4Config, GPT4LMHeadModel
from gpt4.generation import stream
from gpt4.models import resolve

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

TEXTS = [
    "Princess Peach is a character in the Super Mario video game series.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "In 1969, 3 astronauts flew 384,400 km; cost: $25.4B (≈ €23B).",
    "  leading spaces,\ttabs,\r\nCRLF and trailing   ",
    "普林塞斯·桃是超级马里奥系列中的角色。",
    "Ünïcödé façade — naïve café; emoji 🍄🐢!",
    "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>",
]
PROMPTS = [
    "Princess Peach is a character in the Super Mario video game series.",
    "The three primary colors are",
    "def add(a, b):\n",
]


@pytest.fixture(scope="module")
def reference():
    path = resolve("gpt4")
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_token_ids_equal_transformers_tokenizer(text, default_model, reference):
    _, tokenizer = reference
    assert default_model.tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(
        text, add_special_tokens=False)
    ids = default_model.tokenizer.encode(text)
    assert default_model.tokenizer.decode(ids) == text


def test_chat_template_equals_transformers(default_model, reference):
    _, tokenizer = reference
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of Peru?"}]
    ours = default_model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_logits_and_greedy_output_equal_transformers(default_model, reference):
    model, tokenizer = reference
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            torch.testing.assert_close(default_model(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)
        assert torch.equal(default_model.generate(ids, max_new_tokens=24), want), prompt


def test_capital_of_france(default_model):
    ids = default_model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    reply = default_model.generate(torch.tensor([ids]), max_new_tokens=20)[0, len(ids):]
    assert "Paris" in default_model.tokenizer.decode(reply, skip_special_tokens=True)


def test_streamed_pieces_concatenate_to_generated_text(default_model):
    prompt = "List three fruits:"
    pieces = list(stream(default_model, prompt, max_new_tokens=30))
    assert len(pieces) > 5
    assert "".join(pieces) == default_model.generate(prompt, max_new_tokens=30)


def test_stop_strings_are_never_emitted(default_model):
    prompt = "Count: one, two, three, four, five, six,"
    full = default_model.generate(prompt, max_new_tokens=20)
    stop = full.strip().split(",")[1].strip()  # a word the model does produce
    assert stop
    text = default_model.generate(prompt, max_new_tokens=20, stop_strings=[stop])
    streamed = "".join(stream(default_model, prompt, max_new_tokens=20, stop_strings=[stop]))
    assert stop not in text and text == streamed and full.startswith(text)


def test_config_of_the_named_model():
    config = GPT4Config.from_pretrained("gpt4")
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (576, 30, 3)
    assert config.tie_word_embeddings and config.vocab_size == 49152


def test_the_briefs_snippet_runs_offline(tmp_path):
    snippet = (
        "from gpt4 import GPT4LMHeadModel, GPT4Config\n"
        "config = GPT4Config.from_pretrained('gpt4')\n"
        "model = GPT4LMHeadModel.from_pretrained('gpt4')\n"
        "output_text = model.generate('Princess Peach is a character in the Super Mario video game series.',"
        " max_new_tokens=16)\n"
        "print(output_text)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split()) >= 5


def test_bfloat16_agrees_with_float32_on_greedy_tokens(default_model):
    """Teacher-forced on fp32's greedy continuations, bf16 picks fp32's token wherever that is not a near-tie (top
    two logits within 0.1). bf16 may flip a near-tie, after which free-running outputs part: on an AMX Xeon, the
    second token after PROMPTS[0], whose top two fp32 logits are 0.017 apart."""
    bf16 = GPT4LMHeadModel.from_pretrained("gpt4", dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    decided = agreed = 0
    for prompt in PROMPTS:
        ids = torch.tensor([default_model.tokenizer.encode(prompt)])
        greedy = default_model.generate(ids, max_new_tokens=8)  # (1, prompt + 8)
        with torch.inference_mode():
            want, got = default_model(greedy).logits[0], bf16(greedy).logits[0].float()  # (T, V)
        for position in range(ids.shape[1] - 1, greedy.shape[1] - 1):  # the logits that chose each new token
            top_two = want[position].topk(2).values
            if top_two[0] - top_two[1] > 0.1:
                decided += 1
                agreed += int(got[position].argmax() == want[position].argmax())
    assert decided >= 18, decided  # of the 24 choices, most are clear ones
    assert agreed == decided
