"""The WebSocket contract against a real server: greeting, errors, and a socket that survives.

Every bad input is answered with an `error` carrying the documented code and ref, and the
same socket answers a ping right after.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pytest
import websockets

from gpuserver.client import AvatarClient
from tests.conftest import ServerProcess, start_server


async def still_usable(client: AvatarClient) -> None:
    count = len(client.messages)
    await client.send({"type": "ping", "t": "alive"})
    pong = await client.wait_for("pong", after=count)
    assert pong["t"] == "alive"


async def error_for(client: AvatarClient, frame: str | bytes) -> dict:
    count = len(client.messages)
    await client.send_raw(frame)
    error = await client.wait_for("error", after=count)
    await still_usable(client)
    return error


async def test_the_greeting_describes_the_session(server: ServerProcess) -> None:
    async with AvatarClient(server.ws_url) as client:
        greeting = client.session
    assert greeting["protocol"] == 1
    assert greeting["avatar_id"] == "default"
    assert {"id": "default", "name": "Astronaut"} in greeting["avatars"]
    assert greeting["ice_servers"] == []
    assert greeting["session_id"] and greeting["server_version"]


async def test_ping_echoes_t_and_null_when_absent(server: ServerProcess) -> None:
    async with AvatarClient(server.ws_url) as client:
        await client.send_raw(json.dumps({"type": "ping", "t": {"n": 1}}))
        assert (await client.wait_for("pong"))["t"] == {"n": 1}
        count = len(client.messages)
        await client.send_raw(json.dumps({"type": "ping"}))
        assert (await client.wait_for("pong", after=count))["t"] is None


@pytest.mark.parametrize(
    ("frame", "code", "ref"),
    [
        ("{oops", "invalid_json", None),
        (b"\xff\xfe", "invalid_json", None),
        ("[]", "invalid_message", None),
        ('{"no": "type"}', "invalid_message", None),
        ('{"type": "fly", "id": "f1"}', "unknown_type", "f1"),
        ('{"type": "chat", "id": "c1"}', "invalid_message", "c1"),
        ('{"type": "set_avatar", "avatar_id": "nobody", "id": "a1"}', "avatar_not_found", "a1"),
        ('{"type": "speak", "text": "hi", "id": "s1"}', "no_peer", "s1"),
        (
            '{"type": "webrtc_ice_candidate", "candidate": null, "id": "i1"}',
            "no_peer",
            "i1",
        ),
        ('{"type": "webrtc_offer", "sdp": "v=0\\r\\nfoo", "id": "o1"}', "bad_sdp", "o1"),
        ('{"type": "webrtc_offer", "sdp": ""}', "bad_sdp", "webrtc_offer"),
    ],
)
async def test_bad_input_gets_its_error_and_the_socket_goes_on(
    server: ServerProcess, frame: str | bytes, code: str, ref: str | None
) -> None:
    async with AvatarClient(server.ws_url) as client:
        error = await error_for(client, frame)
    assert (error["code"], error["ref"]) == (code, ref)
    assert error["message"]


async def test_a_frame_over_the_limit_is_too_large_and_the_socket_goes_on(
    server: ServerProcess,
) -> None:
    async with AvatarClient(server.ws_url) as client:
        big = json.dumps({"type": "chat", "text": "x" * 70_000})
        error = await error_for(client, big)
    assert error["code"] == "too_large"
    assert "65536" in error["message"]


async def send_then_read(ws: websockets.ClientConnection, frame: str) -> None:
    """The server stops reading at 1 MiB: its close may land while this is still sent."""
    await ws.send(frame)
    await asyncio.wait_for(ws.recv(), 10)


async def test_a_frame_over_one_mebibyte_may_close_the_socket_with_1009(
    server: ServerProcess,
) -> None:
    ws = await websockets.connect(server.ws_url, max_size=None)
    try:
        await ws.recv()  # greeting
        with pytest.raises((websockets.ConnectionClosed, ConnectionResetError)) as closed:
            await send_then_read(ws, "x" * (2 * 1024 * 1024))
    finally:
        with contextlib.suppress(OSError):
            await ws.close()
    received = getattr(closed.value, "rcvd", None)
    assert received is None or received.code == 1009, "a close frame, when it arrives, says 1009"


async def test_interrupt_with_nothing_speaking_is_a_no_op(server: ServerProcess) -> None:
    async with AvatarClient(server.ws_url) as client:
        await client.send({"type": "interrupt"})
        await still_usable(client)
        assert not client.of_type("error")
        assert not client.of_type("interrupted")


async def test_set_avatar_to_a_known_avatar_is_confirmed(server: ServerProcess) -> None:
    async with AvatarClient(server.ws_url) as client:
        await client.send({"type": "set_avatar", "avatar_id": "default"})
        assert (await client.wait_for("avatar"))["avatar_id"] == "default"


async def test_chat_without_a_peer_answers_as_text_only(server: ServerProcess) -> None:
    async with AvatarClient(server.ws_url) as client:
        ref = await client.send({"type": "chat", "text": "Hello there, friend."})
        text = await client.wait_for("text")
        metrics = await client.wait_for("metrics")
        deltas = "".join(m["delta"] for m in client.of_type("llm_text"))
    assert text["content"] == deltas == "Hello there, friend."
    assert text["ref"] == ref and metrics["turn_id"] == text["turn_id"]
    assert metrics["first_frame_ms"] is None
    assert not client.of_type("speech_started")


async def test_a_rejected_offer_leaves_the_session_without_a_peer(server: ServerProcess) -> None:
    async with AvatarClient(server.ws_url) as client:
        await error_for(client, json.dumps({"type": "webrtc_offer", "sdp": "garbage"}))
        error = await error_for(client, json.dumps({"type": "speak", "text": "hi"}))
    assert error["code"] == "no_peer"


async def test_floods_are_rate_limited_and_the_socket_goes_on(server: ServerProcess) -> None:
    async with AvatarClient(server.ws_url) as client:
        for n in range(300):
            await client.send_raw(json.dumps({"type": "ping", "t": n}))
        error = await client.wait_for("error")
        assert error["code"] == "rate_limited"


async def test_the_health_and_config_endpoints_describe_the_server(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        health = (await http.get("/healthz")).json()
        config = (await http.get("/api/config")).json()
        avatars = (await http.get("/api/avatars")).json()
        metrics = (await http.get("/metrics")).text
    assert health["status"] == "ok" and health["engine"]["name"] == "warp"
    assert config["protocol"] == 1 and config["ice_servers"] == []
    assert avatars["default"] == "default"
    assert "gpuserver_sessions" in metrics


# --- admission: separate servers with their own limits ----------------------------------


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory: pytest.TempPathFactory):
    running = start_server(
        tmp_path_factory.mktemp("guarded"),
        "--llm",
        "echo",
        "--token",
        "s3cret",
        "--max-sessions",
        "1",
        env={"GPUSERVER_SERVER__OPERATOR_TOKEN": "op-s3cret"},
    )
    yield running
    running.stop()


async def test_a_wrong_token_is_told_and_closed_with_1008_before_any_work(
    guarded_server: ServerProcess,
) -> None:
    async with websockets.connect(guarded_server.ws_url + "?token=nope") as ws:
        error = json.loads(await ws.recv())
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert error["code"] == "unauthorized"
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_operator_routes_take_the_operator_token_or_a_loopback_peer(
    guarded_server: ServerProcess,
) -> None:
    proxied = {"X-Forwarded-For": "203.0.113.9"}  # relayed by a proxy: not loopback
    async with httpx.AsyncClient(base_url=guarded_server.http_url) as http:

        async def status(path: str, authorization: str | None = None) -> int:
            headers = {**proxied, "Authorization": authorization} if authorization else proxied
            return (await http.get(path, headers=headers)).status_code

        assert await status("/api/sessions") == 401
        assert await status("/metrics") == 401
        assert await status("/api/sessions", "Bearer s3cret") == 401  # the users' token
        assert await status("/api/sessions", "op-s3cret") == 401  # not "Bearer"
        assert await status("/api/sessions", "Bearer op-s3cret") == 200
        assert await status("/metrics", "bearer op-s3cret") == 200
        assert (await http.get("/api/sessions")).json() == {"sessions": []}  # loopback
        missing = await http.delete("/api/sessions/nobody/peer")
        foreign = await http.get("/metrics", headers={"Origin": "https://evil.example"})
    assert missing.status_code == 404
    assert foreign.status_code == 403


async def test_the_token_admits_and_a_full_server_answers_busy_then_1013(
    guarded_server: ServerProcess,
) -> None:
    async with AvatarClient(guarded_server.ws_url, token="s3cret") as first:
        assert first.session["session_id"]
        async with websockets.connect(guarded_server.ws_url + "?token=s3cret") as ws:
            busy = json.loads(await ws.recv())
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
    assert busy["type"] == "error" and busy["code"] == "busy"
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013


def test_the_server_logs_to_its_log_file(server: ServerProcess) -> None:
    assert "session opened" in server.log()


async def test_a_stopping_server_tells_its_clients_before_closing(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    stopping = start_server(tmp_path_factory.mktemp("stopping"), "--llm", "echo")
    async with AvatarClient(stopping.ws_url) as client:
        await asyncio.to_thread(stopping.stop)
        error = await client.wait_for("error")
    assert error["code"] == "shutting_down"
    assert "closing every session" in stopping.log()
    assert "Traceback" not in stopping.log()
