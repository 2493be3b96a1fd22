"""Voice input: the user's microphone -> 16 kHz -> VAD -> endpointing -> speech recognition."""
