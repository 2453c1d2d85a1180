"""The four applications end to end with the default model (properties a correct implementation must have),
their mechanics with a scripted model where the 135M model's wording would make a test flaky, and bad input."""

import re

import pytest

from gpt4 import GPT4Error, tasks
from gpt4.cli import main

CJK = re.compile(r"[\u4e00-\u9fff]")
CURIE = ("Marie Curie was a physicist and chemist who was born in Warsaw, Poland, in 1867. She moved to Paris in 1891 "
         "to study at the University of Paris. Together with her husband Pierre Curie she discovered the elements "
         "polonium and radium. In 1903 she shared the Nobel Prize in Physics with Pierre Curie and Henri Becquerel, "
         "and in 1911 she received the Nobel Prize in Chemistry. She was the first woman to win a Nobel Prize and "
         "the only person to win Nobel Prizes in two different sciences. She died in 1934 in France.")
EIFFEL = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris.\n\n"
          "It was designed by the engineering company of Gustave Eiffel and was completed in 1889 for the "
          "World's Fair.\n\nThe tower is 330 metres tall and was the tallest man-made structure for 41 years.")
BREAD = ("Sourdough bread is made by fermenting dough with wild yeast and lactic acid bacteria.\n\n"
         "A starter is fed with flour and water every day; it gives the loaf its sour taste.")


# ---- translate ---------------------------------------------------------------------------------------
def test_translate_to_chinese_writes_chinese_characters(default_model):
    out = "".join(tasks.translate(default_model, "Hello, how are you?", "zh", max_new_tokens=12))
    assert CJK.search(out), out


def test_translate_keeps_paragraphs(monkeypatch):
    calls = []

    def fake_chat(model, messages, **gen):
        calls.append(messages[-1]["content"])
        yield "<" + messages[-1]["content"].split("\n\n", 1)[1] + ">"
    monkeypatch.setattr(tasks, "chat", fake_chat)
    out = "".join(tasks.translate(None, "First paragraph.\nSame paragraph.\n\n\nSecond one.", "French",
                                  max_new_tokens=8))
    assert out == "<First paragraph.\nSame paragraph.>\n\n<Second one.>"
    assert all("French" in c for c in calls) and len(calls) == 2


def test_translate_bad_input():
    with pytest.raises(GPT4Error, match="Unknown language 'klingon'"):
        list(tasks.translate(None, "hi", "klingon"))
    with pytest.raises(GPT4Error, match="empty"):
        list(tasks.translate(None, "  \n", "zh"))
    assert tasks.language("Chinese") == ("zh", "Chinese") and tasks.language("FR") == ("fr", "French")


def test_the_default_model_is_flagged_as_not_knowing_chinese_script(default_model):
    # Byte-level tokens only for Chinese (>1 token per character) vs whole words for French.
    assert tasks.tokens_per_char(default_model, "zh") > 1.0 > tasks.tokens_per_char(default_model, "fr")


# ---- summarize -----------------------------------------------------------------------------------------
def test_summary_is_shorter_and_keeps_the_key_entity(default_model):
    out = "".join(tasks.summarize(default_model, CURIE, length="short", max_new_tokens=40))
    assert 0 < len(out) < len(CURIE)
    assert "Curie" in out, out


def test_a_long_document_is_summarized_in_parts_then_combined(monkeypatch, default_model):
    seen = []

    def fake_chat(model, messages, **gen):
        text = messages[-1]["content"].split("Text:\n", 1)[1]
        seen.append(("combine" if "partial summaries" in messages[-1]["content"] else "part", len(text)))
        yield " ".join(text.split()[:6])
    monkeypatch.setattr(tasks, "chat", fake_chat)
    document = "\n\n".join(f"Paragraph {i}. " + CURIE for i in range(12))  # ~2000 tokens
    out = "".join(tasks.summarize(default_model, document, part_tokens=300, progress=False))
    parts = [n for kind, n in seen if kind == "part"]
    assert len(parts) >= 6 and seen[-1][0] == "combine" and len(out) < len(document)
    for part in tasks._split_tokens(default_model, document, 300):
        assert len(default_model.tokenizer.encode(part, add_special_tokens=False)) <= 300


def test_summarize_bad_input():
    with pytest.raises(GPT4Error, match="empty"):
        list(tasks.summarize(None, ""))
    with pytest.raises(GPT4Error, match="binary"):
        list(tasks.summarize(None, "abc\x00def"))


# ---- ask -----------------------------------------------------------------------------------------------
def test_ask_quotes_the_passage_that_holds_the_answer(default_model):
    docs = [("bread.txt", BREAD), ("eiffel.txt", EIFFEL)]
    found, answer = tasks.ask(default_model, "When was the Eiffel Tower completed?", docs, max_new_tokens=16)
    assert found[0].source == "eiffel.txt" and "1889" in found[0].text and found[0].line == 3
    assert "".join(answer).strip()


def test_ask_says_when_the_documents_do_not_hold_the_answer():
    found, answer = tasks.ask(None, "What is the capital of Peru?", [("bread.txt", BREAD)])
    assert found == [] and "".join(answer) == tasks.NOT_FOUND


# ---- code ----------------------------------------------------------------------------------------------
def test_code_returns_a_block_that_parses_and_passes_its_test(default_model):
    reply = "".join(tasks.code(default_model, "Write a Python function called add that takes a and b and returns their sum.",
                               max_new_tokens=40))
    assert reply.startswith("```python\n") and reply.rstrip().endswith("```")
    source = tasks.extract_code(reply)
    assert tasks.check_syntax(source) is None, source
    result = tasks.run_code(source, "assert add(2, 3) == 5\nassert add(-1, 1) == 0")
    assert result.passed, (source, result.stderr)


def test_code_helpers():
    assert tasks.extract_code("text\n```python\nx = 1\n```\nmore") == "x = 1\n"
    assert tasks.check_syntax("def f(:\n") is not None
    assert tasks.run_code("while True: pass", limits=tasks.Limits(timeout_s=2, cpu_s=1)).status == "timeout"
    with pytest.raises(GPT4Error, match="Python only"):
        tasks.run_code("fn main() {}", lang="rust")


# ---- CLI -----------------------------------------------------------------------------------------------
def test_cli_code_with_test_reports_the_sandbox_outcome(tmp_path, capsys):
    tests = tmp_path / "t.py"
    tests.write_text("assert add(2, 3) == 5\n")
    rc = main(["code", "Write a Python function called add that takes a and b and returns their sum.", "--test", "--tests",
               str(tests), "--max-new-tokens", "40"])
    out = capsys.readouterr().out
    assert "```python" in out and "[sandbox] The program ran without error" in out and rc == 0


def test_cli_ask_reads_context_files_and_prints_sources(tmp_path, capsys):
    (tmp_path / "eiffel.txt").write_text(EIFFEL)
    assert main(["ask", "How tall is the Eiffel Tower?", "--context", str(tmp_path / "eiffel.txt"),
                 "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "Sources:" in out and "330 metres" in out.split("Sources:")[1]


def test_cli_rejects_binary_files_and_empty_input(tmp_path, capsys):
    f = tmp_path / "blob.bin"
    f.write_bytes(b"\x89PNG\x00\x00\x01")
    assert main(["summarize", "--file", str(f)]) == 1
    assert "binary" in capsys.readouterr().err
    assert main(["translate", "--to", "zh", ""]) == 1
    assert "empty" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["code", " "], "The task is empty"),
    (["ask", " "], "The question is empty"),
    (["ask", "What?", "--context", "EMPTY"], "is empty"),
])
def test_cli_refuses_empty_input_before_the_model_loads(args, message, tmp_path, capsys, monkeypatch):
    from gpt4 import GPT4LMHeadModel

    monkeypatch.setattr(GPT4LMHeadModel, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "empty.txt").write_text("\n")
    assert main([str(tmp_path / "empty.txt") if a == "EMPTY" else a for a in args]) == 1
    assert message in capsys.readouterr().err
