"""JSON mode: a character-level recogniser of JSON-object prefixes, used to mask candidate tokens.

`response_format={"type": "json_object"}` must produce valid JSON. The engine keeps, per sequence, the state of
a small pushdown automaton for RFC 8259 and lets the model choose only among tokens whose text keeps the output a
prefix of one JSON object; once the object is closed only EOS is allowed. The output is then valid JSON unless
max_tokens cuts it (finish_reason "length", as with OpenAI).
"""

from __future__ import annotations

WHITESPACE = " \t\n\r"
MAX_WHITESPACE_RUN = 24  # stops a model from padding forever with blank lines
NUMBER_END = {"zero", "int", "frac", "exp"}  # number states in which the number may end


def token_texts(tokenizer, special_ids: set[int]) -> list[str | None]:
    """Each token's text, or None for tokens JSON mode never emits (special tokens, partial UTF-8, empty)."""
    texts: list[str | None] = []
    for i in range(tokenizer.vocab_size):
        t = tokenizer.decode([i])
        texts.append(None if i in special_ids or not t or "\ufffd" in t else t)
    return texts


class JSONPrefix:
    """State after reading a prefix of one JSON object. `accepts(text)` checks, `feed(text)` advances."""

    __slots__ = ("stack", "state", "rest", "ws", "hex")

    def __init__(self):
        self.stack: list[str] = []  # open containers: "{" or "["
        self.state = "start"
        self.rest = ""  # remaining letters of true/false/null
        self.ws = 0  # current run of whitespace outside strings
        self.hex = 0  # \\u digits still expected

    @property
    def done(self) -> bool:
        return self.state == "done"

    def copy(self) -> "JSONPrefix":
        c = JSONPrefix.__new__(JSONPrefix)
        c.stack, c.state, c.rest, c.ws, c.hex = list(self.stack), self.state, self.rest, self.ws, self.hex
        return c

    def accepts(self, text: str | None) -> bool:
        return text is not None and self.copy().feed(text)

    def feed(self, text: str) -> bool:
        """Advance over text; False (state undefined) if it leaves the JSON grammar."""
        return all(self._char(c) for c in text)

    # ---- the automaton -------------------------------------------------------------------------------
    def _value_done(self) -> None:
        self.state = "after" if self.stack else "done"

    def _char(self, c: str) -> bool:
        s = self.state
        if s in ("string", "key"):
            if c == '"':
                if s == "key":
                    self.state = "colon"
                else:
                    self._value_done()
            elif c == "\\":
                self.state = "escape_" + s
            elif ord(c) < 0x20:
                return False
            return True
        if s.startswith("escape_"):
            inside = s[len("escape_"):]
            if c == "u":
                self.state, self.hex = "hex_" + inside, 4
                return True
            self.state = inside
            return c in '"\\/bfnrt'
        if s.startswith("hex_"):
            if c not in "0123456789abcdefABCDEF":
                return False
            self.hex -= 1
            if self.hex == 0:
                self.state = s[len("hex_"):]
            return True
        if s == "literal":
            if not self.rest or c != self.rest[0]:
                return False
            self.rest = self.rest[1:]
            if not self.rest:
                self._value_done()
            return True
        if s in ("minus", "zero", "int", "frac0", "frac", "exp0", "exp_sign", "exp"):
            nxt = self._number(s, c)
            if nxt is not None:
                self.state = nxt
                return True
            if s not in NUMBER_END:
                return False
            self._value_done()  # the number ended; this character belongs to what follows
            return self._char(c)
        if c in WHITESPACE:
            self.ws += 1
            return self.ws <= MAX_WHITESPACE_RUN
        self.ws = 0
        if s == "start":
            if c != "{":
                return False
            self.stack.append("{")
            self.state = "object_first"
            return True
        if s in ("object_first", "object_key"):
            if c == '"':
                self.state = "key"
                return True
            if c == "}" and s == "object_first":
                return self._close("{")
            return False
        if s == "colon":
            if c == ":":
                self.state = "value"
                return True
            return False
        if s in ("value", "array_first"):
            if c == "]" and s == "array_first":
                return self._close("[")
            return self._open_value(c)
        if s == "after":
            if c == ",":
                self.state = "object_key" if self.stack[-1] == "{" else "value"
                return True
            if c in "}]":
                return self._close("{" if c == "}" else "[")
            return False
        return False  # "done": nothing but whitespace may follow

    def _open_value(self, c: str) -> bool:
        if c == "{":
            self.stack.append("{")
            self.state = "object_first"
        elif c == "[":
            self.stack.append("[")
            self.state = "array_first"
        elif c == '"':
            self.state = "string"
        elif c == "-":
            self.state = "minus"
        elif c == "0":
            self.state = "zero"
        elif c in "123456789":
            self.state = "int"
        elif c in "tfn":
            self.state, self.rest = "literal", {"t": "rue", "f": "alse", "n": "ull"}[c]
        else:
            return False
        return True

    def _close(self, opener: str) -> bool:
        if not self.stack or self.stack[-1] != opener:
            return False
        self.stack.pop()
        self._value_done()
        return True

    @staticmethod
    def _number(s: str, c: str) -> str | None:
        """The next number state after c, or None if c does not continue the number."""
        digit = c.isascii() and c.isdigit()
        if s == "minus":
            return "zero" if c == "0" else ("int" if digit else None)
        if s in ("zero", "int"):
            if digit and s == "int":
                return "int"
            return "frac0" if c == "." else ("exp0" if c in "eE" else None)
        if s in ("frac0", "frac"):
            if digit:
                return "frac"
            return "exp0" if c in "eE" and s == "frac" else None
        if s == "exp0":
            return "exp_sign" if c in "+-" else ("exp" if digit else None)
        return "exp" if digit else None  # exp_sign, exp
