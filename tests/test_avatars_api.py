"""Adding avatars: upload over HTTP with streamed progress, and the prepare-avatar command."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np

from gpuserver.avatar_manager import bundled_default_source
from gpuserver.client import AvatarClient
from tests.conftest import ServerProcess


def upload(server: ServerProcess, filename: str, data: bytes, **fields: str) -> list[dict]:
    response = httpx.post(
        f"{server.http_url}/api/avatars", files={"file": (filename, data)}, data=fields, timeout=60
    )
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines()]


async def test_an_uploaded_portrait_becomes_an_avatar_sessions_can_pick(
    server: ServerProcess,
) -> None:
    portrait = bundled_default_source().read_bytes()
    lines = await asyncio.to_thread(upload, server, "p.png", portrait, id="copy", name="The copy")
    progress = [line["progress"] for line in lines if "progress" in line]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert lines[-1] == {"stage": "done", "avatar": {"id": "copy", "name": "The copy"}}
    async with httpx.AsyncClient() as http:
        listed = (await http.get(f"{server.http_url}/api/avatars")).json()["avatars"]
    assert {"id": "copy", "name": "The copy"} in listed
    async with AvatarClient(server.ws_url) as client:
        assert {"id": "copy", "name": "The copy"} in client.session["avatars"]
        await client.send({"type": "set_avatar", "avatar_id": "copy"})
        assert (await client.wait_for("avatar"))["avatar_id"] == "copy"


def test_an_upload_of_the_wrong_type_is_refused_before_preparation(server: ServerProcess) -> None:
    response = httpx.post(
        f"{server.http_url}/api/avatars", files={"file": ("notes.txt", b"hello")}, timeout=60
    )
    assert response.status_code == 400
    assert "unsupported file type" in response.json()["detail"]


def test_a_portrait_without_a_face_ends_with_a_readable_error(server: ServerProcess) -> None:
    import cv2

    data = cv2.imencode(".png", np.full((256, 256, 3), 200, np.uint8))[1].tobytes()
    lines = upload(server, "blank.png", data)
    assert lines[-1]["stage"] == "error"
    assert "no face" in lines[-1]["error"]
    listed = httpx.get(f"{server.http_url}/api/avatars").json()["avatars"]
    assert "blank" not in [a["id"] for a in listed]


def test_prepare_avatar_stores_and_prepares_a_portrait(tmp_path: Path) -> None:
    source = tmp_path / "me.png"
    source.write_bytes(bundled_default_source().read_bytes())
    env_dirs = [
        f"GPUSERVER_AVATARS__DIR={tmp_path / 'avatars'}",
        f"GPUSERVER_AVATARS__CACHE_DIR={tmp_path / 'cache'}",
    ]
    result = subprocess.run(
        ["env", *env_dirs, sys.executable, "-m", "gpuserver", "prepare-avatar", str(source),
         "--id", "me", "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "avatars" / "me.png").is_file()
    assert any((tmp_path / "cache" / "warp").iterdir())
    assert "avatar 'me' ready" in result.stdout


def test_the_command_line_explains_itself() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpuserver", "serve", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for flag in ("--host", "--port", "--config", "--llm", "--engine", "--ice-host", "--log-dir"):
        assert flag in result.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "gpuserver", "--config", "/nonexistent.toml"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "config file not found" in bad.stderr


async def test_an_avatar_prepared_with_the_cli_while_the_server_runs_needs_no_restart(
    server: ServerProcess, tmp_path: Path
) -> None:
    workdir = server.log_dir.parent  # the server's avatars and cache live beside its logs
    async with AvatarClient(server.ws_url) as early:  # connected before the avatar exists
        source = tmp_path / "late.png"
        source.write_bytes(bundled_default_source().read_bytes())
        env_dirs = [
            f"GPUSERVER_AVATARS__DIR={workdir / 'avatars'}",
            f"GPUSERVER_AVATARS__CACHE_DIR={workdir / 'cache'}",
        ]
        command = [
            "env", *env_dirs, sys.executable, "-m", "gpuserver", "prepare-avatar", str(source),
            "--name", "Late one", "--log-dir", str(tmp_path / "logs"),
        ]  # fmt: skip
        done = await asyncio.to_thread(subprocess.run, command, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr

        async with httpx.AsyncClient() as http:
            listed = (await http.get(f"{server.http_url}/api/avatars")).json()["avatars"]
        assert {"id": "late", "name": "Late one"} in listed
        await early.send({"type": "set_avatar", "avatar_id": "late"})
        assert (await early.wait_for("avatar"))["avatar_id"] == "late"
    async with AvatarClient(server.ws_url) as later:
        assert {"id": "late", "name": "Late one"} in later.session["avatars"]
