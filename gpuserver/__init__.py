"""gpuserver: a real-time talking-avatar service (LLM -> TTS -> lip-sync -> WebRTC)."""

__version__ = "0.1.0"
