"""End to end with the musetalk engine: a real server process on tiny random weights.

The picture is noise (random weights) and CPU inference is slow, so this checks plumbing
and timing events, not quality or frame rate: the server loads the official layout, the
default avatar is prepared, a `speak` turn streams lip-sync frames over WebRTC.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuserver.client import AvatarClient
from tests.conftest import ServerProcess, start_server
from tests.musetalk_fixtures import TEST_BATCH, tiny_models_dir

__all__ = ["tiny_models_dir"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def musetalk_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[ServerProcess]:
    env = {
        "GPUSERVER_ENGINE__MODELS_DIR": str(tiny_models_dir),
        "GPUSERVER_ENGINE__DEVICE": "cpu",
        "GPUSERVER_ENGINE__BATCH_SIZE": str(TEST_BATCH),
    }
    workdir = tmp_path_factory.mktemp("musetalk-server")
    server = start_server(workdir, "--llm", "echo", "--engine", "musetalk", env=env)
    yield server
    server.stop()


async def test_speak_streams_musetalk_frames(musetalk_server: ServerProcess) -> None:
    async with AvatarClient(musetalk_server.ws_url) as client:
        await client.start_media()
        count = len(client.messages)
        await client.send({"type": "speak", "text": "Hello, I am speaking through MuseTalk."})
        started = await client.wait_for("speech_started", after=count, timeout=60)
        stopped = await client.wait_for("speech_stopped", after=count, timeout=120)
        await asyncio.sleep(0.3)
    assert started["turn_id"] == stopped["turn_id"] and stopped["interrupted"] is False
    t_start, t_stop = client.arrival_of(started), client.arrival_of(stopped)
    during = [f for f in client.media.video if t_start <= f.arrival <= t_stop]
    assert len(during) >= 25  # the sentence lasts > 1 s: frames flowed all along
    assert max(a.rms for a in client.media.audio if t_start <= a.arrival <= t_stop) > 300
    log = musetalk_server.log()
    assert "MuseTalk loaded" in log and "elliptical lower-face masks" in log
