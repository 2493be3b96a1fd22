"""Who may do what: tokens, origins, operator access, and secrets kept out of logs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
import websockets

from gpuserver.api.auth import bearer_token, operator_refusal, origin_allowed
from gpuserver.client import AvatarClient
from gpuserver.config import ServerSettings, load_settings
from gpuserver.logging_setup import configure_logging
from tests.conftest import ServerProcess, start_server

TOKEN = "tok-7f3a9"
TURN = {"urls": ["turn:turn.example.org:3478"], "username": "u", "credential": "turn-pass"}


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer abc", "abc"),
        ("bearer   abc ", "abc"),
        ("abc", None),  # the scheme is required
        ("Basic abc", None),
        ("Bearer ", None),
        (None, None),
    ],
)
def test_only_a_bearer_authorization_carries_a_token(header: str | None, expected: str) -> None:
    assert bearer_token(header) == expected


@pytest.mark.parametrize(
    ("origin", "allowed", "expected"),
    [
        (None, [], True),  # not a browser
        ("http://127.0.0.1:8000", [], True),  # the page this server served
        ("https://evil.example", [], False),
        ("https://app.example", ["https://app.example"], True),
        ("https://evil.example", ["*"], True),
        ("null", [], False),
        ("http://[bad", [], False),
    ],
)
def test_pages_may_connect_from_their_own_host_or_a_listed_origin(
    origin: str | None, allowed: list[str], expected: bool
) -> None:
    assert origin_allowed(origin, "127.0.0.1:8000", allowed) is expected


@pytest.mark.parametrize(
    ("peer", "headers", "settings", "expected"),
    [
        ("127.0.0.1", {}, {}, None),
        ("::1", {}, {}, None),
        ("::ffff:127.0.0.1", {}, {}, None),
        ("testclient", {}, {}, 403),
        ("127.0.0.1", {"x-forwarded-for": "127.0.0.1"}, {}, 403),  # relayed by a local proxy
        ("127.0.0.1", {"forwarded": "for=1.2.3.4"}, {}, 403),
        ("127.0.0.1", {"x-forwarded-for": "127.0.0.1"}, {"trusted_proxies": ["127.0.0.1"]}, None),
        ("203.0.113.9", {}, {}, 403),
        ("203.0.113.9", {}, {"operator_token": "op"}, 401),
        ("203.0.113.9", {"authorization": "Bearer op"}, {"operator_token": "op"}, None),
        ("203.0.113.9", {"authorization": "op"}, {"operator_token": "op"}, 401),
        ("203.0.113.9", {"authorization": "Bearer user"}, {"token": "user"}, 403),
    ],
)
def test_operators_are_loopback_peers_or_hold_the_operator_token(
    peer: str, headers: dict[str, str], settings: dict, expected: int | None
) -> None:
    refusal = operator_refusal(peer, headers, ServerSettings(**settings))
    assert (refusal[0] if refusal else None) == expected


@pytest.mark.parametrize("key", ["token", "operator_token"])
@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_token_is_a_configuration_error_not_auth_off(key: str, value: str) -> None:
    with pytest.raises(ValueError, match="empty token"):
        load_settings(server={key: value})


def test_an_empty_token_in_the_environment_stops_start_up(tmp_path: os.PathLike) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpuserver", "serve", "--port", "0", "--log-dir", str(tmp_path)],
        env={**os.environ, "GPUSERVER_SERVER__TOKEN": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "empty token" in result.stderr


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://app.example", ["https://app.example"]),
        ("https://a.example, https://b.example", ["https://a.example", "https://b.example"]),
        ('["https://a.example"]', ["https://a.example"]),
    ],
)
def test_allowed_origins_may_be_a_plain_string_in_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: list[str]
) -> None:
    monkeypatch.setenv("GPUSERVER_SERVER__ALLOWED_ORIGINS", value)
    assert load_settings().server.allowed_origins == expected


def test_log_lines_never_show_a_query_token(tmp_path: os.PathLike) -> None:
    configure_logging("INFO", tmp_path)  # type: ignore[arg-type]
    try:
        path = "/ws?avatar=a&token=s3cr3t&x=1"
        # As uvicorn words it (its own logger's level depends on who ran uvicorn before).
        logging.getLogger("gpuserver.access").info('%s - "WebSocket %s" [accepted]', "peer", path)
        text = (tmp_path / "unified_server.log").read_text()  # type: ignore[operator]
    finally:
        configure_logging("INFO", None)
    assert "s3cr3t" not in text
    assert "/ws?avatar=a&token=***&x=1" in text


# --- a real server with a token and a TURN server --------------------------------------------


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"GPUSERVER_WEBRTC__ICE_SERVERS": json.dumps([TURN])}
    running = start_server(
        tmp_path_factory.mktemp("locked"), "--llm", "echo", "--token", TOKEN, env=env
    )
    yield running
    running.stop()


async def test_the_token_never_reaches_the_log(locked: ServerProcess) -> None:
    async with websockets.connect(f"{locked.ws_url}?token={TOKEN}") as browser_style:
        assert json.loads(await browser_style.recv())["type"] == "session"
    async with AvatarClient(locked.ws_url, token=TOKEN) as client:  # sends a header
        assert client.session["session_id"]
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{locked.http_url}/?token={TOKEN}")).status_code == 200
    log = locked.log()
    assert "token=***" in log
    assert TOKEN not in log


async def test_turn_credentials_go_only_to_authenticated_sessions(locked: ServerProcess) -> None:
    async with httpx.AsyncClient() as http:
        config = (await http.get(f"{locked.http_url}/api/config")).json()
    assert config["ice_servers"] == [{"urls": TURN["urls"]}]
    async with AvatarClient(locked.ws_url, token=TOKEN) as client:
        assert client.session["ice_servers"] == [TURN]


async def test_a_bare_token_without_bearer_is_refused(locked: ServerProcess) -> None:
    headers = {"Authorization": TOKEN}
    async with websockets.connect(locked.ws_url, additional_headers=headers) as ws:
        refused = json.loads(await ws.recv())
    assert refused["code"] == "unauthorized"


async def test_a_foreign_page_is_refused_with_1008_and_a_short_reason(
    server: ServerProcess,
) -> None:
    origin = "https://" + "very-long-" * 40 + "evil.example"
    async with websockets.connect(server.ws_url, origin=origin) as ws:  # type: ignore[arg-type]
        refused = json.loads(await ws.recv())
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert refused["code"] == "unauthorized" and "is not allowed" in refused["message"]
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
