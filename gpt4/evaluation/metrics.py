"""Scoring functions, computed the way the community computes them (lm-eval-harness / SQuAD / HumanEval)."""

from __future__ import annotations

import math
import re
import string
from collections import Counter


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: list[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def f1(prediction: str, answers: list[str]) -> float:
    """Token-overlap F1 against the best gold answer."""
    def one(pred: str, gold: str) -> float:
        p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
        if not p or not g:
            return float(p == g)
        common = sum((Counter(p) & Counter(g)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(g)
        return 2 * precision * recall / (precision + recall)
    return max((one(prediction, a) for a in answers), default=0.0)


_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def final_number(text: str) -> str | None:
    """GSM8K: the number after 'The answer is', else the last number in the text; commas and '$' removed."""
    m = re.search(r"answer is\s*\$?\s*(-?[\d,]*\.?\d+)", text, flags=re.IGNORECASE)
    found = [m.group(1)] if m else _NUMBER.findall(text)
    if not found:
        return None
    number = found[-1].replace(",", "").rstrip(".")
    return number[:-2] if number.endswith(".0") else number


def same_number(a: str | None, b: str) -> float:
    if a is None:
        return 0.0
    try:
        return float(abs(float(a) - float(b.replace(",", ""))) < 1e-6)
    except ValueError:
        return 0.0


def choose(logliks: list[float], continuations: list[str]) -> tuple[int, int]:
    """(argmax of summed log-likelihood, argmax of log-likelihood per character of the continuation):
    lm-eval's acc and acc_norm."""
    raw = max(range(len(logliks)), key=lambda i: logliks[i])
    norm = max(range(len(logliks)), key=lambda i: logliks[i] / max(1, len(continuations[i])))
    return raw, norm


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n))."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)
