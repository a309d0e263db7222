"""The built-in probe text (default.jsonl), built from src/ by scripts/build_probe.py."""
