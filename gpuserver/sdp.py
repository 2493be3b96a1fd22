"""Checks on what the browser sends for signalling, before aiortc sees it.

aiortc accepts garbage SDP ("", "v=0\\r\\nfoo") without an error, so offers are validated
here to answer `bad_sdp` with a reason a client author can act on.
"""

from __future__ import annotations

from aiortc import RTCIceCandidate
from aiortc.sdp import SessionDescription, candidate_from_sdp

MAX_SDP_BYTES = 64 * 1024
_RECEIVING = ("recvonly", "sendrecv")


class SdpError(ValueError):
    """The offer or candidate is unusable; the message says why."""


def validate_offer(sdp: str) -> None:
    """Raise SdpError unless `sdp` is an offer with audio and video lines we can send on."""
    if not sdp.strip():
        raise SdpError("the offer is empty")
    if len(sdp.encode()) > MAX_SDP_BYTES:
        raise SdpError(f"the offer is larger than {MAX_SDP_BYTES} bytes")
    if not sdp.lstrip().startswith("v=0"):
        raise SdpError("not an SDP offer: it must start with 'v=0'")
    try:
        description = SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc's parser raises assorted errors on bad lines
        raise SdpError(f"the offer could not be parsed: {exc}") from None
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
        raise SdpError(f"the candidate could not be parsed: {exc}") from None
    parsed.sdpMid = sdp_mid
    parsed.sdpMLineIndex = sdp_mline_index
    return parsed
