"""Generation: GenerationConfig (transformers' field names), the decode loop as an iterator, and generate().

The loop prefills all prompts of a batch at once (right-padded, each row at its own positions in the KV cache),
then decodes one token per row per step. Every row stops on its own (EOS, stop string, length). One sequence with
prompt_lookup_num_tokens set decodes several tokens a step where drafts copied from its text are right
(gpt4.generation.lookup), with the same tokens as one at a time (greedy) or the same distribution (sampling).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..errors import GenerationSettingError, GPT4Error
from .lookup import MAX_NGRAM, MIN_NGRAM, PromptLookup
from .sampling import apply_penalties, choose, verify_draft, warp

@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    max_length: int | None = None  # prompt + new tokens; max_new_tokens wins when both are set
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    stop_strings: list[str] | str | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    seed: int | None = None
    num_return_sequences: int = 1
    # Speculative decoding by prompt lookup (transformers' names): check up to this many tokens copied from the
    # text after the latest earlier occurrence of its last 2..max_matching_ngram_size tokens. One sequence only.
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int = MAX_NGRAM

    def __post_init__(self):
        checks = [
            ("max_new_tokens", self.max_new_tokens is None or self.max_new_tokens >= 0, "must be >= 0"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k is None or self.top_k >= 0, "must be >= 0"),
            ("min_p", self.min_p is None or 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("num_return_sequences", self.num_return_sequences >= 1, "must be >= 1"),
            ("prompt_lookup_num_tokens", self.prompt_lookup_num_tokens is None or self.prompt_lookup_num_tokens >= 0,
             "must be >= 0"),
            ("max_matching_ngram_size", self.max_matching_ngram_size >= MIN_NGRAM, f"must be >= {MIN_NGRAM}"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise GenerationSettingError(f"GenerationConfig.{name}={getattr(self, name)!r} {rule}.")
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        if self.stop_strings and any(not s for s in self.stop_strings):  # "" is in every text: nothing would come out
            raise GenerationSettingError(f"GenerationConfig.stop_strings={self.stop_strings!r} must not contain an "
                                         "empty string.")
        if self.temperature == 0:  # OpenAI convention: temperature 0 means greedy
            self.do_sample, self.temperature = False, 1.0

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else (list(e) if isinstance(e, (list, tuple)) else [e])

    def update(self, **kwargs) -> "GenerationConfig":
        unknown = set(kwargs) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"Unknown generation arguments: {', '.join(sorted(unknown))}.")
        return dataclasses.replace(self, **kwargs)

    @classmethod
    def for_model(cls, config, tokenizer=None, folder: Path | None = None) -> "GenerationConfig":
        """Defaults from the model: its EOS ids (config, tokenizer, generation_config.json) and pad id."""
        eos = list(config.eos_token_ids)
        values = {}
        if folder is not None and (folder / "generation_config.json").is_file():
            saved = json.loads((folder / "generation_config.json").read_text())
            known = {f.name for f in dataclasses.fields(cls)}
            values = {k: v for k, v in saved.items() if k in known and k not in ("eos_token_id", "pad_token_id")}
            extra = saved.get("eos_token_id")
            eos += extra if isinstance(extra, list) else ([extra] if extra is not None else [])
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        eos = list(dict.fromkeys(eos))
        pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
        return cls(eos_token_id=eos or None, pad_token_id=pad, **values)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        Path(folder, "generation_config.json").write_text(json.dumps(out, indent=2) + "\n")


@dataclass
class Row:
    """One sequence being generated."""
    prompt: list[int]
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"


def _stop_string_hit(tokenizer, row: Row, stop_strings: list[str]) -> bool:
    # Decode only a tail long enough to contain any stop string (a token is at least one character).
    tail = tokenizer.decode(row.generated[-(max(map(len, stop_strings)) + 8):])
    return any(s in tail for s in stop_strings)


def check_prompts(model, prompts: list[list[int]]) -> int:
    """The longest prompt's length; GPT4Error where a prompt is empty or leaves no room in the model's context."""
    if any(len(p) == 0 for p in prompts):
        raise GPT4Error("Cannot generate from an empty prompt: give at least one token.")
    context = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise GPT4Error(f"The prompt is {longest} tokens; this model's context is {context} tokens. "
                        "Shorten the prompt.")
    return longest


@torch.inference_mode()
def generate_tokens(model, prompts: list[list[int]], config: GenerationConfig,
                    tokenizer=None) -> Iterator[list[int | None]]:
    """Yield, per decode step, the new token of each row (None for rows already finished)."""
    rows = [Row(list(p)) for p in prompts]
    longest = check_prompts(model, prompts)
    context = model.config.max_position_embeddings
    budget = config.max_new_tokens if config.max_new_tokens is not None else (config.max_length or context) - longest
    budget = max(0, min(budget, context - longest))
    if budget == 0:
        return
    if config.stop_strings and tokenizer is None:
        raise GPT4Error("stop_strings need a tokenizer; load the model with its tokenizer.")
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    B, V, device = len(rows), model.config.vocab_size, model.device
    cache = model.new_cache(B, longest + budget)

    # Bookkeeping for penalties: which tokens each row has seen, and how often it generated each.
    seen = counts = None
    if config.repetition_penalty != 1.0:
        seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            seen[i, torch.tensor(r.prompt, device=device)] = True
    if config.presence_penalty or config.frequency_penalty:
        counts = torch.zeros(B, V, device=device)

    # Prefill: right-padded prompts, processed in chunks; keep each row's last real hidden state.
    lengths = torch.tensor([len(r.prompt) for r in rows], device=device)
    ids = torch.full((B, longest), config.pad_token_id or 0, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, :len(r.prompt)] = torch.tensor(r.prompt)
    positions = torch.arange(longest, device=device).expand(B, longest)
    last_hidden = torch.zeros(B, model.config.hidden_size, dtype=model.dtype, device=device)
    chunk = model.prefill_chunk
    for start in range(0, longest, chunk):
        stop = min(start + chunk, longest)
        h = model.hidden_states(ids[:, start:stop], positions[:, start:stop], cache, kv_length=stop)
        in_chunk = (lengths - 1 >= start) & (lengths - 1 < stop)
        idx = (lengths - 1 - start).clamp(0, stop - start - 1)
        last_hidden = torch.where(in_chunk[:, None], h[torch.arange(B), idx], last_hidden)
    logits = model.lm_head(last_hidden).float()  # (B, V)

    if config.prompt_lookup_num_tokens and B == 1:
        yield from _decode_with_lookup(model, rows[0], logits, cache, len(rows[0].prompt), budget, config, tokenizer,
                                       seen, counts, generator)
        return
    position = lengths.clone()  # where each row's next token goes
    active = torch.ones(B, dtype=torch.bool, device=device)
    for step in range(budget):
        next_ids = choose(_scores(logits, seen, counts, config), config.do_sample, generator)  # (B,)
        out: list[int | None] = []
        for i, r in enumerate(rows):
            if not active[i]:
                out.append(None)
                continue
            token = int(next_ids[i])
            out.append(token)
            if _add_token(r, token, step == budget - 1, config, tokenizer):
                active[i] = False
        yield out
        if not active.any() or step == budget - 1:
            return
        if seen is not None:
            seen[torch.arange(B), next_ids] = True
        if counts is not None:
            counts[torch.arange(B), next_ids] += active.float()
        logits = model.decode_logits(next_ids[:, None], position[:, None], cache, kv_length=longest + step + 1)
        position += 1


def _scores(logits, seen, counts, config: GenerationConfig) -> torch.Tensor:
    """Logits (B, V) as the next token is chosen from them: penalised, and warped when sampling."""
    logits = apply_penalties(logits, seen, counts, config.repetition_penalty, config.presence_penalty,
                             config.frequency_penalty, config.logit_bias)
    if config.do_sample:
        logits = warp(logits, config.temperature, config.top_k, config.top_p, config.min_p)
    return logits


def _add_token(row: Row, token: int, last: bool, config: GenerationConfig, tokenizer) -> bool:
    """Append a generated token to a row; whether the row is finished (EOS or stop string; 'length' when last)."""
    row.generated.append(token)
    if token in config.eos_ids or (config.stop_strings and _stop_string_hit(tokenizer, row, config.stop_strings)):
        row.finish_reason = "stop"
        return True
    if last:
        row.finish_reason = "length"
    return False


def _decode_with_lookup(model, row: Row, logits, cache, position: int, budget: int, config: GenerationConfig,
                        tokenizer, seen, counts, generator) -> Iterator[list[int]]:
    """generate_tokens' loop for one sequence, with prompt lookup: each step feeds the newest token and a draft
    of up to prompt_lookup_num_tokens copied ones at the following positions, and keeps the draft's leading tokens
    that the model's own choice agrees with (verify_draft), plus the model's token after them. A draft's refused
    tokens leave keys in cache slots past the sequence, which later steps overwrite before attending to them.

    position: the cache slot of the next token; logits (1, V) for it, from the prompt.
    """
    lookup = PromptLookup(row.prompt, config.max_matching_ngram_size)
    chosen = [int(choose(_scores(logits, seen, counts, config), config.do_sample, generator)[0])]
    while True:
        for token in chosen:  # a step's kept draft tokens, then the model's own next token
            finished = _add_token(row, token, len(row.generated) + 1 == budget, config, tokenizer)
            yield [token]
            if finished or len(row.generated) == budget:
                return
            _note_generated(seen, counts, token)
            lookup.append(token)
        # chosen[-1] is the only token not in the cache yet; the draft goes in the slots after it. Kept whole, the
        # draft and the model's token after it fill the budget at most, so every check leaves the cache (which ends
        # at the budget's last token) a slot to spare: compiled checks then see one relation of their sizes.
        draft = lookup.draft(min(config.prompt_lookup_num_tokens, budget - len(row.generated) - 1))
        ids = torch.tensor([[chosen[-1], *draft]], device=model.device)  # (1, 1 + n)
        positions = torch.arange(position, position + ids.shape[1], device=model.device)[None]
        if draft:  # (1 + n, V): after the token and after each draft token
            logits = model.verify_logits(ids, positions, cache, kv_length=position + ids.shape[1])
        else:
            logits = model.decode_logits(ids, positions, cache, kv_length=position + 1)  # (1, V)
        # Row j of the scores comes after the draft's first j tokens: there they count as seen and generated.
        scores = _scores(logits, _after_draft(seen, draft), _after_draft(counts, draft), config)
        kept, next_token = verify_draft(scores, draft, config.do_sample, generator)
        chosen = draft[:kept] + [next_token]
        position += 1 + kept


def _note_generated(seen, counts, token: int) -> None:
    """Penalty bookkeeping of one sequence (seen, counts (1, V) or None) after it generated a token."""
    if seen is not None:
        seen[0, token] = True
    if counts is not None:
        counts[0, token] += 1


def _after_draft(state, draft: list[int]):
    """seen or counts (1, V) -> (1 + n, V): row j as it would be after the draft's first j tokens were generated."""
    if state is None or not draft:
        return state
    rows = state.repeat(len(draft) + 1, 1)
    for j, token in enumerate(draft):
        if rows.dtype == torch.bool:
            rows[j + 1:, token] = True
        else:
            rows[j + 1:, token] += 1
    return rows


def warm_up_decode(model, batch_size: int = 8, lookup: int = 0) -> None:
    """Run a few decode steps for one sequence and for a batch, and with lookup > 0 a check of a draft of that many
    tokens: compiles the graphs of a compiled model now rather than during the first requests. The batch graph
    serves any number of rows, the check any number of tokens; under max-autotune their kernels are timed at
    batch_size rows and lookup + 1 tokens."""
    config = GenerationConfig(max_new_tokens=3, eos_token_id=None)
    for prompts in ([[0, 1]], [[0, 1]] * (batch_size - 1) + [[0]]):
        for _ in generate_tokens(model, prompts, config):
            pass
    if lookup:
        with torch.inference_mode():
            warm_up_check(model, model.new_cache(1, 2 * (lookup + 2)), lookup)


def warm_up_check(model, cache, lookup: int) -> None:
    """Check a draft of `lookup` tokens in slots 1.. of the cache's first row (slots past a sequence are overwritten
    before they are read): compiles the check of a compiled model now. The cache must be longer than the check's
    lookup + 2 slots, as when generating: a check that fills it is another size relation, compiled again."""
    assert cache.max_length > lookup + 2, (cache.max_length, lookup)
    ids, positions = torch.zeros(1, lookup + 1, dtype=torch.long), torch.arange(1, lookup + 2)[None]
    model.verify_logits(ids, positions, cache.rows(0, 1), kv_length=lookup + 2)


def _prepare(model, inputs, attention_mask, tokenizer):
    """Normalise inputs to (prompts as id lists, kind) where kind is 'text', 'texts' or 'tensor'."""
    if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and all(isinstance(s, str) for s in inputs)):
        if tokenizer is None:
            raise GPT4Error("This model has no tokenizer; pass token ids (a tensor) instead of text.")
        texts = [inputs] if isinstance(inputs, str) else inputs
        return [tokenizer.encode(t) for t in texts], ("text" if isinstance(inputs, str) else "texts")
    if isinstance(inputs, torch.Tensor):
        ids = inputs if inputs.dim() == 2 else inputs[None]
        if attention_mask is None:
            return [row.tolist() for row in ids], "tensor"
        return [row[m.bool()].tolist() for row, m in zip(ids, attention_mask)], "tensor"
    raise TypeError(f"generate() takes a str, a list of str or a LongTensor of ids, got {type(inputs).__name__}.")


def generate(model, inputs=None, generation_config: GenerationConfig | None = None, *, attention_mask=None,
             streamer=None, input_ids=None, **kwargs):
    """transformers-compatible generate.

    * tensor (B, S) of ids -> LongTensor (B * num_return_sequences, S + new) = prompt + new ids, finished rows
      padded with pad_token_id (as transformers does);
    * str -> the generated text; list of str -> list of generated texts.
    """
    inputs = input_ids if inputs is None else inputs
    config = (generation_config or model.generation_config or GenerationConfig()).update(**kwargs)
    tokenizer = model.tokenizer
    prompts, kind = _prepare(model, inputs, attention_mask, tokenizer)
    prompts = [p for p in prompts for _ in range(config.num_return_sequences)]
    new = [[] for _ in prompts]
    for step in generate_tokens(model, prompts, config, tokenizer):
        for i, token in enumerate(step):
            if token is not None:
                new[i].append(token)
        if streamer is not None:
            streamer.put(step)
    if streamer is not None:
        streamer.end()
    if kind == "tensor":
        ids = inputs if inputs.dim() == 2 else inputs[None]
        ids = ids.repeat_interleave(config.num_return_sequences, dim=0)
        width = max((len(n) for n in new), default=0)
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        tail = torch.full((ids.shape[0], width), pad, dtype=ids.dtype)
        for i, n in enumerate(new):
            tail[i, :len(n)] = torch.tensor(n, dtype=ids.dtype)
        return torch.cat([ids, tail], dim=1)
    texts = [_finish_text(tokenizer, n, config) for n in new]
    return texts[0] if kind == "text" and len(texts) == 1 else texts


def _finish_text(tokenizer, ids: list[int], config: GenerationConfig) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for s in config.stop_strings or []:
        cut = text.find(s)
        if cut != -1:
            text = text[:cut]
    return text


def stream(model, prompt: str | list[int], generation_config: GenerationConfig | None = None,
           **kwargs) -> Iterator[str]:
    """Yield text pieces as they are generated (one prompt). Stop strings are never emitted."""
    from ..tokenizer import IncrementalDecoder

    config = (generation_config or model.generation_config or GenerationConfig()).update(**kwargs)
    tokenizer = model.tokenizer
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    decoder = IncrementalDecoder(tokenizer)
    stops = config.stop_strings or []
    hold = max(map(len, stops), default=1) - 1  # chars held back: they may be the start of a stop string
    pending = ""
    for step in generate_tokens(model, [ids], config, tokenizer):
        pending += decoder.push(step[0])
        cut = min((i for i in (pending.find(s) for s in stops) if i != -1), default=-1)
        if cut != -1:
            if pending[:cut]:
                yield pending[:cut]
            return
        if len(pending) > hold:
            yield pending[:len(pending) - hold]
            pending = pending[len(pending) - hold:]
    if pending:
        yield pending
