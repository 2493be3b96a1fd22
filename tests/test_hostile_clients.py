"""One abusive client must not hurt anyone else, and nothing it does may leak.

Fuzzed messages of every type, inputs that cannot be echoed, floods, readers that never
read, peers that never connect or vanish mid-speech, hundreds of abrupt disconnects: each
is answered with an `error` or a clean close, the server keeps serving a bystander, and
file descriptors, threads and tasks come back to where they were.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import websockets
from aiortc import RTCConfiguration, RTCPeerConnection
from fastapi import WebSocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuserver.api import websocket_server
from gpuserver.client import AvatarClient
from gpuserver.protocol import CLIENT_TYPES
from tests.conftest import InProcessServer, ServerProcess, loopback_settings, serve_in_process

pytestmark = pytest.mark.slow

# --- fuzzing ---------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = ("text", "sdp", "candidate", "avatar_id", "voice", "t", "queue", "id")


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    """A message of a real type (or a made-up one) with fields of any JSON shape."""
    kind = draw(st.sampled_from(sorted(CLIENT_TYPES)) | st.text(max_size=10))
    fields = draw(st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=4))
    return {"type": kind, **fields}


class Bystander:
    """A second session whose pings must keep being answered."""

    def __init__(self, client: AvatarClient) -> None:
        self.client = client
        self.asked = 0

    async def still_answers(self) -> None:
        self.asked += 1
        t = f"still there? {self.asked}"
        await self.client.send({"type": "ping", "t": t})
        await self.client.wait_for("pong", where=lambda pong: pong["t"] == t, timeout=10)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    from tests.conftest import start_server

    env = {"GPUSERVER_LIMITS__INVALID_MESSAGES_PER_10S": "100000"}  # fuzzing is all invalid
    running = start_server(tmp_path_factory.mktemp("fuzz"), "--llm", "echo", env=env)
    yield running
    running.stop()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(messages(), min_size=1, max_size=8))
def test_fuzzed_messages_of_every_type_get_answers_and_hurt_no_bystander(
    fuzz_server: ServerProcess, batch: list[dict[str, Any]]
) -> None:
    async def scenario() -> None:
        async with (
            AvatarClient(fuzz_server.ws_url) as fuzzer,
            AvatarClient(fuzz_server.ws_url) as other,
        ):
            for message in batch:
                await fuzzer.send_raw(json.dumps(message))
            await Bystander(fuzzer).still_answers()  # the fuzzer's own socket goes on too
            await Bystander(other).still_answers()
        errors = fuzzer.of_type("error")
        assert all(error["code"] != "internal" for error in errors), errors

    asyncio.run(scenario())


# --- inputs that cannot be echoed ------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        pytest.param('{"type": "ping", "t": ' + "9" * 5000 + "}", "invalid_json", id="huge-int"),
        pytest.param('{"type": "ping", "t": "\\ud800"}', "invalid_message", id="lone-surrogate"),
        pytest.param(
            '{"type": "ping", "t": ' + "[" * 300 + "]" * 300 + "}", "invalid_message", id="deep"
        ),
    ],
)
async def test_inputs_that_cannot_be_echoed_get_an_error_and_the_socket_goes_on(
    server: ServerProcess, frame: str, code: str
) -> None:
    async with AvatarClient(server.ws_url) as client:
        await client.send_raw(frame)
        error = await client.wait_for("error")
        await Bystander(client).still_answers()
    assert error["code"] == code


async def test_a_text_frame_that_is_not_utf8_is_closed_with_1007_and_one_log_line(
    server: ServerProcess,
) -> None:
    async with websockets.connect(server.ws_url) as ws:
        await ws.recv()  # greeting
        # A text frame (opcode 1) whose payload is not UTF-8, below the library's checks.
        await ws.send(b"\xff\xfe\xfd", text=True)
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code == 1007
    await asyncio.sleep(0.2)
    log = server.log()
    assert "not UTF-8: closed with 1007" in log
    assert "Traceback" not in log


# --- floods and readers that never read --------------------------------------------------


async def test_permessage_deflate_is_never_negotiated(server: ServerProcess) -> None:
    async with websockets.connect(server.ws_url, compression="deflate") as ws:
        extensions = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        await ws.recv()
    assert "permessage-deflate" not in extensions


async def test_an_error_budget_spent_closes_the_socket_with_1008(
    tmp_path: Path,
) -> None:
    settings_ = loopback_settings(tmp_path, limits={"invalid_messages_per_10s": 5})
    async with serve_in_process(settings_) as server, AvatarClient(server.ws_url) as client:
        for _ in range(10):
            await client.send_raw("{not json")
        await asyncio.wait_for(client._ws.wait_closed(), 10)
    assert client._ws.close_code == 1008
    codes = [error["code"] for error in client.of_type("error")]
    assert codes.count("invalid_json") == 6 and codes[-1] == "rate_limited"


async def test_a_client_that_never_reads_is_dropped_with_its_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dropped_sockets: list[bool] = []  # per abort: is the server's socket closing after it

    def abort(websocket: WebSocket) -> None:
        real_abort(websocket)
        transport = websocket_server._transport(websocket)
        dropped_sockets.append(transport is not None and transport.is_closing())

    real_abort = websocket_server._abort
    monkeypatch.setattr(websocket_server, "_abort", abort)
    settings_ = loopback_settings(
        tmp_path,
        limits={"max_unread_bytes": 64 * 1024, "messages_per_second": 10_000},
    )
    async with serve_in_process(settings_) as server:
        sessions = server.app.state.sessions
        # max_queue=1: the client library stops reading, so TCP fills and the server's
        # writer blocks, as with a client that never reads.
        async with websockets.connect(server.ws_url, max_queue=1) as ws:
            assert json.loads(await ws.recv())["type"] == "session"  # its session is open
            assert len(sessions) == 1
            big = "x" * 30_000
            for n in range(300):
                try:
                    await ws.send(json.dumps({"type": "ping", "t": big, "id": str(n)}))
                except websockets.ConnectionClosed:
                    break
                if not len(sessions):
                    break
            for _ in range(200):
                if not len(sessions):
                    break
                await asyncio.sleep(0.05)
            dropped = len(sessions) == 0
    assert dropped, "the session of a client that does not read is ended"
    assert dropped_sockets == [True], "and its TCP connection with it, not left to time out"


# --- peers -----------------------------------------------------------------------------------


async def test_a_peer_that_never_connects_is_closed_with_peer_failed(tmp_path: Path) -> None:
    settings_ = loopback_settings(tmp_path, webrtc={"connect_timeout_s": 1.0})
    async with serve_in_process(settings_) as server, AvatarClient(server.ws_url) as client:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("audio", direction="recvonly")
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        offer = pc.localDescription.sdp
        await pc.close()  # nobody will answer the server's ICE checks
        await client.send({"type": "webrtc_offer", "sdp": offer})
        await client.wait_for("webrtc_answer")
        error = await client.wait_for("error", timeout=15)
        listed = [s.peer_state for s in server.app.state.sessions]
    assert error["code"] == "peer_failed" and "did not connect" in error["message"]
    assert listed == ["none"]


async def test_a_peer_closed_while_the_avatar_speaks_ends_the_turn(tmp_path: Path) -> None:
    async with (
        serve_in_process(loopback_settings(tmp_path)) as server,
        AvatarClient(server.ws_url) as client,
    ):
        await client.start_media()
        await client.send({"type": "speak", "text": "A long answer that goes on. " * 10})
        await client.wait_for("speech_started", timeout=20)
        assert client.pc is not None
        await client.pc.close()  # the client's page went away, its socket did not
        interrupted = await client.wait_for("interrupted", timeout=15)
        stopped = await client.wait_for("speech_stopped", timeout=5)
        assert server.app.state.sessions.get(client.session["session_id"]) is not None
    assert stopped["interrupted"] is True and stopped["turn_id"] == interrupted["turn_id"]


# --- nothing leaks ---------------------------------------------------------------------------


def resources() -> tuple[int, int, int]:
    """Open fds, threads and tasks. Threads of the loop's default executor are left out: it
    runs aiortc's encoders and decoders and, on a busy machine, starts another worker up to
    its bound whenever all are busy; that is growth of a bounded pool, not a leak."""
    threads = [t for t in threading.enumerate() if not t.name.startswith("asyncio_")]
    return len(os.listdir("/proc/self/fd")), len(threads), len(asyncio.all_tasks())


async def abrupt_cycle(server: InProcessServer, with_media: bool) -> None:
    client = AvatarClient(server.ws_url)
    await client.connect()
    if with_media:
        await client.start_media()
    client._ws.transport.abort()  # no close handshake: the network dropped
    await client.close()


async def test_a_hundred_abrupt_disconnects_leave_fds_threads_and_tasks_as_they_were(
    tmp_path: Path,
) -> None:
    limits = {"resume_grace_s": 0.2, "max_sessions": 200, "max_sessions_per_address": 200}
    settings_ = loopback_settings(tmp_path, limits=limits)
    async with serve_in_process(settings_) as server:
        sessions = server.app.state.sessions
        for _ in range(3):  # warm up: pools and lazily created threads exist from here on
            await abrupt_cycle(server, with_media=True)
        await asyncio.sleep(1.0)
        before = resources()
        for n in range(100):
            await abrupt_cycle(server, with_media=n % 10 == 0)
        for _ in range(100):
            if not len(sessions):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        after = resources()
    assert len(sessions) == 0
    fds, threads, tasks = (a - b for a, b in zip(after, before, strict=True))
    assert fds <= 4, (before, after)  # sockets in TIME_WAIT-free teardown: a few at most
    assert threads <= 0, (before, after)
    assert tasks <= 0, (before, after)


async def test_one_address_cannot_take_every_session(tmp_path: Path) -> None:
    settings_ = loopback_settings(tmp_path, limits={"max_sessions_per_address": 2})
    async with (
        serve_in_process(settings_) as server,
        AvatarClient(server.ws_url),
        AvatarClient(server.ws_url),
    ):
        third = AvatarClient(server.ws_url)
        with pytest.raises(ConnectionRefusedError, match="busy: this address already holds 2"):
            await third.connect()
        await asyncio.wait_for(third._ws.wait_closed(), 10)
        await third.close()
    assert third._ws.close_code == 1013


async def test_a_silent_socket_is_closed_after_the_idle_timeout(tmp_path: Path) -> None:
    settings_ = loopback_settings(tmp_path, limits={"idle_timeout_s": 0.5})
    async with serve_in_process(settings_) as server, AvatarClient(server.ws_url) as client:
        await asyncio.wait_for(client._ws.wait_closed(), 10)
    assert client._ws.close_code == 1001
    assert "idle" in (client._ws.close_reason or "")


async def a_bare_offer() -> tuple[RTCPeerConnection, str]:
    """An offer as a browser sends it (candidates trickled later), and its peer."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio", direction="recvonly")
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def test_trickled_candidates_past_the_bound_are_refused(tmp_path: Path) -> None:
    settings_ = loopback_settings(tmp_path, webrtc={"max_remote_candidates": 3})
    async with serve_in_process(settings_) as server, AvatarClient(server.ws_url) as client:
        pc, offer = await a_bare_offer()
        ref = await client.send({"type": "webrtc_offer", "sdp": offer})
        answer = await client.wait_for("webrtc_answer")
        for port in range(40000, 40005):
            candidate = f"candidate:1 1 udp 2130706431 127.0.0.1 {port} typ host"
            init = {"candidate": candidate, "sdpMid": "0", "sdpMLineIndex": 0}
            await client.send({"type": "webrtc_ice_candidate", "candidate": init})
        # A barrier in the order of messages (a ping would overtake the candidates).
        await client.send({"type": "set_avatar", "avatar_id": "default"})
        await client.wait_for("avatar")
        await pc.close()
    assert answer["ref"] == ref
    errors = client.of_type("error")
    assert [e["code"] for e in errors] == ["bad_sdp", "bad_sdp"]
    assert "at most 3" in errors[0]["message"]


async def test_a_rejected_offer_keeps_the_working_peer(tmp_path: Path) -> None:
    async with (
        serve_in_process(loopback_settings(tmp_path)) as server,
        AvatarClient(server.ws_url) as client,
    ):
        await client.start_media()
        await client.send({"type": "webrtc_offer", "sdp": "v=0\r\nnot an offer"})
        assert (await client.wait_for("error"))["code"] == "bad_sdp"
        frames = len(client.media.video)
        await client.send({"type": "speak", "text": "Still connected."})
        stopped = await client.wait_for("speech_stopped", timeout=20)
        states = [s.peer_state for s in server.app.state.sessions]
    assert stopped["interrupted"] is False
    assert len(client.media.video) > frames + 10, "media went on on the same peer"
    assert states == ["connected"]
