"""Debian's headless Chromium, launched inside an IsolatedNetwork (never a downloaded browser)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from playwright.sync_api import BrowserContext, Playwright

from tests.netns import IsolatedNetwork

CHROMIUM = "/usr/bin/chromium"
# What made WebRTC work headless here (FIELD_NOTES): no mDNS-obfuscated candidates, loopback
# allowed, autoplay with sound, and no background traffic to Google's hosts.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--allow-loopback-in-peer-connection",
    "--disable-dev-shm-usage",
]


def launch(
    playwright: Playwright,
    netns: IsolatedNetwork,
    workdir: Path,
    extra_args: Sequence[str] = (),
) -> BrowserContext:
    """A persistent context (more reliable for media than `launch`) inside `netns`."""
    return playwright.chromium.launch_persistent_context(
        str(workdir / "profile"),
        executable_path=str(netns.executable(workdir, CHROMIUM)),
        headless=True,
        args=[*CHROMIUM_FLAGS, *extra_args],
        viewport={"width": 1280, "height": 800},
    )


def fake_microphone(wav: Path, *, allow: bool = True) -> list[str]:
    """Flags giving Chromium a microphone that plays `wav` (16-bit PCM) in a loop; with
    `allow`, the page's request for it is granted without a prompt."""
    flags = ["--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}"]
    return [*flags, "--use-fake-ui-for-media-stream"] if allow else flags
