"""The long-lived parts of one server process, built once by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from gpuserver.ai_models import AIModels
from gpuserver.avatar_manager import AvatarManager
from gpuserver.config import Settings
from gpuserver.readiness import ReadinessMonitor
from gpuserver.telemetry import Telemetry
from gpuserver.webrtc_streamer import WebRTCStreamer


@dataclass(eq=False)
class Services:
    settings: Settings
    avatars: AvatarManager
    streamer: WebRTCStreamer
    ai: AIModels
    telemetry: Telemetry
    readiness: ReadinessMonitor
