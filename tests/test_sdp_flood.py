"""A flood of SDP bombs on one socket: every bomb is refused, a bystander's video keeps coming."""

from __future__ import annotations

import asyncio

import pytest

from gpuserver.client import AvatarClient
from tests.conftest import ServerProcess
from tests.test_sdp import codec_feedback_bomb

pytestmark = pytest.mark.slow

BYSTANDER_FRAMES = 50  # 2 s of video


async def test_a_bystanders_video_keeps_flowing_through_an_sdp_bomb_flood(
    server: ServerProcess,
) -> None:
    bomb = codec_feedback_bomb()
    async with AvatarClient(server.ws_url) as bystander, AvatarClient(server.ws_url) as flooder:
        await bystander.start_media()
        start = len(bystander.media.video)
        answers: list[dict] = []

        async def flood() -> None:
            # Paced below the per-socket message limit, so every bomb reaches the SDP checks.
            while True:
                count = len(flooder.messages)
                await flooder.send({"type": "webrtc_offer", "sdp": bomb})
                answers.append(await flooder.wait_for("error", after=count, timeout=60))
                await asyncio.sleep(0.03)

        flooding = asyncio.create_task(flood())
        try:
            # Each bomb used to hold the event loop for seconds: 50 frames took minutes.
            async with asyncio.timeout(60):
                while len(bystander.media.video) - start < BYSTANDER_FRAMES:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        finally:
            flooding.cancel()
        assert len(answers) >= 5
        assert all(a["code"] == "bad_sdp" and "at most 1000" in a["message"] for a in answers)
        count = len(bystander.messages)
        await bystander.send({"type": "ping", "t": 1})
        assert (await bystander.wait_for("pong", after=count))["t"] == 1
