"""Uploads from a hostile world: auth and size are judged before the body is read, same-id
uploads never race, bombs are refused undecoded, and nothing is silently overwritten."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gpuserver.avatar_manager import bundled_default_source
from tests.conftest import ServerProcess, start_server
from tests.test_avatar_manager import png_bomb

pytestmark = pytest.mark.slow

TOKEN = "upload-secret"
APP_ORIGIN = "https://app.example"
MAX_UPLOAD = 1_000_000  # the bundled portrait is 0.8 MB


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {
        "GPUSERVER_SERVER__ALLOWED_ORIGINS": f'["{APP_ORIGIN}"]',
        "GPUSERVER_AVATARS__MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
    }
    running = start_server(
        tmp_path_factory.mktemp("guarded"), "--llm", "echo", "--token", TOKEN, env=env
    )
    yield running
    running.stop()


async def status_without_a_body(server: ServerProcess, **headers: str) -> int:
    """POST an upload's headers, never its body, and return the status the server answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    head = {
        "Host": f"127.0.0.1:{server.port}",
        "Content-Type": "multipart/form-data; boundary=x",
        "Content-Length": str(MAX_UPLOAD // 2),
        **{key.replace("_", "-"): value for key, value in headers.items()},
    }
    request = "POST /api/avatars HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items())
    writer.write(request.encode() + b"\r\n")
    await writer.drain()
    try:
        async with asyncio.timeout(10):  # a server waiting for the body never answers
            status_line = await reader.readline()
    finally:
        writer.close()
    return int(status_line.split()[1])


async def test_an_upload_without_the_token_is_refused_before_its_body_is_read(
    guarded: ServerProcess,
) -> None:
    assert await status_without_a_body(guarded) == 401
    assert await status_without_a_body(guarded, Authorization=TOKEN) == 401  # no "Bearer"


async def test_an_upload_from_a_foreign_page_is_refused_before_its_body_is_read(
    guarded: ServerProcess,
) -> None:
    bearer = f"Bearer {TOKEN}"
    assert (
        await status_without_a_body(guarded, Authorization=bearer, Origin="https://evil.example")
        == 403
    )


async def test_an_upload_declaring_too_many_bytes_gets_413_unread(guarded: ServerProcess) -> None:
    status = await status_without_a_body(
        guarded, Authorization=f"Bearer {TOKEN}", Content_Length=str(1 << 30)
    )
    assert status == 413


async def test_a_body_without_a_declared_length_is_cut_off_at_the_limit(
    guarded: ServerProcess,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port)
    writer.write(
        f"POST /api/avatars HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Type: multipart/form-data; boundary=x\r\n"
        "\r\n".encode()
    )
    part = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    block = b"\0" * 65_536
    chunks = [part, *[block] * (100 * MAX_UPLOAD // len(block))]  # 100 times the limit
    answer = asyncio.create_task(reader.readline())
    sent = 0
    with contextlib.suppress(ConnectionError):
        for chunk in chunks:
            if answer.done():
                break
            writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            await writer.drain()
            sent += len(chunk)
    async with asyncio.timeout(10):
        status_line = await answer
    writer.close()
    assert int(status_line.split()[1]) == 413
    assert sent < 20 * MAX_UPLOAD  # refused while the body was still coming


def post(server: ServerProcess, filename: str, data: bytes, **fields: str) -> httpx.Response:
    return httpx.post(
        f"{server.http_url}/api/avatars",
        files={"file": (filename, data)},
        data=fields,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )


def test_a_bomb_image_is_refused_with_its_size(guarded: ServerProcess) -> None:
    response = post(guarded, "bomb.png", png_bomb())
    assert response.status_code == 400
    assert "30000x30000" in response.json()["detail"]
    assert httpx.get(f"{guarded.http_url}/healthz").status_code == 200


def test_an_existing_avatar_is_replaced_only_when_asked(guarded: ServerProcess) -> None:
    portrait = bundled_default_source().read_bytes()
    assert post(guarded, "p.png", portrait, id="twin", name="First").status_code == 200
    conflict = post(guarded, "p.png", portrait, id="twin", name="Second")
    assert conflict.status_code == 409
    assert "replace=true" in conflict.json()["detail"]
    replaced = post(guarded, "p.png", portrait, id="twin", name="Second", replace="true")
    last = json.loads(replaced.text.splitlines()[-1])
    assert last == {"stage": "done", "avatar": {"id": "twin", "name": "Second"}}
    listed = httpx.get(f"{guarded.http_url}/api/avatars").json()["avatars"]
    assert {"id": "twin", "name": "Second"} in listed


async def test_concurrent_uploads_of_one_id_one_wins_the_rest_conflict(
    guarded: ServerProcess,
) -> None:
    portrait = bundled_default_source().read_bytes()
    responses = await asyncio.gather(
        *(asyncio.to_thread(post, guarded, "p.png", portrait, id="race") for _ in range(6))
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [409] * 5
    assert (await asyncio.to_thread(httpx.get, f"{guarded.http_url}/healthz")).status_code == 200
    avatars_dir = Path(guarded.log_dir).parent / "avatars"
    assert sorted(p.name for p in avatars_dir.iterdir() if p.stem == "race") == ["race.png"]
    assert not [p for p in avatars_dir.iterdir() if p.name.startswith(".")]
