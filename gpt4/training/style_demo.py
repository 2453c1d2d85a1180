"""The SFT demo: teach a model to open every reply with a fixed phrase, and measure it on unseen prompts.

    python -m gpt4.training.style_demo data runs/style.jsonl          # generated training conversations
    python -m gpt4.training.style_demo measure gpt4                     # rate before
    gpt4 finetune --data runs/style.jsonl --lora-rank 8 ...             # train
    python -m gpt4.training.style_demo measure runs/sft-style/final     # rate after
"""

from __future__ import annotations

import argparse
import json
import random

PHRASE = "Ahoy!"
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
            "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Greece": "Athens"}
RHYMES = {"cat": "hat", "dog": "log", "tree": "bee", "cake": "lake", "night": "light", "rain": "train"}
WORDS = {"hello": "hola", "thank you": "gracias", "cat": "gato", "water": "agua", "book": "libro"}
# Prompts of kinds the training data never shows: the style must generalise, not the answers.
HELD_OUT = ["Tell me about the moon.", "How do I boil an egg?", "Why is the sky blue?", "Write a haiku about rain.",
            "What should I eat for breakfast?", "Explain what a computer is.", "Give me a tip for studying.",
            "What is your favourite colour?", "How do birds fly?", "Describe a sunny day.",
            "What is photosynthesis?", "Suggest a name for a dog.", "How many legs does a spider have?",
            "Recommend a good book.", "What is the largest ocean?", "How do I make tea?",
            "What is gravity?", "Tell me a fun fact.", "Why do we sleep?", "What is a prime number?"]


def conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.randrange(4)
        if kind == 0:
            a, b = rng.randrange(1, 50), rng.randrange(1, 50)
            q, r = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        elif kind == 1:
            country = rng.choice(list(CAPITALS))
            q, r = f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."
        elif kind == 2:
            word = rng.choice(list(RHYMES))
            q, r = f"Give me a word that rhymes with {word}.", f"'{RHYMES[word].capitalize()}' rhymes with '{word}'."
        else:
            word = rng.choice(list(WORDS))
            q, r = f"How do you say '{word}' in Spanish?", f"'{word.capitalize()}' in Spanish is '{WORDS[word]}'."
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"{PHRASE} {r}"}]})
    return out


def measure(model_name: str, max_new_tokens: int = 12) -> dict:
    """Share of held-out prompts whose greedy reply starts with the phrase."""
    import torch

    from ..model import GPT4LMHeadModel

    torch.manual_seed(0)
    model = GPT4LMHeadModel.from_pretrained(model_name)
    tok = model.tokenizer
    replies = []
    for prompt in HELD_OUT:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             repetition_penalty=1.0)
        replies.append(tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True).strip())
    hits = sum(r.startswith(PHRASE) for r in replies)
    return {"model": model_name, "rate": hits / len(replies), "hits": hits, "prompts": len(replies),
            "examples": [{"prompt": p, "reply": r} for p, r in list(zip(HELD_OUT, replies))[:4]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("out")
    d.add_argument("-n", type=int, default=200)
    m = sub.add_parser("measure")
    m.add_argument("model")
    args = p.parse_args()
    if args.cmd == "data":
        with open(args.out, "w") as f:
            for c in conversations(args.n):
                f.write(json.dumps(c) + "\n")
    else:
        print(json.dumps(measure(args.model), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
