"""Runs the real OpenAI-compatible ``llama_cpp.server`` over the Gemma-3-270M GGUF for tests.

Small and single-threaded (2-core machines): ``n_ctx`` 512, one thread. ``pause()``/``resume()``
freeze and thaw the process (SIGSTOP/SIGCONT) to make a real outage: connections are accepted
by the kernel but nothing answers, so clients time out.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from service.llm.local_models import resolve


def _http(url: str, headers: dict[str, str], body: bytes | None, timeout: float) -> int:
    request = urllib.request.Request(url, data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    def __init__(self, model: str = "gemma-3-270m", api_key: str | None = None) -> None:
        self.model = model
        self.api_key = api_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.process: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in __exit__
            prefix="llama-server-", suffix=".log", delete=False
        )

    def __enter__(self) -> LlamaServer:
        path, _ = resolve(self.model)
        cmd = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(path), "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", "512", "--n_threads", "1", "--n_batch", "512",
        ]  # fmt: skip
        if self.api_key:
            cmd += ["--api_key", self.api_key]
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited; see {self.log.name}")
            try:
                if _http(f"{self.url}/models", headers, None, 2) == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"llama_cpp.server did not start; see {self.log.name}")
            time.sleep(0.3)
        # the first completion loads and warms the model: keep it out of the tests' timeouts
        body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
        _http(
            f"{self.url}/chat/completions",
            {**headers, "Content-Type": "application/json"},
            body.encode(),
            120,
        )
        return self

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def __exit__(self, *exc: object) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.resume()
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
        self.log.close()
