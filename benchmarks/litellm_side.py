"""LiteLLM's proxy in front of a local OpenAI-compatible endpoint, for side-by-side benchmarks.

LiteLLM is not a dependency of metallm: it lives in a virtualenv of its own, found at
``$METALLM_LITELLM_VENV`` (default ``/work/litellm-venv``), installed as

    python3 -m venv /work/litellm-venv
    /work/litellm-venv/bin/pip install 'litellm[proxy]==1.81.13'

1.81.13 is pinned on purpose: it predates the LiteLLM releases that were published compromised
on PyPI (1.82.7, 1.82.8 and 1.107.0; none of them is on the index any more). Without that
virtualenv, :func:`find` returns ``None`` and the benchmarks skip LiteLLM's column, printing
how to install it.

The proxy runs as ``litellm --config … --port …`` (one uvicorn worker, no database, the local
model cost map: nothing leaves the machine), one model per arm, ``openai/<arm>`` at the arm's
base URL, without retries.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

VERSION = "1.81.13"
INSTALL = (
    "python3 -m venv /work/litellm-venv && "
    f"/work/litellm-venv/bin/pip install 'litellm[proxy]=={VERSION}'"
)


def find() -> Path | None:
    """The ``litellm`` command of the side virtualenv, if it is installed."""
    venv = Path(os.environ.get("METALLM_LITELLM_VENV", "/work/litellm-venv"))
    command = venv / "bin" / "litellm"
    return command if command.exists() else None


def version(command: Path) -> str:
    python = command.parent / "python"
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy:
    """``litellm --config`` in a subprocess, serving ``arms`` (name → OpenAI base URL)."""

    def __init__(self, command: Path, arms: dict[str, str], folder: Path) -> None:
        import yaml

        self.port = free_port()
        self.config = folder / "litellm.yaml"
        models = [
            {
                "model_name": name,
                "litellm_params": {
                    "model": f"openai/{name}",
                    "api_base": url,
                    "api_key": "-",
                    "max_retries": 0,
                },
            }
            for name, url in arms.items()
        ]
        document = {
            "model_list": models,
            "litellm_settings": {"telemetry": False, "num_retries": 0, "drop_params": True},
        }
        self.config.write_text(yaml.safe_dump(document))
        self.log = folder / "litellm.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("METALLM_", "PYTHON"))}
        env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR")
        self.command = [str(command), "--config", str(self.config), "--host", "127.0.0.1"]
        self.command += ["--port", str(self.port), "--num_workers", "1"]
        self.env = env
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 120.0) -> Proxy:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/health/liveliness"
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"LiteLLM's proxy exited; see {self.log}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"LiteLLM's proxy did not start; see {self.log}") from None
            time.sleep(0.25)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
