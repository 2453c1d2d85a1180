"""`evaluate(model, task)`: run one benchmark on its first `limit` examples (a fixed, documented subset) and
return the metrics plus one record per example."""

from __future__ import annotations

import platform
import random
import time

import torch
from tqdm import tqdm

from ..generation import generate_tokens
from ..sandbox import Limits, run_python
from . import data, metrics
from .scoring import LocalScorer

CODE_STOPS = {"humaneval": ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"], "mbpp": ["```"]}
DEFAULT_SHOTS = {"mc": 0, "qa": 0, "gsm8k": 8, "lambada": 0, "code": 0}


def _fewshot(examples: list[data.Example], index: int, k: int, render) -> str:
    """k other examples of the same file (seeded by the example's index, never the example itself)."""
    if k <= 0:
        return ""
    pool = [j for j in range(len(examples)) if j != index]
    picks = random.Random(1234 + index).sample(pool, min(k, len(pool)))
    return "".join(render(examples[j]) + "\n\n" for j in picks)


def _generate(model, prompts: list[str], max_new_tokens: int, stops: list[str], batch: int, desc: str,
              progress: bool) -> list[str]:
    """Greedy completions, cut at the first stop string; batches of similar length."""
    tok = model.tokenizer
    config = model.generation_config.update(max_new_tokens=max_new_tokens, do_sample=False, stop_strings=stops,
                                            repetition_penalty=1.0, num_return_sequences=1)
    limit = model.config.max_position_embeddings - max_new_tokens
    ids = [tok.encode(p)[-limit:] for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    texts = [""] * len(ids)
    bar = tqdm(total=len(ids), desc=desc, unit="ex", disable=not progress, leave=False)
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        new = [[] for _ in rows]
        for step in generate_tokens(model, [ids[i] for i in rows], config, tok):
            for r, t in enumerate(step):
                if t is not None:
                    new[r].append(t)
        for r, i in enumerate(rows):
            text = tok.decode(new[r], skip_special_tokens=True)
            cuts = [text.find(s) for s in stops if s in text]
            texts[i] = text[:min(cuts)] if cuts else text
        bar.update(len(rows))
    bar.close()
    return texts


def _multiple_choice(examples, k, scorer):
    render = lambda e: e.context + e.choices[e.gold]  # noqa: E731
    pairs, spans = [], []
    for i, ex in enumerate(examples):
        prefix = _fewshot(examples, i, k, render)
        contexts = ex.meta.get("contexts") or [ex.context] * len(ex.choices)
        spans.append((len(pairs), len(ex.choices)))
        pairs += [(prefix + c, choice) for c, choice in zip(contexts, ex.choices)]
    scores = scorer.loglikelihoods(pairs)
    records, acc, acc_norm = [], [], []
    for ex, (s, n) in zip(examples, spans):
        ll = [sc.loglik for sc in scores[s:s + n]]
        raw, norm = metrics.choose(ll, ex.choices)
        acc.append(float(raw == ex.gold))
        acc_norm.append(float(norm == ex.gold))
        records.append({"id": ex.id, "gold": ex.gold, "logliks": ll, "pred": raw, "pred_norm": norm,
                        "acc": acc[-1], "acc_norm": acc_norm[-1]})
    return {"acc": acc, "acc_norm": acc_norm}, records


def _lambada(examples, k, scorer):
    scores = scorer.loglikelihoods([(ex.context, ex.choices[0]) for ex in examples])
    records = [{"id": ex.id, "target": ex.choices[0], "loglik": s.loglik, "tokens": s.tokens, "acc": float(s.greedy)}
               for ex, s in zip(examples, scores)]
    total_ll, total_tok = sum(s.loglik for s in scores), sum(s.tokens for s in scores)
    return {"acc": [r["acc"] for r in records]}, records, {"ppl": float(torch.tensor(-total_ll / total_tok).exp())}


def _qa(examples, k, model, batch, progress):
    render = lambda e: f"{e.prompt} {e.answers[0]}"  # noqa: E731
    prompts = [_fewshot(examples, i, k, render) + ex.prompt for i, ex in enumerate(examples)]
    outputs = _generate(model, prompts, 32, ["\n"], batch, "answering", progress)
    records, em, f1 = [], [], []
    for ex, out in zip(examples, outputs):
        pred = out.strip()
        em.append(metrics.exact_match(pred, ex.answers))
        f1.append(metrics.f1(pred, ex.answers))
        records.append({"id": ex.id, "prediction": pred, "answers": ex.answers, "em": em[-1], "f1": f1[-1]})
    return {"em": em, "f1": f1}, records


def _gsm8k(examples, k, model, batch, progress):
    prompts = []
    for ex in examples:
        shots = [s for s in ex.meta["fewshot_prefix"].split("\n\n") if s.strip()][:k]
        prompts.append("".join(s + "\n\n" for s in shots) + ex.prompt)
    outputs = _generate(model, prompts, 256, ["\n\nQuestion:", "Question:"], batch, "solving", progress)
    records, acc = [], []
    for ex, out in zip(examples, outputs):
        number = metrics.final_number(out)
        acc.append(metrics.same_number(number, ex.answers[0]))
        records.append({"id": ex.id, "output": out, "extracted": number, "answer": ex.answers[0], "acc": acc[-1]})
    return {"acc": acc}, records


def _code(examples, name, model, batch, progress, timeout_s):
    outputs = _generate(model, [ex.prompt for ex in examples], 384, CODE_STOPS[name], batch, "writing code", progress)
    records, passed = [], []
    for ex, out in tqdm(list(zip(examples, outputs)), desc="running tests", disable=not progress, leave=False):
        program = (ex.prompt + out if name == "humaneval" else out) + "\n\n" + ex.test
        result = run_python(program, Limits(timeout_s=timeout_s, cpu_s=int(timeout_s)))
        passed.append(float(result.passed))
        records.append({"id": ex.id, "completion": out, "status": result.status,
                        "stderr": result.stderr[-500:], "passed": passed[-1]})
    return {"pass@1": passed}, records


def evaluate(model, task: str, limit: int | None = None, shots: int | None = None, scorer=None,
             batch: int = 8, progress: bool = True, model_name: str = "", timeout_s: float = 10.0) -> dict:
    """Metrics (mean and standard error) and per-example records of `task` on its first `limit` examples."""
    spec = data.task(task)
    examples = spec.load()
    if limit is not None:
        examples = examples[:limit]
    k = DEFAULT_SHOTS[spec.kind] if shots is None else shots
    start = time.perf_counter()
    extra: dict = {}
    if spec.kind == "mc":
        values, records = _multiple_choice(examples, k, scorer or LocalScorer(model, progress=progress))
    elif spec.kind == "lambada":
        values, records, extra = _lambada(examples, k, scorer or LocalScorer(model, progress=progress))
    elif spec.kind == "qa":
        values, records = _qa(examples, k, model, batch, progress)
    elif spec.kind == "gsm8k":
        values, records = _gsm8k(examples, k, model, batch, progress)
    else:
        values, records = _code(examples, task, model, batch, progress, timeout_s)
    results = {}
    for metric, v in values.items():
        mean, stderr = metrics.mean_stderr(v)
        results[metric], results[metric + "_stderr"] = mean, stderr
    results.update(extra)
    return {"task": task, "model": model_name, "n": len(examples), "shots": k, "limit": limit,
            "description": spec.description, "metrics": results, "seconds": round(time.perf_counter() - start, 1),
            "torch": torch.__version__, "machine": platform.machine(), "records": records}
