"""Prometheus text exposition for the server: request counts, tokens, queue depth, latency histograms."""

from __future__ import annotations

import bisect
import collections
import threading

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self):
        self.counts = [0] * (len(BUCKETS) + 1)  # the last bucket is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.total += value

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, running = [], 0
        sep = "," if labels else ""
        for bound, count in zip([*map(str, BUCKETS), "+Inf"], self.counts):
            running += count
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {running}')
        tail = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{tail} {self.total:.6f}", f"{name}_count{tail} {running}"]


class Metrics:
    """Thread-safe counters (the engine thread reports tokens, the event loop reports requests)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = collections.Counter()  # (route, status) -> count
        self.prompt_tokens = self.generation_tokens = 0
        self.request_seconds = collections.defaultdict(Histogram)  # route -> histogram
        self.ttft_seconds = Histogram()
        self.e2e_seconds = Histogram()

    def request(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[route, status] += 1
            self.request_seconds[route].observe(seconds)

    def prompt(self, tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += tokens

    def generated(self, tokens: int) -> None:
        with self._lock:
            self.generation_tokens += tokens

    def ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft_seconds.observe(seconds)

    def latency(self, seconds: float) -> None:
        with self._lock:
            self.e2e_seconds.observe(seconds)

    def render(self, queue: int, running: int) -> str:
        with self._lock:
            lines = ["# HELP gpt4_requests_total HTTP requests by route and status.",
                     "# TYPE gpt4_requests_total counter"]
            lines += [f'gpt4_requests_total{{route="{r}",status="{s}"}} {n}'
                      for (r, s), n in sorted(self.requests.items())]
            lines += ["# HELP gpt4_prompt_tokens_total Prompt tokens accepted for generation.",
                      "# TYPE gpt4_prompt_tokens_total counter", f"gpt4_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP gpt4_generation_tokens_total Tokens generated.",
                      "# TYPE gpt4_generation_tokens_total counter",
                      f"gpt4_generation_tokens_total {self.generation_tokens}",
                      "# HELP gpt4_queue_depth Requests waiting for a batch row.", "# TYPE gpt4_queue_depth gauge",
                      f"gpt4_queue_depth {queue}",
                      "# HELP gpt4_running_sequences Sequences in the running batch.",
                      "# TYPE gpt4_running_sequences gauge", f"gpt4_running_sequences {running}",
                      "# HELP gpt4_time_to_first_token_seconds Time from request to first text.",
                      "# TYPE gpt4_time_to_first_token_seconds histogram"]
            lines += self.ttft_seconds.lines("gpt4_time_to_first_token_seconds")
            lines += ["# HELP gpt4_generation_latency_seconds Time from request to the last token.",
                      "# TYPE gpt4_generation_latency_seconds histogram"]
            lines += self.e2e_seconds.lines("gpt4_generation_latency_seconds")
            lines += ["# HELP gpt4_request_duration_seconds HTTP request duration by route.",
                      "# TYPE gpt4_request_duration_seconds histogram"]
            for route, h in sorted(self.request_seconds.items()):
                lines += h.lines("gpt4_request_duration_seconds", f'route="{route}"')
            return "\n".join(lines) + "\n"
