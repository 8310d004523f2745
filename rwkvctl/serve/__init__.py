"""`rwkvctl serve`: an OpenAI-compatible HTTP server over the inference engine, with a prefix-state cache and a
scheduler that batches decode steps across requests. Needs the `serve` extra (FastAPI, uvicorn)."""
