"""A dropped socket does not lose the conversation: reconnecting resumes the session.

Within the grace period the client gets its session back — same id, history, avatar, and
the peer connection that kept playing meanwhile; after it, or with a wrong key, it starts a
fresh session and the old one is gone.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import httpx
import pytest

from gpuserver.avatar_manager import bundled_default_source
from gpuserver.client import AvatarClient
from gpuserver.config import Settings
from tests.conftest import loopback_settings, serve_in_process

pytestmark = pytest.mark.slow


def settings_with_a_second_avatar(workdir: Path, grace_s: float) -> Settings:
    (workdir / "avatars").mkdir(parents=True)
    shutil.copy(bundled_default_source(), workdir / "avatars" / "twin.png")
    return loopback_settings(workdir, limits={"resume_grace_s": grace_s})


async def test_a_reconnect_within_the_grace_period_resumes_history_avatar_and_peer(
    tmp_path: Path,
) -> None:
    async with (
        serve_in_process(settings_with_a_second_avatar(tmp_path, grace_s=30)) as server,
        AvatarClient(server.ws_url) as client,
    ):
        first = client.session
        await client.start_media()
        await client.send({"type": "chat", "text": "Remember the word pelican."})
        await client.wait_for("metrics")
        await client.send({"type": "set_avatar", "avatar_id": "twin"})
        await client.wait_for("avatar")
        greeting = await client.reconnect()
        frames = len(client.media.video)
        await asyncio.sleep(0.5)
        flowing = len(client.media.video) - frames
        count = len(client.messages)
        await client.send({"type": "speak", "text": "Still here."})  # no new offer needed
        stopped = await client.wait_for("speech_stopped", after=count, timeout=30)
        history = server.app.state.sessions.get(first["session_id"]).history.messages
    assert greeting["resumed"] is True
    assert greeting["session_id"] == first["session_id"]
    assert greeting["avatar_id"] == "twin"
    assert flowing > 5, "the peer connection played on across the reconnect"
    assert stopped["interrupted"] is False
    assert history[0].content == "Remember the word pelican."


async def test_after_the_grace_period_a_reconnect_starts_over(tmp_path: Path) -> None:
    async with (
        serve_in_process(settings_with_a_second_avatar(tmp_path, grace_s=0.3)) as server,
        AvatarClient(server.ws_url) as client,
        httpx.AsyncClient(base_url=server.http_url) as http,
    ):
        first = client.session
        client._ws.transport.abort()  # the network dropped
        await asyncio.sleep(1.0)
        greeting = await client.connect(resume=True)
        listed = (await http.get("/api/sessions")).json()["sessions"]
    assert greeting["resumed"] is False
    assert greeting["session_id"] != first["session_id"]
    assert [s["id"] for s in listed] == [greeting["session_id"]]


async def test_a_wrong_resume_key_starts_a_new_session(tmp_path: Path) -> None:
    async with (
        serve_in_process(settings_with_a_second_avatar(tmp_path, grace_s=30)) as server,
        AvatarClient(server.ws_url) as client,
    ):
        first = dict(client.session)
        client._ws.transport.abort()
        client.session["resume_key"] = "guessed"
        greeting = await client.connect(resume=True)
        assert server.app.state.sessions.get(first["session_id"]) is not None, "still waiting"
    assert greeting["resumed"] is False
    assert greeting["session_id"] != first["session_id"]


async def test_a_client_that_closes_its_socket_ends_its_session(tmp_path: Path) -> None:
    async with serve_in_process(settings_with_a_second_avatar(tmp_path, grace_s=30)) as server:
        async with AvatarClient(server.ws_url) as client:
            session_id = client.session["session_id"]
        for _ in range(100):
            if server.app.state.sessions.get(session_id) is None:
                break
            await asyncio.sleep(0.02)
        assert server.app.state.sessions.get(session_id) is None
