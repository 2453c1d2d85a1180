"""A multi-turn chat session: history, the model's chat template, streaming replies, context management."""

from __future__ import annotations

from typing import Iterator

from .generation import stream


class ChatSession:
    def __init__(self, model, system: str | None = None, **generation_kwargs):
        self.model, self.generation_kwargs = model, generation_kwargs
        self.system = [{"role": "system", "content": system}] if system else []
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history.clear()

    def prompt_ids(self) -> list[int]:
        """The conversation rendered with the model's template, oldest turns dropped to leave room to reply."""
        budget = self.model.config.max_position_embeddings - self.generation_kwargs.get("max_new_tokens", 256)
        render = lambda: self.model.tokenizer.apply_chat_template(  # noqa: E731
            self.system + self.history, add_generation_prompt=True)
        ids = render()
        while len(ids) > budget and len(self.history) > 1:
            self.history.pop(0)  # forget the oldest turn; the system prompt stays
            ids = render()
        return ids

    def send(self, text: str) -> Iterator[str]:
        """Add a user turn and stream the reply; the reply (even a stopped one) joins the history."""
        self.history.append({"role": "user", "content": text})
        reply = {"role": "assistant", "content": ""}
        ids = self.prompt_ids()
        self.history.append(reply)
        for piece in stream(self.model, ids, **self.generation_kwargs):
            reply["content"] += piece
            yield piece
