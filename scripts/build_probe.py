"""Assemble the built-in probe from its sources.

    python scripts/build_probe.py

Reads workers/probe_data/src/<genre>_<nn>.txt (one document per file, written for this
project) and writes workers/probe_data/default.jsonl: one {"genre", "source", "text"} object
per line, in file-name order. The jsonl file is what ships; its sha256 identifies the probe,
so rebuilding after an edit makes a new probe (scores on the old and new one do not mix).
"""

import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "workers" / "probe_data"


def main() -> None:
    lines = []
    for f in sorted((ROOT / "src").glob("*.txt")):
        text = f.read_text(encoding="utf-8").strip("\n")
        if text.strip():
            genre = f.stem.rsplit("_", 1)[0]
            lines.append(json.dumps({"genre": genre, "source": f.name, "text": text}, ensure_ascii=False))
    data = ("\n".join(lines) + "\n").encode("utf-8")
    (ROOT / "default.jsonl").write_bytes(data)
    chars = sum(len(json.loads(line)["text"]) for line in lines)
    print(f"{len(lines)} documents, {chars} characters, sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main()
