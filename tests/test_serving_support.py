"""Helpers for the serving tests (no tests here): an in-process uvicorn server on 127.0.0.1."""

import threading
import time

import httpx
import uvicorn

from gpt4.serving.app import ServerConfig, create_app


class LiveServer:
    """`gpt4 serve` in a thread of this process, on a free port, sharing an already loaded model."""

    def __init__(self, models, **config):
        self.app = create_app(models, ServerConfig(**config))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not (self.server.started and self.server.servers):
            assert time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    @property
    def state(self):
        return self.app.state.gpt4

    def engine(self, name="gpt4"):
        return self.state.served[name].engine

    def wait_idle(self, timeout=10.0, name="gpt4") -> bool:
        """True once no sequence runs and none waits (bounded poll)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state.ready and self.engine(name).active == 0 and self.engine(name).queue_depth == 0:
                return True
            time.sleep(0.02)
        return False

    def health(self) -> int:
        return httpx.get(self.url + "/health", timeout=10).status_code

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=20)
        assert not self.thread.is_alive(), "the server did not shut down: a request is stuck"


def no_eos(model) -> dict:
    """logit_bias (OpenAI form) that keeps the model from ending early: fixed-length generations."""
    return {str(i): -100 for i in model.generation_config.eos_ids}
