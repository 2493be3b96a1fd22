"""The long-lived parts of one server process, built once by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gpuserver.ai_models import AIModels
from gpuserver.avatar_manager import AvatarManager
from gpuserver.config import Settings
from gpuserver.webrtc_streamer import WebRTCStreamer

if TYPE_CHECKING:
    from gpuserver.session import Session


@dataclass(eq=False)
class Services:
    settings: Settings
    avatars: AvatarManager
    streamer: WebRTCStreamer
    ai: AIModels
    sessions: dict[str, Session] = field(default_factory=dict)
    shutting_down: bool = False
