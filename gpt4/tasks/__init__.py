"""The brief's four applications on any loadable chat model: translate, summarize, ask (grounded QA), code.

Each builds messages for the model's chat template with a prompt written for the task, and streams text.
Defaults are greedy with a mild repetition penalty (small models loop without it); any generation keyword
(max_new_tokens, temperature, ...) overrides them.
"""

from __future__ import annotations

import ast
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from tqdm import tqdm

from ..errors import GPT4Error
from ..generation import stream
from ..sandbox import Limits, SandboxResult, run_python

DEFAULTS = dict(do_sample=False, repetition_penalty=1.1)


def chat(model, messages: list[dict], **gen) -> Iterator[str]:
    """Stream the model's reply to `messages` (rendered with its chat template)."""
    ids = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return stream(model, ids, **{**DEFAULTS, **gen})


def _check_text(text: str, what: str) -> str:
    if text is None or not text.strip():
        raise GPT4Error(f"The {what} is empty: give some text.")
    if "\x00" in text:
        raise GPT4Error(f"The {what} contains NUL bytes: it looks like a binary file, not text.")
    return text


# ---- translate -------------------------------------------------------------------------------------
# code: (English name, other names, a sample sentence in the language's script)
LANGUAGES = {
    "en": ("English", (), "The weather is nice today."),
    "zh": ("Chinese", ("mandarin", "chinese (simplified)"), "今天天气很好。"),
    "fr": ("French", ("français",), "Il fait beau aujourd'hui."),
    "de": ("German", ("deutsch",), "Das Wetter ist heute schön."),
    "es": ("Spanish", ("español",), "Hoy hace buen tiempo."),
    "it": ("Italian", ("italiano",), "Oggi il tempo è bello."),
    "pt": ("Portuguese", ("português",), "O tempo está bom hoje."),
    "nl": ("Dutch", (), "Het weer is mooi vandaag."),
    "ru": ("Russian", (), "Сегодня хорошая погода."),
    "ja": ("Japanese", (), "今日は天気がいいです。"),
    "ko": ("Korean", (), "오늘은 날씨가 좋습니다."),
    "ar": ("Arabic", (), "الطقس جميل اليوم."),
    "hi": ("Hindi", (), "आज मौसम अच्छा है।"),
}


def language(name: str) -> tuple[str, str]:
    """(code, English name) of a language given by code or name; a clear error for unknown ones."""
    key = name.strip().lower()
    for code, (english, others, _) in LANGUAGES.items():
        if key in (code, english.lower(), *others):
            return code, english
    known = ", ".join(f"{c} ({v[0]})" for c, v in LANGUAGES.items())
    raise GPT4Error(f"Unknown language '{name}'. Known languages: {known}.")


def tokens_per_char(model, code: str) -> float:
    """How many tokens the model's tokenizer spends per character of a sample sentence in the language:
    above ~1 the vocabulary has no words of it (bytes only), a sign the model never learned it."""
    sample = LANGUAGES[code][2]
    return len(model.tokenizer.encode(sample, add_special_tokens=False)) / len(sample)


def translate(model, text: str, to: str, source: str | None = None, **gen) -> Iterator[str]:
    """Stream the translation of `text` into language `to`, paragraph by paragraph (blank lines kept)."""
    _check_text(text, "text to translate")
    _, target = language(to)
    src = f" from {language(source)[1]}" if source else ""
    paragraphs = re.split(r"\n\s*\n", text.strip())
    user_budget = gen.pop("max_new_tokens", None)
    for i, para in enumerate(paragraphs):
        if i:
            yield "\n\n"
        messages = [{"role": "system", "content": f"You are a professional translator. Translate the user's text"
                                                  f"{src} into {target}. Reply with the {target} translation "
                                                  "only, no notes."},
                    {"role": "user", "content": f"Translate into {target}:\n\n{para.strip()}"}]
        budget = user_budget or 3 * len(model.tokenizer.encode(para)) + 32
        yield from chat(model, messages, max_new_tokens=budget, **gen)


# ---- summarize -------------------------------------------------------------------------------------
LENGTHS = {"short": ("in one or two sentences", 80), "medium": ("in one short paragraph", 160),
           "long": ("in a few paragraphs", 320)}


def _split_tokens(model, text: str, max_tokens: int) -> list[str]:
    """Consecutive parts of `text` of at most ~max_tokens tokens, cut at paragraph, then sentence, bounds."""
    pieces = [p for para in re.split(r"\n\s*\n", text) for p in re.split(r"(?<=[.!?])\s+", para.strip()) if p]
    parts, current, size = [], [], 0
    for piece in pieces:
        n = len(model.tokenizer.encode(piece, add_special_tokens=False))
        if n > max_tokens:  # one huge "sentence": cut it by words
            words = piece.split()
            step = max(1, len(words) * max_tokens // n)
            pieces_of = [" ".join(words[i:i + step]) for i in range(0, len(words), step)]
        else:
            pieces_of = [piece]
        for p in pieces_of:
            m = len(model.tokenizer.encode(p, add_special_tokens=False)) if len(pieces_of) > 1 else n
            if current and size + m > max_tokens:
                parts.append(" ".join(current))
                current, size = [], 0
            current.append(p)
            size += m
    if current:
        parts.append(" ".join(current))
    return parts


def _summary_messages(text: str, length: str, bullets: bool, combining: bool) -> list[dict]:
    how, _ = LENGTHS[length]
    form = "as 3 to 5 bullet points starting with '- '" if bullets else "as prose"
    what = "these partial summaries of one document into one summary" if combining else "the following text"
    return [{"role": "system", "content": "You write faithful summaries. Keep the key names of people, places, "
                                          "organizations and numbers. Never add facts that are not in the text."},
            {"role": "user", "content": f"Summarize {what} {how}, {form}.\n\nText:\n{text.strip()}"}]


def summarize(model, text: str, length: str = "medium", bullets: bool = False, part_tokens: int | None = None,
              progress: bool = True, **gen) -> Iterator[str]:
    """Stream a summary. Text longer than one part (default: what fits the context, at most 1500 tokens) is
    split, each part summarized (progress bar), and the part summaries combined (repeatedly if needed)."""
    _check_text(text, "text to summarize")
    if length not in LENGTHS:
        raise GPT4Error(f"--length must be one of {', '.join(LENGTHS)}, not '{length}'.")
    max_new = gen.pop("max_new_tokens", None) or LENGTHS[length][1]
    room = model.config.max_position_embeddings - max_new - 128  # 128: the prompt's own tokens
    part_tokens = min(part_tokens or 1500, room)
    if part_tokens < 64:
        raise GPT4Error(f"This model's context ({model.config.max_position_embeddings} tokens) is too short "
                        "to summarize with this --length.")
    combining = False
    while True:
        parts = _split_tokens(model, text, part_tokens)
        if len(parts) == 1:
            yield from chat(model, _summary_messages(parts[0], length, bullets, combining), max_new_tokens=max_new,
                            **gen)
            return
        summaries = ["".join(chat(model, _summary_messages(p, "short", False, False), max_new_tokens=120, **gen))
                     for p in tqdm(parts, desc="summarizing parts", unit="part", disable=not progress)]
        text, combining = "\n\n".join(s.strip() for s in summaries), True


# ---- ask -------------------------------------------------------------------------------------------
STOPWORDS = set("""a an the of to in on at for and or but is are was were be been being do does did what which who
whom whose when where why how that this these those it its as by with from about into than then there their they
he she his her we you your i me my our not no yes can could would should will shall may might must has have had
""".split())


@dataclass
class Passage:
    source: str
    line: int
    text: str
    score: float = 0.0


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"\w+", text.lower()) if w not in STOPWORDS]


def passages(documents: list[tuple[str, str]], max_words: int = 120) -> list[Passage]:
    """Paragraphs of each (name, text) document, long ones cut into windows of `max_words` words."""
    out = []
    for name, text in documents:
        line = 1
        for block in re.split(r"(\n\s*\n)", text):
            if block.strip() and not re.fullmatch(r"\n\s*\n", block):
                words = block.split()
                for i in range(0, len(words), max_words):
                    out.append(Passage(name, line + block[:len(block) - len(block.lstrip())].count("\n"),
                                       " ".join(words[i:i + max_words])))
            line += block.count("\n")
    return out


def retrieve(question: str, pool: list[Passage], top_k: int = 3, k1: float = 1.5, b: float = 0.75) -> list[Passage]:
    """BM25 ranking of the passages against the question; passages sharing no content word are dropped."""
    query = set(_words(question))
    docs = [Counter(_words(p.text)) for p in pool]
    if not pool or not query:
        return []
    avg = sum(sum(d.values()) for d in docs) / len(docs) or 1.0
    df = {w: sum(1 for d in docs if w in d) for w in query}
    scored = []
    for p, d in zip(pool, docs):
        length = sum(d.values())
        s = sum(math.log(1 + (len(docs) - df[w] + 0.5) / (df[w] + 0.5)) * d[w] * (k1 + 1)
                / (d[w] + k1 * (1 - b + b * length / avg)) for w in query if d[w])
        if s > 0:
            scored.append(Passage(p.source, p.line, p.text, s))
    return sorted(scored, key=lambda p: -p.score)[:top_k]


NOT_FOUND = "The documents do not contain the answer to this question."


def ask(model, question: str, documents: list[tuple[str, str]] | None = None, n_passages: int = 3,
        **gen) -> tuple[list[Passage], Iterator[str]]:
    """(the passages the answer is grounded in, a stream of the answer). With documents and no relevant
    passage, the stream says so without asking the model."""
    _check_text(question, "question")
    if not documents:
        messages = [{"role": "user", "content": question.strip()}]
        return [], chat(model, messages, **{"max_new_tokens": 256, **gen})
    for name, text in documents:
        _check_text(text, f"document {name}")
    found = retrieve(question, passages(documents), n_passages)
    if not found:
        return [], iter([NOT_FOUND])
    context = "\n\n".join(f"[{i + 1}] {p.text}" for i, p in enumerate(found))
    messages = [{"role": "system", "content": "Answer the question using only the numbered passages. Be brief "
                                              "and cite the passage number like [1]. If the passages do not "
                                              f"contain the answer, reply exactly: {NOT_FOUND}"},
                {"role": "user", "content": f"Passages:\n{context}\n\nQuestion: {question.strip()}"}]
    return found, chat(model, messages, **{"max_new_tokens": 128, **gen})


# ---- code ------------------------------------------------------------------------------------------
SQUARE = {"python": "```python\ndef square(x):\n    return x * x\n```",
          "javascript": "```javascript\nfunction square(x) {\n  return x * x;\n}\n```"}


def code(model, task: str, lang: str = "python", with_tests: bool = False, **gen) -> Iterator[str]:
    """Stream the model's reply: one code block in `lang`."""
    _check_text(task, "task")
    extra = " After the code, add a few assert statements that check it." if with_tests and lang == "python" else ""
    messages = [{"role": "system", "content": f"You are an expert {lang} programmer. Reply with one ```{lang} "
                                              f"code block of complete, working code and nothing else.{extra}"},
                # One worked example: small models copy its shape (names from the task, a bare code block).
                {"role": "user", "content": "Write a function named square(x) that returns x squared."},
                {"role": "assistant", "content": SQUARE.get(lang, SQUARE["python"])},
                {"role": "user", "content": task.strip()}]
    # The reply is started for the model with the opening fence: even a small model then writes code at once.
    fence = f"```{lang}\n"
    ids = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids += model.tokenizer.encode(fence, add_special_tokens=False)
    yield fence
    stops = ["```", *(gen.pop("stop_strings", None) or [])]
    yield from stream(model, ids, **{**DEFAULTS, "max_new_tokens": 384, **gen, "stop_strings": stops})
    yield "\n```"


def extract_code(reply: str, lang: str = "python") -> str:
    """The first fenced code block of the reply (an unclosed one counts); the whole reply if none."""
    m = re.search(r"```[\w+#-]*[^\n]*\n(.*?)(?:```|$)", reply, flags=re.DOTALL)
    return (m.group(1) if m else reply).strip("\n") + "\n"


def check_syntax(source: str) -> str | None:
    """None if the Python source parses, else the syntax error."""
    try:
        ast.parse(source)
    except SyntaxError as e:
        return f"line {e.lineno}: {e.msg}"
    return None


def run_code(source: str, tests: str = "", lang: str = "python", limits: Limits | None = None) -> SandboxResult:
    """Run the code (then the tests) in the sandbox. Only Python can be run."""
    if lang != "python":
        raise GPT4Error(f"--test can run Python only, not {lang}.")
    return run_python(source + ("\n\n" + tests if tests else ""), limits or Limits())
