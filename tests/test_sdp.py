"""Offer validation: what `bad_sdp` catches before aiortc (which accepts garbage) sees it."""

from __future__ import annotations

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from gpuserver.sdp import SdpError, parse_candidate, validate_offer


async def make_offer(*kinds: str, direction: str = "recvonly") -> str:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    for kind in kinds:
        pc.addTransceiver(kind, direction=direction)
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def test_a_recvonly_audio_and_video_offer_is_valid() -> None:
    validate_offer(await make_offer("audio", "video"))


async def test_a_sendrecv_offer_with_a_microphone_is_accepted() -> None:
    validate_offer(await make_offer("audio", "video", direction="sendrecv"))


def reason(sdp: str) -> str:
    with pytest.raises(SdpError) as caught:
        validate_offer(sdp)
    return str(caught.value)


@pytest.mark.parametrize(
    ("sdp", "expected"),
    [
        ("", "empty"),
        ("hello", "v=0"),
        ("v=0\r\nfoo", "no audio m-line"),
    ],
)
def test_text_that_is_not_an_offer_is_rejected(sdp: str, expected: str) -> None:
    assert expected in reason(sdp)


async def test_an_offer_without_video_says_how_to_add_it() -> None:
    assert "addTransceiver('video'" in reason(await make_offer("audio"))


async def test_an_offer_that_only_sends_cannot_receive_the_avatar() -> None:
    assert "sendonly" in reason(await make_offer("audio", "video", direction="sendonly"))


async def test_an_offer_without_dtls_fingerprint_is_rejected() -> None:
    sdp = await make_offer("audio", "video")
    stripped = "\r\n".join(line for line in sdp.split("\r\n") if "fingerprint" not in line)
    assert "fingerprint" in reason(stripped)


def test_a_browser_candidate_is_parsed_with_its_mid() -> None:
    line = "candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host generation 0"
    candidate = parse_candidate(line, "0", 0)
    assert candidate is not None
    assert (candidate.ip, candidate.port, candidate.sdpMid) == ("127.0.0.1", 50000, "0")


def test_an_empty_candidate_string_means_end_of_candidates() -> None:
    assert parse_candidate("", "0", 0) is None


@pytest.mark.parametrize(
    ("line", "mid", "index", "expected"),
    [
        ("candidate:garbage", "0", 0, "could not be parsed"),
        ("candidate:1 1 udp 1 127.0.0.1 5 typ host", None, None, "sdpMid"),
    ],
)
def test_bad_candidates_are_explained(
    line: str, mid: str | None, index: int | None, expected: str
) -> None:
    with pytest.raises(SdpError, match=expected):
        parse_candidate(line, mid, index)
