"""Offer validation: what `bad_sdp` catches before aiortc (which accepts garbage) sees it."""

from __future__ import annotations

import threading

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from gpuserver import sdp as sdp_module
from gpuserver.sdp import (
    MAX_MEDIA_SECTIONS,
    MAX_SDP_BYTES,
    SdpError,
    parse_candidate,
    validate_offer,
    validate_offer_async,
)


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


def codec_feedback_bomb(size: int = 58_000) -> str:
    """The flood's offer: a few valid lines, then codecs x `rtcp-fb:*` lines up to `size`."""
    lines = [
        "v=0", "o=- 1 1 IN IP4 127.0.0.1", "s=-", "t=0 0",
        "a=fingerprint:sha-256 " + ":".join(["AB"] * 32), "a=setup:actpass",
        "a=ice-ufrag:abcd", "a=ice-pwd:abcdefghijklmnopqrstuvwx",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111", "a=recvonly", "a=rtpmap:111 opus/48000/2",
        "m=video 9 UDP/TLS/RTP/SAVPF 96", "a=recvonly",
    ]  # fmt: skip
    lines += [f"a=rtpmap:{96 + i % 30} VP8/90000" for i in range(1000)]
    sdp = "\n".join(lines) + "\n"
    feedback = "a=rtcp-fb:* nack\n"
    return sdp + feedback * ((size - len(sdp)) // len(feedback))


@pytest.fixture
def parser_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the threads aiortc's SDP parser ran on."""
    calls: list[str] = []
    original = sdp_module.SessionDescription.parse

    def parse(text: str) -> sdp_module.SessionDescription:
        calls.append(threading.current_thread().name)
        return original(text)

    monkeypatch.setattr(sdp_module.SessionDescription, "parse", parse)
    return calls


def test_a_64_kib_codec_feedback_bomb_is_refused_before_aiortc_parses_it(
    parser_calls: list[str],
) -> None:
    bomb = codec_feedback_bomb()
    assert len(bomb) < MAX_SDP_BYTES
    assert "at most 1000" in reason(bomb)
    assert parser_calls == []


def offer_with(extra: list[str], media: int = 1) -> str:
    sections = "".join(f"m=video 9 UDP/TLS/RTP/SAVPF 96\r\n{''.join(extra)}" for _ in range(media))
    return f"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n{sections}"


@pytest.mark.parametrize(
    ("sdp", "expected"),
    [
        (offer_with([], media=MAX_MEDIA_SECTIONS + 1), "m-lines"),
        (offer_with(["a=rtcp-fb:* nack\r\n"] * 9), "a=rtcp-fb:* lines"),
        (offer_with(["a=rtcp-fb:96 nack\r\n"] * 257), "a=rtcp-fb lines"),
        (offer_with([f"a=rtpmap:{i} VP8/90000\r\n" for i in range(65)]), "a=rtpmap lines"),
        (offer_with(["a=ssrc:1 cname:x\r\n"] * 65), "a=ssrc lines"),
        (offer_with(["a=candidate:1 1 udp 1 127.0.0.1 9 typ host\r\n"] * 33), "candidates"),
        (offer_with([]).replace("SAVPF 96", "SAVPF " + " ".join(["96"] * 65)), "formats"),
    ],
)
def test_offers_over_a_bound_are_refused_with_the_bound_named(
    sdp: str, expected: str, parser_calls: list[str]
) -> None:
    assert expected in reason(sdp)
    assert parser_calls == []


async def test_browser_like_offers_stay_within_the_bounds() -> None:
    offer = await make_offer("audio", "video", direction="sendrecv")
    candidate = "a=candidate:1 1 udp 2122260223 127.0.0.1 5000 typ host\r\n"
    validate_offer(offer.replace("a=mid:0\r\n", "a=mid:0\r\n" + candidate * 16))


async def test_the_async_check_parses_off_the_event_loop(parser_calls: list[str]) -> None:
    good, audio_only = await make_offer("audio", "video"), await make_offer("audio")
    parser_calls.clear()  # making the offers parsed them too
    await validate_offer_async(good)
    with pytest.raises(SdpError, match="at most 1000"):
        await validate_offer_async(codec_feedback_bomb())
    with pytest.raises(SdpError, match="no video m-line"):
        await validate_offer_async(audio_only)
    assert parser_calls == ["sdp-parse_0"] * 2  # the bomb was never parsed
