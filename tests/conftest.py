"""Shared fixtures: loopback-only ICE, a real server process, in-process apps and clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from gpuserver.config import Settings
from gpuserver.unified_server import WEBSOCKET_OPTIONS, create_app
from gpuserver.webrtc_streamer import restrict_host_addresses
from tests.netns import IsolatedNetwork

ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(autouse=True, scope="session")
def loopback_ice_only() -> None:
    """Every peer connection in the test process gathers 127.0.0.1 only (aioice skips it)."""
    restrict_host_addresses(["127.0.0.1"])


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LoopbackServer:
    """The URLs of a server listening on 127.0.0.1:`port`."""

    port: int

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


@dataclass
class ServerProcess(LoopbackServer):
    """`gpuserver serve` in a child process, on loopback, with its own dirs."""

    process: subprocess.Popen[bytes]
    port: int
    log_dir: Path

    def log(self) -> str:
        path = self.log_dir / "unified_server.log"
        return path.read_text() if path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"{text!r} never appeared in the log:\n{self.log()}")
            time.sleep(0.3)

    def stop(self, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(
    workdir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    netns: IsolatedNetwork | None = None,
    subcommand: str = "serve",
    ready_s: float = 180,
) -> ServerProcess:
    """Start `gpuserver serve` (or `cluster`) on loopback (inside `netns` if given) and wait
    until healthy."""
    port = free_port()
    log_dir = workdir / "logs"
    environment = {
        **os.environ,
        "GPUSERVER_AVATARS__CACHE_DIR": str(workdir / "cache"),
        "GPUSERVER_AVATARS__DIR": str(workdir / "avatars"),
        **(env or {}),
    }
    command = [
        sys.executable, "-m", "gpuserver", subcommand, "--port", str(port),
        "--ice-host", "127.0.0.1", "--log-dir", str(log_dir), *args,
    ]  # fmt: skip
    if netns is not None:
        command = netns.wrap(command)
    process = subprocess.Popen(
        command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    server = ServerProcess(process, port, log_dir)
    deadline = time.monotonic() + ready_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        if _healthy(server, netns):
            return server
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"server did not become healthy:\n{server.log()}")


def _healthy(server: ServerProcess, netns: IsolatedNetwork | None) -> bool:
    url = f"{server.http_url}/healthz"
    if netns is None:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(url, timeout=1).status_code == 200
        return False
    probe = f"import httpx, sys; sys.exit(httpx.get({url!r}, timeout=1).status_code != 200)"
    check = subprocess.run(netns.wrap([sys.executable, "-c", probe]), capture_output=True)
    return check.returncode == 0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One echo-LLM server for a test module."""
    running = start_server(tmp_path_factory.mktemp("server"), "--llm", "echo")
    yield running
    running.stop()


@dataclass
class InProcessServer(LoopbackServer):
    """The real app served by uvicorn on the test's own event loop (patchable, inspectable)."""

    app: FastAPI
    port: int


def loopback_settings(workdir: Path, **groups: dict[str, Any]) -> Settings:
    """Loopback-only settings with their own directories; `groups` override settings."""
    values: dict[str, dict[str, Any]] = {
        "llm": {"backend": "echo"},
        "avatars": {"dir": workdir / "avatars", "cache_dir": workdir / "cache"},
        "webrtc": {"host_addresses": ["127.0.0.1"]},
    }
    for group, overrides in groups.items():
        values[group] = {**values.get(group, {}), **overrides}
    return Settings(**values)


@contextlib.asynccontextmanager
async def serve_in_process(settings: Settings) -> AsyncIterator[InProcessServer]:
    """Serve `create_app(settings)` on a free loopback port until the block ends."""
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, log_config=None, lifespan="on", **WEBSOCKET_OPTIONS,
        timeout_graceful_shutdown=2,
    )  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()  # raises why it could not start
            await asyncio.sleep(0.02)
        yield InProcessServer(app, sock.getsockname()[1])
    finally:
        server.should_exit = True
        await task
        sock.close()
