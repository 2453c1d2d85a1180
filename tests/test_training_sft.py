"""Fine-tuning: assistant-only labels with the model's own chat template, LoRA mechanics and merging."""

import json

import pytest
import torch

from gpt4 import GPT4Error, GPT4LMHeadModel
from gpt4.training.distributed import DistInfo
from gpt4.training.lora import LoRALinear, add_lora, merge_lora
from gpt4.training.loop import Batches, TrainConfig, run_training
from gpt4.training.sft import IGNORE, finetune, read_conversations, tokenize_conversation

from .conftest import tiny_model

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Green."},
]


def test_sft_labels_cover_assistant_replies_only(default_model):
    tok = default_model.tokenizer
    ids, labels = tokenize_conversation(tok, CONVERSATION, max_len=512)
    assert len(ids) == len(labels)
    # The tokens are the template's rendering of the whole conversation.
    assert tok.decode(ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    learned = [i for i, y in zip(ids, labels) if y != IGNORE]
    assert all(y in (IGNORE, i) for i, y in zip(ids, labels))
    # Exactly the replies and the template's end-of-turn marker after each (so the model learns to stop).
    assert tok.decode(learned) == "Blue.<|im_end|>\nGreen.<|im_end|>\n"
    masked = tok.decode([i for i, y in zip(ids, labels) if y == IGNORE])
    for prompt_text in ("You are terse.", "Name a colour.", "Another one?", "<|im_start|>assistant"):
        assert prompt_text in masked


def test_sft_rejects_bad_records(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(GPT4Error, match="no assistant message"):
        read_conversations([str(bad)])
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(GPT4Error, match="'messages' list"):
        read_conversations([str(bad)])


@pytest.mark.parametrize("settings,message", [
    (dict(lora_rank=-1), "--lora-rank must be at least 1 for LoRA, or 0 for full fine-tuning, got -1."),
    (dict(lora_rank=4, lora_alpha=-2.0), "--lora-alpha must be above 0 (default: twice the rank), got -2.0."),
    (dict(val_fraction=1.5), "--val-fraction must be in [0, 1), got 1.5."),
])
def test_finetune_refuses_bad_settings_before_loading_anything(settings, message, tmp_path, monkeypatch):
    monkeypatch.setattr(GPT4LMHeadModel, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    with pytest.raises(GPT4Error) as e:
        finetune("gpt4", [str(data)], TrainConfig(out_dir=str(tmp_path / "out")), **settings)
    assert str(e.value) == message


def test_finetune_reads_its_data_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(GPT4LMHeadModel, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CONVERSATION}) + "\nnot json\n")
    with pytest.raises(GPT4Error, match="bad.jsonl:2 is not valid JSON"):
        finetune("gpt4", [str(bad)], TrainConfig(out_dir=str(tmp_path / "out")))


class OneBatch(Batches):
    def __init__(self, x):
        self.x = x

    def train(self, step, rows):
        return self.x, self.x, None

    val = train


def test_lora_trains_only_adapters_and_merges_to_same_outputs(tmp_path):
    model = tiny_model("llama-gqa-untied")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = add_lora(model, rank=4)
    assert len(wrapped) == 4 * model.config.num_hidden_layers
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model(x).logits, GPT4LMHeadModel.forward(tiny_model("llama-gqa-untied"), x).logits)
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=10, lr=1e-2, warmup_steps=1, eval_interval=10, eval_batches=1,
                      sample_tokens=0, checkpoint_interval=0, precision="fp32", progress=False)
    run_training(model, OneBatch(x), cfg, DistInfo(), hooks=None, log=lambda *a: None)
    after = model.state_dict()
    for name, value in before.items():  # base weights untouched ...
        key = name if name in after else name.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        assert torch.equal(after[key], value), name
    assert any(m.lora_b.abs().sum() > 0 for m in model.modules() if isinstance(m, LoRALinear))  # ... adapters moved
    model.eval()
    with torch.no_grad():
        adapted = model(x).logits
        merged = merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        assert torch.allclose(merged(x).logits, adapted, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = GPT4LMHeadModel.from_pretrained(str(tmp_path / "merged"))
    with torch.no_grad():
        assert torch.allclose(reloaded(x).logits, adapted, atol=1e-5)


def test_finetune_default_model_from_gguf_with_lora(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."},
                                                     {"role": "assistant", "content": f"{w}!"}]}) + "\n"
                            for w in ("yes", "no", "maybe", "sure")))
    cfg = TrainConfig(out_dir=str(tmp_path / "out"), max_steps=2, batch_size=2, seq_len=64, lr=1e-3, warmup_steps=1,
                      eval_interval=2, eval_batches=1, checkpoint_interval=0, precision="fp32", progress=False)
    summary = finetune("gpt4", [str(data)], cfg, lora_rank=2, val_fraction=0.25)
    assert summary["final_val_loss"] is not None
    model = GPT4LMHeadModel.from_pretrained(str(tmp_path / "out" / "final"))  # merged: an ordinary checkpoint
    assert model.config.vocab_size == 49152 and model.tokenizer.chat_template
