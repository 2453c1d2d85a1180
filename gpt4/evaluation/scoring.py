"""Log-likelihood of continuations given contexts: the Python API (LocalScorer) or a running server (ServerScorer).

Tokenization follows lm-eval-harness: context and continuation are encoded separately (the continuation
without special tokens) and concatenated; an empty context becomes the BOS (else EOS) token; the window keeps
the last `context length` tokens.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import GPT4Error


@dataclass
class Score:
    loglik: float  # sum of the continuation tokens' log-probabilities (natural log)
    greedy: bool  # every continuation token is the argmax (LAMBADA accuracy)
    tokens: int


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    if context and context[-1] == " ":  # lm-eval: the space belongs to the continuation's first token
        context, continuation = context.rstrip(" "), context[len(context.rstrip(" ")):] + continuation
    ctx = tokenizer.encode(context) if context else []
    if not ctx:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ctx = [start]
    return ctx, tokenizer.encode(continuation, add_special_tokens=False)


class LocalScorer:
    """Scores with a loaded GPT4LMHeadModel, right-padded batches of similar length."""

    def __init__(self, model, batch_tokens: int = 4096, progress: bool = True):
        self.model, self.batch_tokens, self.progress = model, batch_tokens, progress

    @torch.inference_mode()
    def loglikelihoods(self, pairs: list[tuple[str, str]]) -> list[Score]:
        tok, limit = self.model.tokenizer, self.model.config.max_position_embeddings
        items = []
        for ctx, cont in pairs:
            c, x = encode_pair(tok, ctx, cont)
            if not x:
                raise GPT4Error(f"Empty continuation after tokenization (context ends {ctx[-40:]!r}).")
            full = (c + x)[-(limit + 1):]
            items.append((full[:-1], full[1:], len(x)))
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        out: list[Score | None] = [None] * len(items)
        bar = tqdm(total=len(items), desc="scoring", unit="req", disable=not self.progress, leave=False)
        pos = 0
        while pos < len(order):
            width = len(items[order[pos]][0])
            size = max(1, self.batch_tokens // width)
            batch = order[pos:pos + size]
            pos += size
            ids = torch.full((len(batch), width), tok.pad_token_id or 0, dtype=torch.long)  # (B, S)
            for r, i in enumerate(batch):
                ids[r, :len(items[i][0])] = torch.tensor(items[i][0])
            # Right padding: real tokens never attend to the pads after them, so no mask is needed.
            hidden = self.model.hidden_states(ids)  # (B, S, H)
            for r, i in enumerate(batch):
                inputs, targets, n = items[i]
                h = hidden[r, len(inputs) - n:len(inputs)]  # (n, H): the states predicting the continuation
                logp = F.log_softmax(self.model.lm_head(h).float(), dim=-1)  # (n, V)
                tgt = torch.tensor(targets[-n:])
                ll = logp.gather(1, tgt[:, None]).sum().item()
                out[i] = Score(ll, bool((logp.argmax(-1) == tgt).all()), n)
            bar.update(len(batch))
        bar.close()
        return out  # type: ignore[return-value]


class ServerScorer:
    """Scores through an OpenAI-compatible server's /v1/completions with echo=True, logprobs, max_tokens=0:
    the prompt tokens' log-probabilities come back, and the continuation's are summed."""

    def __init__(self, url: str, model, model_name: str = "gpt4", progress: bool = True):
        self.url, self.tokenizer, self.name, self.progress = url.rstrip("/"), model.tokenizer, model_name, progress
        self.limit = model.config.max_position_embeddings

    def _post(self, body: dict) -> dict:
        req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise GPT4Error(f"The server at {self.url} refused a scoring request ({e.code}): "
                            f"{e.read().decode(errors='replace')[:300]}") from None
        except urllib.error.URLError as e:
            raise GPT4Error(f"Cannot reach the server at {self.url}: {e.reason}. Start it with `gpt4 serve`.") from None

    def loglikelihoods(self, pairs: list[tuple[str, str]]) -> list[Score]:
        out = []
        for ctx, cont in tqdm(pairs, desc="scoring (server)", unit="req", disable=not self.progress, leave=False):
            c, x = encode_pair(self.tokenizer, ctx, cont)
            # The server scores a prompt that fits its context, one token shorter than LocalScorer's window
            # (which never feeds its last token): the two differ only for pairs longer than the context.
            full = (c + x)[-self.limit:]
            reply = self._post({"model": self.name, "prompt": full, "echo": True, "logprobs": 1, "max_tokens": 0,
                                "temperature": 0})
            lp = (reply["choices"][0].get("logprobs") or {})
            values, tops = lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
            if len(values) < len(full):
                raise GPT4Error(f"The server at {self.url} did not return the prompt's log-probabilities "
                                "(completions with echo=true, logprobs and max_tokens=0); it cannot score.")
            tail = values[len(full) - len(x):len(full)]
            greedy = all(t and max(t.values()) <= v + 1e-6 for t, v in zip(tops[len(full) - len(x):len(full)], tail))
            out.append(Score(float(sum(tail)), greedy, len(x)))
        return out
