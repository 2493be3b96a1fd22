"""One turn, one pipeline: ordering, avatars between turns, owned tasks, dedicated threads.

Each test serves the real app in-process (so a fault can be patched in and the loop's
threads watched) and drives it with the protocol's Python client over real WebRTC on
127.0.0.1. Frames are told apart by the `clapper` engine: a white frame on every loud tick,
the turn's avatar on every quiet one — here a black avatar or the astronaut.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpuserver.client import AvatarClient, ReceivedVideo
from gpuserver.config import Settings
from gpuserver.engines.clapper import ClapperEngine
from gpuserver.media_clock import MediaClock
from tests.conftest import InProcessServer, loopback_settings, serve_in_process
from tests.fakes.openai_server import FakeOpenAI, run_fake_openai

pytestmark = pytest.mark.slow


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with run_fake_openai(FakeOpenAI(seconds_per_word=0.4, token_delay_s=0.05)) as running:
        yield running


def clapper_settings(workdir: Path, fake: FakeOpenAI, **groups: dict[str, Any]) -> Settings:
    """The clapper engine speaking the fake's tone bursts; a black avatar besides the default."""
    (workdir / "avatars").mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(workdir / "avatars" / "black.png"), np.zeros((512, 512, 3), np.uint8))
    return loopback_settings(
        workdir,
        engine={"name": "clapper"},
        tts={"backend": "openai", "base_url": fake.base_url, "model": "bursts"},
        **groups,
    )


class Looks:
    """Which picture a received frame shows: the white flash, the black avatar or the portrait."""

    def __init__(self, portrait: np.ndarray) -> None:
        self.references = {
            "white": np.full_like(portrait, 235),
            "black": np.full_like(portrait, 16),
            "portrait": portrait.astype(np.int16),
        }

    def __call__(self, frame: ReceivedVideo) -> str:
        assert frame.luma is not None
        luma = frame.luma.astype(np.int16)
        return min(self.references, key=lambda name: np.abs(luma - self.references[name]).mean())


def during_speech(client: AvatarClient, looks: Looks) -> list[str]:
    """What the frames from the first flash to the last one showed."""
    shown = [looks(frame) for frame in client.media.video]
    flashes = [i for i, name in enumerate(shown) if name == "white"]
    assert flashes, "the speech arrived"
    return shown[flashes[0] : flashes[-1] + 1]


@contextlib.asynccontextmanager
async def watching(server: InProcessServer) -> AsyncIterator[tuple[AvatarClient, Looks]]:
    """A client receiving media, and what its idle frames (the portrait) look like."""
    async with AvatarClient(server.ws_url, keep_video=True) as client:
        await client.start_media()
        await asyncio.sleep(0.5)
        assert client.media.video[-1].luma is not None
        yield client, Looks(client.media.video[-1].luma)


async def test_set_avatar_then_speak_speaks_with_the_new_avatar(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    async with (
        serve_in_process(clapper_settings(tmp_path, fake)) as server,
        watching(server) as (client, looks),
    ):
        # Sent back to back: the avatar (prepared on first use) must be in place first.
        await client.send({"type": "set_avatar", "avatar_id": "black"})
        await client.send({"type": "speak", "text": "one two three four"})
        await client.wait_for("speech_stopped", timeout=20)
    kinds = [m["type"] for _, m in client.messages]
    assert kinds.index("avatar") < kinds.index("speech_started")
    shown = during_speech(client, looks)
    assert "portrait" not in shown
    assert shown.count("black") > shown.count("white")


async def test_an_avatar_switch_during_a_turn_waits_for_the_turn_to_end(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    async with (
        serve_in_process(clapper_settings(tmp_path, fake)) as server,
        watching(server) as (client, looks),
    ):
        await client.send({"type": "set_avatar", "avatar_id": "black"})
        await client.send({"type": "speak", "text": "one two three four five six"})
        await client.wait_for("speech_started", timeout=20)
        await client.send({"type": "set_avatar", "avatar_id": "default"})
        await client.wait_for("avatar", where=lambda m: m["avatar_id"] == "default")
        stopped = await client.wait_for("speech_stopped", timeout=20)
        await asyncio.sleep(1.0)
    assert stopped["interrupted"] is False
    assert "portrait" not in during_speech(client, looks), "one avatar per turn"
    after = [f for f in client.media.video if f.arrival > client.arrival_of(stopped) + 0.5]
    assert after and all(looks(frame) == "portrait" for frame in after)


async def test_a_queued_speak_after_a_text_only_chat_is_spoken(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    llm = {"backend": "openai", "base_url": fake.base_url, "model": "story"}
    async with (
        serve_in_process(clapper_settings(tmp_path, fake, llm=llm)) as server,
        AvatarClient(server.ws_url) as client,
    ):
        chat = await client.send({"type": "chat", "text": "Tell me a story."})
        await client.wait_for("llm_text")  # generating, and nobody to speak to
        await client.start_media()
        speak = await client.send({"type": "speak", "text": "one two", "queue": True})
        stopped = await client.wait_for("speech_stopped", timeout=30)
        text = await client.wait_for("text")
    assert stopped["ref"] == speak and not stopped["interrupted"]
    assert text["ref"] == chat
    assert not client.of_type("interrupted")


async def test_a_crashing_media_clock_ends_its_session_with_internal_and_spares_others(
    tmp_path: Path, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    doomed: set[str] = set()
    step = MediaClock.step

    def faulty_step(clock: MediaClock) -> None:
        if getattr(clock.sink, "session_id", None) in doomed:
            raise RuntimeError("a bug in the media clock")
        step(clock)

    monkeypatch.setattr(MediaClock, "step", faulty_step)
    async with (
        serve_in_process(clapper_settings(tmp_path, fake)) as server,
        AvatarClient(server.ws_url) as victim,
        AvatarClient(server.ws_url) as other,
    ):
        await victim.start_media()
        await other.start_media()
        doomed.add(victim.session["session_id"])
        error = await victim.wait_for("error", timeout=10)
        await asyncio.wait_for(victim._ws.wait_closed(), 10)
        frames_before = len(other.media.video)
        await other.send({"type": "speak", "text": "one two"})
        await other.wait_for("speech_stopped", timeout=20)
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            listed = (await http.get("/api/sessions")).json()["sessions"]
    assert error["code"] == "internal"
    assert victim._ws.close_code == 1011
    assert len(other.media.video) > frames_before + 10
    assert [s["id"] for s in listed] == [other.session["session_id"]]


async def test_a_slow_preparation_does_not_starve_a_speaking_session(
    tmp_path: Path, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepare = ClapperEngine.prepare

    def slow_prepare(engine: ClapperEngine, source: Path, avatar_id: str, *args: Any) -> Any:
        if avatar_id.startswith("upload"):
            time.sleep(3)  # holds its thread, like a big video or a bomb being decoded
        return prepare(engine, source, avatar_id, *args)

    monkeypatch.setattr(ClapperEngine, "prepare", slow_prepare)
    png = cv2.imencode(".png", np.zeros((64, 64, 3), np.uint8))[1].tobytes()
    async with serve_in_process(clapper_settings(tmp_path, fake)) as server:
        avatars = server.app.state.services.avatars
        async with AvatarClient(server.ws_url) as client:
            await client.start_media()
            await client.send({"type": "speak", "text": "one two three four five six seven"})
            await client.wait_for("speech_started", timeout=20)
            uploads = [
                asyncio.create_task(avatars.add(png, "u.png", f"upload{n}")) for n in range(8)
            ]
            window_start = time.monotonic()
            await asyncio.sleep(2.5)
            received = [f for f in client.media.video if f.arrival >= window_start]
            for upload in uploads:
                upload.cancel()
            await asyncio.gather(*uploads, return_exceptions=True)
    # 2.5 s at 25 fps is ~62 frames; a starved encoder (all shared threads preparing)
    # delivers none. Half is far from both: a loaded machine, not a blocked pipeline.
    assert len(received) >= 30


class RecordingExecutor(ThreadPoolExecutor):
    """The loop's default executor, noting what it runs."""

    def __init__(self) -> None:
        super().__init__(max_workers=4)
        self.ran: set[str] = set()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        target: Any = fn
        # asyncio.to_thread wraps its callable as partial(context.run, callable, ...).
        if isinstance(target, functools.partial) and target.args:
            target = target.args[0]
        self.ran.add(f"{target.__module__}.{target.__qualname__}")
        return super().submit(fn, *args, **kwargs)


async def test_the_default_executor_is_left_to_the_encoders_and_decoders(
    tmp_path: Path,
) -> None:
    """Warp rendering, espeak, preparation and avatar scans all run on threads of their own."""
    recorder = RecordingExecutor()
    asyncio.get_running_loop().set_default_executor(recorder)
    settings = loopback_settings(tmp_path, tts={"backend": "espeak"})
    async with serve_in_process(settings) as server, AvatarClient(server.ws_url) as client:
        await client.start_media()
        await client.send({"type": "speak", "text": "Hello there, how are you today?"})
        await client.wait_for("speech_stopped", timeout=30)
        await server.app.state.services.avatars.rescan()
    assert recorder.ran, "aiortc encoded and decoded frames there"
    ours = {name for name in recorder.ran if not name.startswith("aiortc.")}
    assert ours <= {"gpuserver.video_encoder._TunedEncoder.encode"}, ours


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_are_prometheus_text_that_counts_what_happened(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    async with (
        serve_in_process(clapper_settings(tmp_path, fake)) as server,
        AvatarClient(server.ws_url) as client,
        httpx.AsyncClient() as http,
    ):
        await client.send({"type": "speak", "text": "no offer yet"})  # -> no_peer
        await client.wait_for("error")
        await client.start_media()
        await client.send({"type": "speak", "text": "one two"})
        await client.wait_for("speech_stopped", timeout=20)
        await client.send({"type": "speak", "text": "one two three four five"})
        await client.wait_for("speech_started", after=len(client.messages), timeout=20)
        await client.send({"type": "interrupt"})
        await client.wait_for("interrupted")
        await asyncio.sleep(0.3)
        response = await http.get(f"{server.http_url}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = metric_samples(response.text)
    value = lambda name, **labels: samples.get((name, tuple(sorted(labels.items()))), 0)  # noqa: E731
    assert value("gpuserver_turns_total", kind="speak") == 2
    assert value("gpuserver_interrupts_total") == 1
    assert value("gpuserver_errors_total", code="no_peer") == 1
    assert value("gpuserver_first_frame_seconds_count") == 2
    assert value("gpuserver_interrupt_to_idle_seconds_count") == 1
    assert value("gpuserver_video_encode_seconds_count") > 10
    assert value("gpuserver_frames_total", kind="speech") > 10
    assert value("gpuserver_frames_total", kind="idle") > 0
    assert value("gpuserver_sessions") == 1
    assert value("gpuserver_peer_connections") == 1
    with contextlib.suppress(KeyError):
        assert samples[("gpuserver_engine_batch_size", ())] >= 0
