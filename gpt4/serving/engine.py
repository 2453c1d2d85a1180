"""The serving engine: one thread owns the model and runs continuous batching.

Every sequence (one choice of one request) holds a row of a shared KV cache. Between decode steps finished and
cancelled sequences leave (the last row moves into the hole, so active rows stay 0..n-1) and waiting requests
join: their prompts are prefilled together into the free rows, right-padded, each token at its own position.
The cache grows (doubling) only when a row reaches its end, and is dropped when the engine goes idle.

A step: every row picks its next token with its own sampling parameters and seeded generator, turns it into text
(holding back what could be the start of a stop string), then one forward pass decodes all rows at once.
Results go back through each request's `emit` callback, called on the engine thread.

With prompt_lookup > 0, a sequence running alone (not in JSON mode) decodes as gpt4.generation does with
prompt_lookup_num_tokens: its forward pass also checks a draft copied from its text, and the next step picks a token
for each of the draft's positions in turn until one differs from the draft.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..cache import KVCache
from ..generation import warm_up_check
from ..generation.lookup import MAX_NGRAM, PromptLookup
from ..generation.sampling import apply_penalties, choose, choose_over_draft, warp
from ..tokenizer import IncrementalDecoder
from ..weights import return_freed_memory
from .jsonmode import JSONPrefix, token_texts

log = logging.getLogger("gpt4.serving")
PREFILL_TOKENS_PER_STEP = 2048  # padded prompt tokens prefilled between two decode steps (bounds the stall)
# An engine idle this long gives its KV cache's memory back to the OS. Not at once: making the cache again costs the
# next request's first token ~40 ms (the default model, 16 rows, --aot's fp32 cache: 189 MB of fresh pages, zeroed).
IDLE_RELEASE_S = 30.0
JSON_CANDIDATES = 64  # candidates checked against the JSON grammar per round, best first


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False  # also score the prompt's own tokens (completions with echo and logprobs)
    json_mode: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_p == 0


@dataclass
class TokenInfo:
    """One token for logprobs: its id, logprob and the top alternatives (None for a prompt's first token,
    which nothing predicts)."""
    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None


@dataclass
class PromptLogprobs:
    """The prompt's tokens scored by the model, sent once after the prefill (before any Delta)."""
    tokens: list[TokenInfo]


@dataclass
class Delta:
    index: int
    text: str
    tokens: list[TokenInfo]


@dataclass
class Finish:
    index: int
    reason: str  # "stop", "length", or "cancelled" (the request was cancelled)
    completion_tokens: int


@dataclass
class Failed:
    message: str


class QueueFull(Exception):
    pass


class Draining(Exception):
    pass


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[object], None]
    n: int = 1
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled = True  # read by the engine thread at the next step


class Sequence:
    """One choice being generated: sampling state, text decoding and stop-string hold-back."""

    def __init__(self, request: Request, index: int, tokenizer, vocab_size: int, prompt_lookup: bool = False):
        p = request.params
        self.request, self.index, self.position = request, index, len(request.prompt)
        seed = p.seed if p.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed((seed * 1000003 + index) % 2**63)  # choices of one seed differ
        self.decoder = IncrementalDecoder(tokenizer)
        self.generated: list[int] = []
        self.pending = ""  # decoded text not yet emitted (may start a stop string)
        self.pending_tokens: list[tuple[TokenInfo, int]] = []  # (info, characters of text it produced)
        self.seen = self.counts = None
        if p.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool)
            self.seen[0, torch.tensor(request.prompt)] = True
        if p.presence_penalty or p.frequency_penalty:
            self.counts = torch.zeros(1, vocab_size)
        self.json = JSONPrefix() if p.json_mode else None
        # Drafts for prompt lookup (JSON mode picks among the tokens its grammar allows: no drafts)
        self.lookup = PromptLookup(request.prompt, MAX_NGRAM) if prompt_lookup and self.json is None else None
        self.logits: torch.Tensor | None = None  # (V,) scores for the next token; (1 + n, V) after a draft
        self.draft: list[int] = []  # the draft checked by the last forward pass
        self.finish_reason: str | None = "length" if p.max_tokens == 0 else None

    def record(self, token: int) -> None:
        self.generated.append(token)
        if self.lookup is not None:
            self.lookup.append(token)
        if self.seen is not None:
            self.seen[0, token] = True
        if self.counts is not None:
            self.counts[0, token] += 1

    def push_text(self, piece: str, info: TokenInfo | None) -> None:
        """Add a token's text; emit what can no longer be part of a stop string; finish on a stop string."""
        self.pending += piece
        if info is not None:
            self.pending_tokens.append((info, len(piece)))
        stops = self.request.params.stop
        cut = min((i for i in (self.pending.find(s) for s in stops) if i != -1), default=-1)
        if cut != -1:
            self.finish_reason = "stop"
            self._release(cut, drop_rest=True)
            return
        hold = max((k for s in stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        self._release(len(self.pending) - hold)

    def flush(self) -> None:
        """Emit everything held back (the sequence ended without a stop string in the held text)."""
        text, tokens = self.pending, [info for info, _ in self.pending_tokens]
        self.pending, self.pending_tokens = "", []
        if text or tokens:
            self.request.emit(Delta(self.index, text, tokens))

    def _release(self, chars: int, drop_rest: bool = False) -> None:
        """Emit the first `chars` held characters with the tokens that produced them; drop_rest: a stop string."""
        text, self.pending = self.pending[:chars], self.pending[chars:]
        tokens, used = [], 0
        if drop_rest:  # the text ends at a stop string: tokens that produced any of the kept text go out
            while self.pending_tokens and used < chars:
                info, n = self.pending_tokens.pop(0)
                tokens.append(info)
                used += n
            self.pending_tokens.clear()
            self.pending = ""
        else:  # a token goes out once all of its characters have (tokens of no text ride along)
            while self.pending_tokens and used + self.pending_tokens[0][1] <= chars:
                info, n = self.pending_tokens.pop(0)
                tokens.append(info)
                used += n
            if self.pending_tokens and used < chars:
                info, n = self.pending_tokens[0]
                self.pending_tokens[0] = (info, n - (chars - used))
        if text or tokens:
            self.request.emit(Delta(self.index, text, tokens))


class Engine:
    """Continuous batching over one model. Thread-safe `submit`; everything else runs on the engine thread."""

    def __init__(self, model, max_batch: int = 16, max_queue: int = 64, on_step: Callable | None = None,
                 prompt_lookup: int = 0, idle_release_s: float = IDLE_RELEASE_S):
        self.model, self.tokenizer = model, model.tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.idle_release_s = idle_release_s
        self.prompt_lookup = prompt_lookup  # draft tokens checked a step for a sequence running alone (0: none)
        self.context = model.config.max_position_embeddings
        self.vocab_size = model.config.vocab_size
        self.eos_ids = set(model.generation_config.eos_ids) if model.generation_config else set()
        self.special_ids = set(self.tokenizer.all_special_ids)
        self.on_step = on_step  # metrics hook: called with (tokens generated this step)
        self.waiting: collections.deque[Request] = collections.deque()
        self.rows: list[Sequence] = []
        self.cache: KVCache | None = None
        self._json_texts: list[str] | None = None
        self._wake = threading.Condition()
        self._stopping = self.draining = False
        self._thread = threading.Thread(target=self._loop, name="gpt4-engine", daemon=True)

    # ---- public, any thread --------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self.model._compiled_decode is not None:
            self._compile_decode_graphs()
        self._thread.start()
        return self

    @torch.inference_mode()
    def _compile_decode_graphs(self) -> None:
        """Compile the decode step for one row and for several rows of the batch cache now, before the first
        requests (each graph takes about a minute; /health answers 503 until they exist), and with prompt lookup
        the check of a full draft. The batch graph is first run with every row: under max-autotune its kernels are
        timed at the full batch, where the server's throughput is decided (the graph serves any number of rows
        from 2)."""
        self._ensure_cache(3 + self.prompt_lookup)
        for n in sorted({1, self.max_batch}):
            # Writes slot 1 of the first rows: slots past a row's length are overwritten before they are read.
            ids, positions = torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.long)
            self.model.decode_logits(ids, positions, self.cache.rows(0, n), kv_length=2)
        if self.prompt_lookup:
            warm_up_check(self.model, self.cache, self.prompt_lookup)

    def submit(self, request: Request) -> None:
        if request.n > self.max_batch:
            raise ValueError(f"n={request.n} is more than this server's {self.max_batch} batch rows.")
        with self._wake:
            if self.draining:
                raise Draining()
            if len(self.waiting) >= self.max_queue:
                raise QueueFull()
            self.waiting.append(request)
            self._wake.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        return len(self.rows)

    def stop(self, timeout: float | None = None) -> None:
        """Finish everything submitted, then end the thread."""
        with self._wake:
            self.draining = self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    # ---- engine thread -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self.rows and not self.waiting:
                    if self._stopping:
                        return
                    if self.cache is None:
                        self._wake.wait()
                    elif not self._wake.wait(self.idle_release_s):  # idle that long: give the KV cache's memory
                        self.cache = None  # back to the OS (~2 ms, once)
                        return_freed_memory()
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as e:  # a bug must not wedge the server: fail the batch, keep serving
                log.exception("engine step failed")
                for seq in self.rows:
                    seq.request.emit(Failed(f"The engine failed while generating: {e}"))
                self.rows, self.cache = [], None

    def _step(self) -> None:
        produced = 0
        for seq in self.rows:
            if not seq.request.cancelled and seq.finish_reason is None:
                produced += self._advance(seq)
        self._leave()
        if self.rows:
            self._decode()
        self._join()
        if self.on_step is not None:
            self.on_step(produced)

    def _advance(self, seq: Sequence) -> int:
        """Pick the next token of one sequence from its logits, turn it into text, decide whether it finished; after
        a draft, a token for each of its positions while they agree with it. Returns the number of tokens."""
        rows = seq.logits.float().reshape(-1, seq.logits.shape[-1])  # (1 + n, V)
        draft, seq.draft = seq.draft, []
        for j, raw in enumerate(rows):
            proposed = draft[j] if j < len(draft) else None
            token = self._take(seq, raw[None], proposed)
            if seq.finish_reason is not None or token != proposed:
                return j + 1
        raise AssertionError("the row after the draft proposes nothing: its token always ends the loop")

    def _take(self, seq: Sequence, raw: torch.Tensor, proposed: int | None) -> int:
        """Choose one token from logits raw (1, V) (keeping `proposed`, a draft's, by choose_over_draft's rule),
        record it and turn it into text."""
        p = seq.request.params
        scores = raw
        if p.logit_bias or seq.seen is not None or seq.counts is not None:
            scores = apply_penalties(raw.clone(), seq.seen, seq.counts, p.repetition_penalty, p.presence_penalty,
                                     p.frequency_penalty, p.logit_bias)
        if seq.json is not None:
            scores = self._json_mask(seq, scores)
        if not p.greedy:
            scores = warp(scores, p.temperature, p.top_k, p.top_p, None)
        if proposed is None:
            token = int(choose(scores, not p.greedy, seq.generator)[0])
        else:
            token = choose_over_draft(scores, proposed, not p.greedy, seq.generator)
        seq.record(token)
        seq.position += 1
        if token in self.eos_ids:
            seq.finish_reason = "stop"
            seq.flush()
            return token
        if seq.json is not None:
            seq.json.feed(self._json_texts[token])
        info = None
        if p.logprobs:
            logprobs = torch.log_softmax(raw[0], -1)  # (V,) the model's own distribution
            top = torch.topk(logprobs, p.top_logprobs) if p.top_logprobs else None
            info = TokenInfo(token, float(logprobs[token]),
                             [] if top is None else list(zip(top.indices.tolist(), top.values.tolist())))
        seq.push_text(seq.decoder.push(token), info)
        if seq.json is not None and seq.json.done:
            seq.finish_reason = "stop"
        if seq.finish_reason is None and len(seq.generated) >= p.max_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            seq.flush()
        return token

    def _json_mask(self, seq: Sequence, scores: torch.Tensor) -> torch.Tensor:
        """Keep only the best candidate tokens whose text keeps the output a prefix of a JSON object."""
        if self._json_texts is None:
            self._json_texts = token_texts(self.tokenizer, self.special_ids)
        allowed = torch.full_like(scores, float("-inf"))
        if seq.json.done:
            for e in self.eos_ids:
                allowed[0, e] = 0.0
            return scores + allowed
        order = torch.argsort(scores[0], descending=True)
        for start in range(0, order.numel(), JSON_CANDIDATES):
            ids = order[start:start + JSON_CANDIDATES].tolist()
            ok = [i for i in ids if scores[0, i] > float("-inf") and seq.json.accepts(self._json_texts[i])]
            if ok:
                allowed[0, ok] = 0.0
                return scores + allowed
        raise RuntimeError("no token continues the JSON output")

    def _leave(self) -> None:
        """Finish and drop sequences that are done or cancelled; keep active rows contiguous."""
        i = 0
        while i < len(self.rows):
            seq = self.rows[i]
            done = seq.request.cancelled or seq.finish_reason is not None
            if not done:
                i += 1
                continue
            # A cancelled sequence still reports its end, so whoever waits on the request stops waiting.
            reason = "cancelled" if seq.request.cancelled else seq.finish_reason
            seq.request.emit(Finish(seq.index, reason, len(seq.generated)))
            last = len(self.rows) - 1
            if i != last:  # move the last row into the hole: one row copied, not the whole batch
                self.cache.copy_row(last, i, self.rows[last].position)
                self.rows[i] = self.rows[last]
            self.rows.pop()

    def _ensure_cache(self, length: int) -> None:
        """A cache of max_batch rows with at least `length` slots, keeping what it holds."""
        length = min(self.context, max(length, 256))
        if self.cache is not None and self.cache.max_length >= length:
            return
        size = 256 if self.cache is None else self.cache.max_length
        while size < length:
            size *= 2
        new = self.model.new_cache(self.max_batch, min(size, self.context))
        if self.cache is not None:
            new.copy_from(self.cache)
        self.cache = new

    def _decode(self) -> None:
        """One forward pass: the last token of every row at its own position (and a draft after it, see
        _decode_with_draft)."""
        if len(self.rows) == 1 and self.rows[0].lookup is not None and self._decode_with_draft(self.rows[0]):
            return  # (a sequence has a lookup only under prompt_lookup > 0)
        positions = torch.tensor([[s.position - 1] for s in self.rows])  # (n, 1)
        kv_length = int(positions.max()) + 1
        self._ensure_cache(kv_length)
        ids = torch.tensor([[s.generated[-1]] for s in self.rows])  # (n, 1)
        # The running rows as a cache of exactly n rows (views): the same compiled graph as for any other batch.
        rows = self.cache.rows(0, len(self.rows))
        logits = self.model.decode_logits(ids, positions, rows, kv_length=kv_length)  # (n, V)
        for seq, row in zip(self.rows, logits):
            seq.logits = row

    def _decode_with_draft(self, seq: Sequence) -> bool:
        """The forward pass of a sequence running alone, with a draft after its last token; False if it has none.
        Refused draft tokens leave keys in slots past the sequence, overwritten before anything attends to them."""
        # Kept whole, the draft and the model's token after it reach the request's or the model's length at most.
        room = min(self.prompt_lookup, seq.request.params.max_tokens - len(seq.generated) - 1,
                   self.context - seq.position - 1)
        draft = seq.lookup.draft(room)
        if not draft:
            return False
        first = seq.position - 1  # the last token's slot; the draft's follow it
        kv_length = seq.position + len(draft)
        self._ensure_cache(kv_length)
        ids = torch.tensor([[seq.generated[-1], *draft]])  # (1, 1 + n)
        positions = torch.arange(first, kv_length)[None]
        seq.logits = self.model.verify_logits(ids, positions, self.cache.rows(0, 1), kv_length=kv_length)
        seq.draft = draft
        return True

    def _join(self) -> None:
        """Prefill waiting requests into free rows (all choices of a request share one prefill)."""
        batch: list[Request] = []
        with self._wake:
            free, budget = self.max_batch - len(self.rows), PREFILL_TOKENS_PER_STEP
            while self.waiting:
                r = self.waiting[0]
                if r.cancelled:
                    self.waiting.popleft()
                    for index in range(r.n):
                        r.emit(Finish(index, "cancelled", 0))
                    continue
                longest = max([len(x.prompt) for x in batch] + [len(r.prompt)])
                if r.n > free or (batch and longest * (len(batch) + 1) > budget):
                    break
                batch.append(self.waiting.popleft())
                free -= r.n
        if not batch:
            return
        start = len(self.rows)
        try:
            seqs = [Sequence(r, i, self.tokenizer, self.vocab_size, self.prompt_lookup > 0)
                    for r in batch for i in range(r.n)]
            self._ensure_cache(max(len(r.prompt) for r in batch) + 1)
            logits, scored = self._prefill(batch, start)  # (k, V), prompt logprobs of those that asked
            self._place(batch, start)
        except Exception as e:  # fail these requests only; the running batch goes on
            log.exception("prefill failed")
            for r in batch:
                r.emit(Failed(f"The prompt could not be processed: {e}"))
            return
        for r, tokens in zip(batch, scored):
            if tokens is not None:
                r.emit(PromptLogprobs(tokens))
        firsts = [row for r, row in zip(batch, logits) for _ in range(r.n)]
        for seq, first in zip(seqs, firsts):
            seq.logits = first
        self.rows.extend(seqs)

    def _place(self, batch: list[Request], start: int) -> None:
        """After _prefill wrote request j into row start+j, spread them to where their choices begin."""
        # Requests were prefilled into consecutive rows; choices were appended after. Walk backwards so a row
        # is never overwritten before it is copied.
        targets, row = [], start
        for r in batch:
            targets.append(row)
            row += r.n
        for j in reversed(range(len(batch))):
            src, dst, used = start + j, targets[j], len(batch[j].prompt)
            if src != dst:
                self.cache.copy_row(src, dst, used)
            for extra in range(1, batch[j].n):
                self.cache.copy_row(dst, dst + extra, used)

    def _prefill(self, batch: list[Request], start: int) -> tuple[torch.Tensor, list[list[TokenInfo] | None]]:
        """Prefill right-padded prompts into rows start..start+k-1. Returns each prompt's last logits (k, V), and
        for requests with prompt_logprobs the log-probability of every prompt token given the ones before it."""
        prompts = [r.prompt for r in batch]
        k, longest = len(prompts), max(map(len, prompts))
        scored = [[TokenInfo(p[0], None, None)] if r.params.prompt_logprobs else None for r, p in zip(batch, prompts)]
        lengths = torch.tensor([len(p) for p in prompts])
        ids = torch.zeros(k, longest, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
        positions = torch.arange(longest).expand(k, longest)
        rows = self.cache.rows(start, start + k)
        last = torch.zeros(k, self.model.config.hidden_size, dtype=self.model.dtype)
        chunk = self.model.prefill_chunk
        for lo in range(0, longest, chunk):
            hi = min(lo + chunk, longest)
            h = self.model.hidden_states(ids[:, lo:hi], positions[:, lo:hi], rows, kv_length=hi)  # (k, S, H)
            inside = (lengths - 1 >= lo) & (lengths - 1 < hi)
            idx = (lengths - 1 - lo).clamp(0, hi - lo - 1)
            last = torch.where(inside[:, None], h[torch.arange(k), idx], last)
            for i, tokens in enumerate(scored):
                if tokens is not None and lo + 1 < len(prompts[i]):
                    self._score_prompt(h[i, :min(hi, len(prompts[i]) - 1) - lo], prompts[i][lo + 1:hi + 1],
                                       batch[i].params.top_logprobs, tokens)
        return self.model.lm_head(last), scored  # (k, V)

    def _score_prompt(self, hidden: torch.Tensor, targets: list[int], top: int, out: list[TokenInfo]) -> None:
        """Append the logprob of each target token given the hidden state before it; hidden (S, H)."""
        logprobs = torch.log_softmax(self.model.lm_head(hidden).float(), dim=-1)  # (S, V)
        chosen = logprobs.gather(1, torch.tensor(targets[:len(hidden)])[:, None])[:, 0].tolist()
        best = torch.topk(logprobs, top) if top else None
        for j, (token, lp) in enumerate(zip(targets, chosen)):
            alternatives = [] if best is None else list(zip(best.indices[j].tolist(), best.values[j].tolist()))
            out.append(TokenInfo(token, lp, alternatives))
