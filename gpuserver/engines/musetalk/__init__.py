"""The `musetalk` engine: MuseTalk 1.5 lip-sync, streamed and batched across sessions.

Modules: `layout` (weight files, torch-free), `models` (loading), `random_weights` (tiny or
full-shaped random networks for tests and benchmarks), `audio` (streamed whisper windows),
`facebox` / `parsing` / `blend` (crop boxes, blend masks, paste-back), `pipeline` (the
networks on batches), `prepare` (avatar material + cache), `batcher` (the one inference
thread), `stream` (one `frames()` call) and `engine` (the `LipSyncEngine`).
"""
