"""Browser latency: page load -> first decoded frame, and `speak` -> first speaking frame.

Debian's headless Chromium and the server run in a private network namespace (loopback
only). Each run opens the chat page in a fresh tab and reads, in the page:
  - first frame: the first requestVideoFrameCallback after navigation (ms since navigation);
  - speak -> speaking frame: the client sends `speak`; a frame callback compares the mouth
    region of each presented frame with the idle mouth and reports the first that differs.
Both are measured with trickle ICE (the default) and, as the baseline, with the client
waiting for ICE gathering before sending its offer (`?trickle=0`).

    sudo .venv/bin/python bench/browser_first_frame.py [--runs 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from playwright.sync_api import Page, sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.chromium import launch
from tests.conftest import start_server
from tests.netns import IsolatedNetwork

# The default avatar's mouth (x 188-258, y 122-168 of 512x512) and what counts as moved.
MOUTH = (188, 122, 70, 46)
MOVED = 6.0  # mean absolute difference of the mouth's pixels, 0-255 scale

WATCH_MOUTH = """([x, y, w, h, moved]) => new Promise((resolve) => {
  const video = document.getElementById('avatar-video');
  const canvas = new OffscreenCanvas(w, h);
  const ctx = canvas.getContext('2d', {willReadFrequently: true});
  const mouth = () => { ctx.drawImage(video, x, y, w, h, 0, 0, w, h);
                        return ctx.getImageData(0, 0, w, h).data; };
  const idle = mouth();
  const sent = performance.now();
  window.avatarApp.client.speak('Hello! Nice to meet you.');
  const check = (now) => {
    const pixels = mouth();
    let diff = 0;
    for (let i = 0; i < pixels.length; i += 4) diff += Math.abs(pixels[i + 1] - idle[i + 1]);
    if (diff / (pixels.length / 4) > moved) resolve(now - sent);
    else video.requestVideoFrameCallback(check);
  };
  video.requestVideoFrameCallback(check);
})"""


def one_run(page: Page, url: str) -> tuple[float, float]:
    page.goto(url)
    page.wait_for_function("window.avatarApp && window.avatarApp.frames.length > 0", timeout=30_000)
    first_frame = page.evaluate("window.avatarApp.frames[0].now")
    page.wait_for_function("window.avatarApp.frames.length > 25", timeout=30_000)
    speaking = page.evaluate(WATCH_MOUTH, [*MOUTH, MOVED])
    page.evaluate("window.avatarApp.client.interrupt()")
    return first_frame, speaking


def summarize(name: str, values: list[float]) -> str:
    p50, p95 = np.percentile(values, [50, 95])
    return f"{name:<34} p50 {p50:6.0f} ms   p95 {p95:6.0f} ms   (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-browser-"))
    netns = IsolatedNetwork()
    server = start_server(workdir, "--llm", "echo", "--log-level", "WARNING", netns=netns)
    results: dict[str, tuple[list[float], list[float]]] = {}
    try:
        with sync_playwright() as playwright:
            context = launch(playwright, netns, workdir)
            for mode, query in (
                ("trickle ICE", ""),
                ("wait for gathering (baseline)", "?trickle=0"),
            ):
                firsts, speaks = [], []
                for _ in range(args.runs):
                    page = context.new_page()
                    first, speak = one_run(page, f"{server.http_url}/{query}")
                    page.close()
                    firsts.append(first)
                    speaks.append(speak)
                results[mode] = (firsts, speaks)
            context.close()
    finally:
        server.stop()
        netns.close()
    print(f"Chromium (Debian, headless) <-> gpuserver on loopback, {args.runs} runs each")
    for mode, (firsts, speaks) in results.items():
        print(f"[{mode}]")
        print("  " + summarize("page load -> first decoded frame", firsts))
        print("  " + summarize("speak -> first speaking frame", speaks))
    trickle, baseline = results["trickle ICE"][0], results["wait for gathering (baseline)"][0]
    ratio = np.median(baseline) / np.median(trickle)
    print(f"first frame, baseline / trickle (median): {ratio:.2f}x")


if __name__ == "__main__":
    main()
