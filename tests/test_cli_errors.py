"""A user's mistake on the command line: one line saying what is wrong and how to fix it.

Each case runs the real `gpuserver` program. It must exit non-zero (2) with exactly one
ERROR line, no traceback (only at --log-level DEBUG), and without starting to serve.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parent.parent


def gpuserver(workdir: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run the program in `workdir`; its exit code and its stdout + stderr."""
    environment = {
        **os.environ,
        "GPUSERVER_AVATARS__DIR": str(workdir / "avatars"),
        "GPUSERVER_AVATARS__CACHE_DIR": str(workdir / "cache"),
        "GPUSERVER_LOGGING__DIR": str(workdir / "logs"),
        "PYTHONPATH": str(PROJECT),  # this checkout's code, whatever is installed
        **(env or {}),
    }
    done = subprocess.run(
        [sys.executable, "-m", "gpuserver", *args],
        cwd=workdir,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stdout + done.stderr


def the_one_error(output: str) -> str:
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1, output
    assert "Traceback" not in output, output
    return errors[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_busy_port_is_named_with_a_free_one_to_use_instead(
    tmp_path: Path, busy_port: int
) -> None:
    code, output = gpuserver(tmp_path, "serve", "--llm", "echo", "--port", str(busy_port))
    assert code == 2
    line = the_one_error(output)
    assert f"port {busy_port} on 127.0.0.1 is already in use" in line
    assert f"--port {busy_port + 1}" in line
    assert "ready on" not in output and "starting gpuserver" not in output, "nothing started"


def test_the_traceback_is_there_at_debug_level(tmp_path: Path, busy_port: int) -> None:
    args = ("serve", "--llm", "echo", "--port", str(busy_port), "--log-level", "DEBUG")
    code, output = gpuserver(tmp_path, *args)
    assert code == 2
    assert "already in use" in output and "Traceback" in output


def test_musetalk_without_weights_says_how_to_get_them(tmp_path: Path) -> None:
    args = ("serve", "--engine", "musetalk", "--llm", "echo", "--port", str(free_port()))
    code, output = gpuserver(
        tmp_path, *args, env={"GPUSERVER_ENGINE__MODELS_DIR": str(tmp_path / "models")}
    )
    assert code == 2
    line = the_one_error(output)
    assert "MuseTalk weights missing" in line and "musetalkV15/unet.pth" in line
    assert "gpuserver download-models" in line and "--engine warp" in line


def test_an_unknown_voice_is_refused_at_start_with_the_list(tmp_path: Path) -> None:
    args = ("serve", "--llm", "echo", "--port", str(free_port()))
    code, output = gpuserver(tmp_path, *args, env={"GPUSERVER_TTS__VOICE": "xyzzy"})
    assert code == 2
    line = the_one_error(output)
    assert "Unknown espeak-ng voice 'xyzzy'" in line
    assert "en-us" in line and "cmn" in line and "gpuserver voices" in line


def test_an_unknown_default_avatar_says_how_to_add_one(tmp_path: Path) -> None:
    args = ("serve", "--llm", "echo", "--port", str(free_port()), "--avatar", "nobody")
    code, output = gpuserver(tmp_path, *args)
    assert code == 2
    line = the_one_error(output)
    assert "unknown avatar 'nobody'" in line and "gpuserver prepare-avatar" in line


def write_avatar_source(directory: Path, kind: str) -> Path:
    if kind == "no face":
        path = directory / "wall.png"
        cv2.imwrite(str(path), np.full((400, 300, 3), 127, np.uint8))
    elif kind == "not an image":
        path = directory / "notes.txt"
        path.write_text("hello")
    else:  # text with an image's name
        path = directory / "photo.png"
        path.write_text("not really a picture")
    return path


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("no face", "no face found in the avatar image: use a well-lit, front-facing portrait"),
        ("not an image", "unsupported file type '.txt'; use .avi, .bmp"),
        ("named like an image", "not a PNG, JPEG, WebP or BMP image"),
    ],
)
def test_an_unusable_avatar_source_is_one_line_and_leaves_nothing_behind(
    tmp_path: Path, kind: str, says: str
) -> None:
    source = write_avatar_source(tmp_path, kind)
    code, output = gpuserver(tmp_path, "prepare-avatar", source.name)
    assert code == 2
    line = the_one_error(output)
    assert f"cannot make an avatar of {source.name}: " in line and says in line
    assert not any((tmp_path / "avatars").glob("*")), "the failed source was removed"


def test_voices_lists_the_espeak_voices_by_id_and_name(tmp_path: Path) -> None:
    code, output = gpuserver(tmp_path, "voices", env={"GPUSERVER_TTS__VOICE": "xyzzy"})
    assert code == 0, output
    lines = output.splitlines()
    assert any(line.split(None, 1) == ["en-us", "English (America)"] for line in lines)
    assert any(line.split(None, 1)[:1] == ["cmn"] for line in lines)
    assert "voices of the espeak TTS; tts.voice = xyzzy" in output
