"""Checks on what the browser sends for signalling, before aiortc sees it.

aiortc accepts garbage SDP ("", "v=0\\r\\nfoo") without an error, so offers are validated
here to answer `bad_sdp` with a reason a client author can act on.

aiortc's parser is also quadratic: every `a=rtcp-fb` line walks every codec of its m-line
(one object per match), and `a=fmtp`/`a=ssrc` lines search the lists built so far. A 60 KB
offer of `a=rtpmap` and `a=rtcp-fb:*` lines took seconds of event-loop time. So the lines
are counted first, in one linear pass, against bounds that any browser's offer stays far
below; only then is the text parsed, in a worker thread of its own.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from aiortc import RTCIceCandidate
from aiortc.sdp import SessionDescription, candidate_from_sdp

MAX_SDP_BYTES = 64 * 1024
# Bounds on an offer's lines (a browser's audio+video offer: ~150 lines, ~40 video codecs).
MAX_LINES = 1000
MAX_MEDIA_SECTIONS = 8
MAX_CANDIDATES = 32  # in the offer itself; trickled candidates are the caller's to bound
# Per m-line, for the attributes aiortc's parser handles in quadratic time (browsers send
# per-codec rtcp-fb lines; "rtcp-fb:*" applies to every codec).
MAX_PER_MEDIA = {"rtpmap": 64, "fmtp": 64, "rtcp-fb": 256, "rtcp-fb:*": 8, "ssrc": 64}
MAX_FORMATS = 64  # payload types listed on one m= line
_RECEIVING = ("recvonly", "sendrecv")

# One thread, not the loop's default executor (aiortc's encoders use that): a flood of
# offers queues here instead of delaying anyone's video.
_parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdp-parse")


class SdpError(ValueError):
    """The offer or candidate is unusable; the message says why."""


def check_offer_bounds(sdp: str) -> None:
    """Raise SdpError if `sdp` is empty, too large or has more lines of a kind than allowed.

    Linear in the size of `sdp` and cheap enough to run on the event loop.
    """
    if not sdp.strip():
        raise SdpError("the offer is empty")
    if len(sdp) > MAX_SDP_BYTES or len(sdp.encode()) > MAX_SDP_BYTES:
        raise SdpError(f"the offer is larger than {MAX_SDP_BYTES} bytes")
    if not sdp.lstrip().startswith("v=0"):
        raise SdpError("not an SDP offer: it must start with 'v=0'")
    lines = sdp.splitlines()  # aiortc splits the same way
    if len(lines) > MAX_LINES:
        raise SdpError(f"the offer has {len(lines)} lines; at most {MAX_LINES} are accepted")
    media_sections = candidates = 0
    counts: Counter[str] = Counter()
    for line in lines:
        if line.startswith("m="):
            media_sections += 1
            if media_sections > MAX_MEDIA_SECTIONS:
                raise SdpError(f"the offer has more than {MAX_MEDIA_SECTIONS} m-lines")
            formats = len(line.split()) - 3
            if formats > MAX_FORMATS:
                raise SdpError(f"an m-line lists {formats} formats; at most {MAX_FORMATS}")
            counts.clear()
        elif line.startswith("a="):
            kind = _bounded_kind(line)
            if kind == "candidate":
                candidates += 1
                if candidates > MAX_CANDIDATES:
                    raise SdpError(f"the offer has more than {MAX_CANDIDATES} candidates")
            elif kind is not None:
                counts[kind] += 1
                if counts[kind] > MAX_PER_MEDIA[kind]:
                    raise SdpError(
                        f"an m-line of the offer has more than {MAX_PER_MEDIA[kind]} a={kind} lines"
                    )


def _bounded_kind(line: str) -> str | None:
    """The kind of `a=` line that check_offer_bounds counts, if it is one."""
    if line.startswith("a=rtcp-fb:*"):
        return "rtcp-fb:*"  # feedback for every codec: one object per codec
    attribute = line[2:].split(":", 1)[0]
    return attribute if attribute == "candidate" or attribute in MAX_PER_MEDIA else None


def validate_offer(sdp: str) -> None:
    """Raise SdpError unless `sdp` is an offer with audio and video lines we can send on.

    Blocking (it parses); on the event loop use `validate_offer_async`.
    """
    check_offer_bounds(sdp)
    _check_parsed(sdp)


async def validate_offer_async(sdp: str) -> None:
    """`validate_offer` with the bounds checked first and the parse off the event loop."""
    check_offer_bounds(sdp)
    await asyncio.get_running_loop().run_in_executor(_parser, _check_parsed, sdp)


def _check_parsed(sdp: str) -> None:
    try:
        description = SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc's parser raises assorted errors on bad lines
        raise SdpError(f"the offer could not be parsed: {_short(exc)}") from None
    for kind in ("audio", "video"):
        media = next((m for m in description.media if m.kind == kind), None)
        if media is None:
            raise SdpError(
                f"the offer has no {kind} m-line: add a recvonly {kind} transceiver "
                f"(pc.addTransceiver('{kind}', {{direction: 'recvonly'}}))"
            )
        if media.port == 0:
            raise SdpError(f"the offer's {kind} m-line is rejected (port 0)")
        if media.direction not in _RECEIVING:
            raise SdpError(
                f"the offer's {kind} m-line is {media.direction}: it must be recvonly "
                "(or sendrecv) to receive the avatar"
            )
        if not media.ice.usernameFragment or not media.ice.password:
            raise SdpError(f"the offer's {kind} m-line has no ICE credentials (a=ice-ufrag/pwd)")
        if not media.dtls or not media.dtls.fingerprints:
            raise SdpError(f"the offer's {kind} m-line has no DTLS a=fingerprint and a=setup")
        if not media.rtp.codecs:
            raise SdpError(f"the offer's {kind} m-line lists no codecs")


def _short(exc: Exception) -> str:
    """The parser's complaint, bounded: it may quote the offending (client-supplied) line."""
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:120] + "…"


def parse_candidate(
    candidate: str, sdp_mid: str | None, sdp_mline_index: int | None
) -> RTCIceCandidate | None:
    """An aiortc candidate from the browser's RTCIceCandidateInit; None = end of candidates."""
    text = candidate.strip()
    if not text:
        return None  # browsers signal end-of-candidates with an empty candidate string
    if sdp_mid is None and sdp_mline_index is None:
        raise SdpError("the candidate needs sdpMid or sdpMLineIndex")
    if text.startswith("candidate:"):
        text = text[len("candidate:") :]
    try:
        parsed = candidate_from_sdp(text)
    except Exception as exc:
        raise SdpError(f"the candidate could not be parsed: {_short(exc)}") from None
    parsed.sdpMid = sdp_mid
    parsed.sdpMLineIndex = sdp_mline_index
    return parsed
