"""SIGTERM (a service manager's stop): clients are told, the process drains and exits 0."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from gpuserver.client import AvatarClient
from tests.conftest import start_server


async def test_sigterm_tells_every_client_and_exits_0(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--llm", "echo")
    try:
        async with AvatarClient(server.ws_url) as client:
            server.process.send_signal(signal.SIGTERM)
            notice = await client.wait_for("error", timeout=20)
            status = await asyncio.to_thread(server.process.wait, 30)
    finally:
        server.stop()
    assert notice["code"] == "shutting_down"
    assert status == 0
    assert "Application shutdown complete" in server.log()
