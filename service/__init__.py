"""layertrack HTTP side: API, storage, client and CLI (no torch imports here)."""
