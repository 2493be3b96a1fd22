"""The `clapper` engine: a clapperboard for checking lip-sync end to end.

Every tick whose audio is loud is drawn as a white frame and every other tick as the avatar's
still portrait, so wherever a receiver sees white it must hear sound at the same moment.
Point any client at a server running `--engine clapper` and compare the arrival of white
frames with the arrival of loud audio: that is the lip-sync error of the whole path (clock,
tracks, encoders, network, the client's decoders). No face detection, no model.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from gpuserver.engines.base import (
    LipSyncEngine,
    PhaseSource,
    PreparedAvatar,
    Progress,
    source_digest,
)
from gpuserver.engines.preparation import report
from gpuserver.engines.warp import DEFAULT_MAX_SIDE, fit_even, load_source_image
from gpuserver.media import SAMPLES_PER_TICK

LOUD_RMS = 1000.0  # int16 scale: speech and test tones are far above, silence far below


@dataclass(eq=False)
class ClapperAvatar(PreparedAvatar):
    flash: np.ndarray = field(repr=False, kw_only=True)


def is_loud(block: np.ndarray) -> bool:
    samples = block.astype(np.float32)
    return float(np.sqrt(np.mean(samples * samples))) > LOUD_RMS


class ClapperEngine(LipSyncEngine):
    name: ClassVar[str] = "clapper"

    def prepare(
        self,
        source: Path,
        avatar_id: str,
        cache_dir: Path,
        progress: Progress | None = None,
    ) -> ClapperAvatar:
        report(progress, "loading", 0.0)
        image = fit_even(load_source_image(source), DEFAULT_MAX_SIDE)
        flash = np.full_like(image, 255)
        flash.flags.writeable = False
        report(progress, "ready", 1.0)
        return ClapperAvatar(
            avatar_id=avatar_id,
            source_digest=source_digest(source),
            idle_frames=(image,),
            flash=flash,
        )

    async def lip_sync(
        self, avatar: PreparedAvatar, audio: AsyncIterable[np.ndarray], phase: PhaseSource
    ) -> AsyncIterator[np.ndarray]:
        if not isinstance(avatar, ClapperAvatar):
            raise TypeError(f"the clapper engine cannot animate {type(avatar).__name__}")
        async for chunk in audio:
            for block in chunk.reshape(-1, SAMPLES_PER_TICK):
                yield avatar.flash if is_loud(block) else avatar.idle_frames[0]
