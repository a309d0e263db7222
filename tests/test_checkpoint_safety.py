"""The worker side of a checkpoint that tries to escape or exhaust: files symlinked out of the
roots, huge JSON files, malformed safetensors, pickles the safe loader refuses, names the
file system cannot take. Each fails with its own error code and a message that says what to
do, in the library (what a worker runs), in `layertrack score` (one line, no traceback) and
in a service job. ``ATTACKS`` below lists every input."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from layertrack.workers import errors
from layertrack.workers.checkpoint import (
    MAX_JSON_BYTES,
    MAX_TOKENIZER_FILE_BYTES,
    inspect_checkpoint,
    resolve_checkpoint_path,
)
from layertrack.workers.scoring import ScoreConfig, score_checkpoint
from services import layertrack_exe, wait_until
from tiny_models import build_checkpoint

SMALL = ScoreConfig(max_tokens=600, seq_len=64)
PICKLE = ScoreConfig(max_tokens=600, seq_len=64, allow_pickle=True)

#: every hostile checkpoint this module builds: (what, the error code it must fail with)
ATTACKS = [
    ("model.safetensors symlinked to a file outside every root", "checkpoint_outside_roots"),
    ("config.json symlinked outside", "checkpoint_outside_roots"),
    ("tokenizer.json symlinked outside", "checkpoint_outside_roots"),
    ("tokenizer_config.json symlinked outside", "checkpoint_outside_roots"),
    ("one shard of a sharded checkpoint symlinked outside", "checkpoint_outside_roots"),
    ("model.safetensors.index.json symlinked outside", "checkpoint_outside_roots"),
    ("pytorch_model.bin (pickle) symlinked outside", "checkpoint_outside_roots"),
    ("a dangling symlink to a path outside", "checkpoint_outside_roots"),
    ("a subdirectory symlinked outside", "checkpoint_outside_roots"),
    ("a symlink chain: inside link -> inside link -> outside file", "checkpoint_outside_roots"),
    ("a shard index naming '../elsewhere/x.safetensors'", "not_a_model_directory"),
    ("a shard index naming an absolute path", "not_a_model_directory"),
    ("pytorch_model.bin.index.json naming '../elsewhere/…' or an absolute path (pickle)", "not_a_model_directory"),
    ("config.json of 300 MB (sparse)", "file_too_large"),
    ("config.json of MAX_JSON_BYTES + 1", "file_too_large"),
    ("model.safetensors.index.json of 64 MB", "file_too_large"),
    ("generation_config.json of 64 MB", "file_too_large"),
    ("tokenizer_config.json of 64 MB", "file_too_large"),
    ("tokenizer.json larger than MAX_TOKENIZER_FILE_BYTES", "file_too_large"),
    ("safetensors header length 2**62", "malformed_weights"),
    ("safetensors header length past the end of the file", "malformed_weights"),
    ("safetensors file of 4 bytes", "malformed_weights"),
    ("safetensors file of 0 bytes", "malformed_weights"),
    ("safetensors truncated to half", "malformed_weights"),
    ("safetensors tensor offsets past the end", "malformed_weights"),
    ("safetensors offsets decreasing", "malformed_weights"),
    ("safetensors offsets not matching dtype × shape", "malformed_weights"),
    ("safetensors header not JSON", "malformed_weights"),
    ("safetensors header a JSON list", "malformed_weights"),
    ("safetensors header nested 100,000 deep (RecursionError in the JSON parser)", "malformed_weights"),
    ("safetensors dtype not a string", "malformed_weights"),
    ("config.json nested 100,000 deep", "not_a_model_directory"),
    ("config.json with model_type a list / architectures a string", "not_a_model_directory"),
    ("shard index nested 100,000 deep / weight_map a list", "not_a_model_directory"),
    ("safetensors tensor without data_offsets", "malformed_weights"),
    ("safetensors trailing bytes after the last tensor", "malformed_weights"),
    ("safetensors a gap between tensors (caught by the safetensors library itself)", "malformed_weights"),
    ("one malformed shard of a sharded checkpoint", "malformed_weights"),
    ("pickle whose reduce calls print (weights_only refuses it)", "pickle_refused"),
    ("pickle whose reduce calls os.system", "pickle_refused"),
    ("pickle of garbage bytes", "pickle_refused"),
    ("pickle (zip) truncated", "malformed_weights"),
    ("a directory name of 256 bytes", "path_too_long"),
    ("~no-such-user in the path", "invalid_uri"),
    ("an unparsable file:// URI", "invalid_uri"),
    ("a checkpoint directory that is a symlink loop", "checkpoint_unreadable"),
    ("model.safetensors a symlink to itself", "checkpoint_unreadable"),
    ("a checkpoint directory without read permission (when not run as root)", "checkpoint_unreadable"),
]


def fails(code: str, uri, *, config: ScoreConfig = SMALL, roots=None, **kw) -> errors.LayertrackError:
    with pytest.raises(errors.LayertrackError) as caught:
        score_checkpoint(str(uri), config=config, roots=roots, **kw)
    assert caught.value.code == code, (caught.value.code, caught.value.message)
    assert "weights_only=False" not in caught.value.message
    return caught.value


@pytest.fixture()
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    return r


@pytest.fixture()
def outside(tmp_path):
    o = tmp_path / "elsewhere"
    o.mkdir()
    return o


def copy_of(ckpt: Path, dst: Path) -> Path:
    shutil.copytree(ckpt, dst)
    return dst


def link_out(ckpt: Path, name: str, outside: Path) -> Path:
    """Move ``ckpt/name`` out of the roots and leave a symlink to it."""
    target = outside / f"{uuid.uuid4().hex[:6]}-{name}"
    shutil.move(ckpt / name, target)
    (ckpt / name).symlink_to(target)
    return target


# ------------------------------------------------------------------ files symlinked out of the roots
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"])
def test_a_file_symlinked_out_of_the_roots_is_refused(root, outside, checkpoints, name):
    ckpt = copy_of(checkpoints("llama"), root / "ckpt")
    target = link_out(ckpt, name, outside)
    e = fails("checkpoint_outside_roots", ckpt, roots=[root])
    assert repr(name) in e.message and str(target) in e.message
    assert "outside the allowed checkpoint roots" in e.message and "LAYERTRACK_CHECKPOINT_ROOTS" in e.message
    with pytest.raises(errors.CheckpointOutsideRoots):  # the API's check (resolve) refuses it too
        resolve_checkpoint_path(str(ckpt), [root])
    # without roots (`layertrack score` on one's own files) a link is followed
    assert score_checkpoint(str(ckpt), config=SMALL).n_layers == 3
    # with the link's target inside a root, it is fine: a Hugging Face cache links into blobs/
    assert score_checkpoint(str(ckpt), config=SMALL, roots=[root, outside]).n_layers == 3


def test_a_shard_or_the_index_symlinked_out_is_refused(root, outside, tokenizer):
    ckpt = build_checkpoint(root / "sharded", "llama", tokenizer, max_shard_size="20KB")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    target = link_out(ckpt, shard, outside)
    assert repr(shard) in fails("checkpoint_outside_roots", ckpt, roots=[root]).message
    (ckpt / shard).unlink()
    shutil.move(target, ckpt / shard)
    assert score_checkpoint(str(ckpt), config=SMALL, roots=[root]).n_layers == 3
    link_out(ckpt, "model.safetensors.index.json", outside)
    fails("checkpoint_outside_roots", ckpt, roots=[root])


def test_pickle_weights_symlinked_out_are_refused(root, outside, tokenizer):
    ckpt = build_checkpoint(root / "pickle", "gpt2", tokenizer, safe=False)
    link_out(ckpt, "pytorch_model.bin", outside)
    fails("checkpoint_outside_roots", ckpt, config=PICKLE, roots=[root])


def test_dangling_directory_and_chained_links_out_are_refused(root, outside, checkpoints):
    ckpt = copy_of(checkpoints("llama"), root / "ckpt")
    (ckpt / "README.md").symlink_to(outside / "not-there-yet")
    fails("checkpoint_outside_roots", ckpt, roots=[root])
    (ckpt / "README.md").unlink()
    (ckpt / "extra").symlink_to(outside, target_is_directory=True)
    fails("checkpoint_outside_roots", ckpt, roots=[root])
    (ckpt / "extra").unlink()
    # model.safetensors -> ROOT/hop -> (outside file): resolved to the end
    target = link_out(ckpt, "model.safetensors", outside)
    (ckpt / "model.safetensors").unlink()
    (root / "hop").symlink_to(target)
    (ckpt / "model.safetensors").symlink_to(root / "hop")
    fails("checkpoint_outside_roots", ckpt, roots=[root])


@pytest.mark.parametrize("shard", ["../elsewhere/model.safetensors", "/etc/passwd"])
def test_a_shard_index_may_name_only_files_of_the_directory(root, checkpoints, tokenizer, shard):
    ckpt = copy_of(checkpoints("llama"), root / "ckpt")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    e = fails("not_a_model_directory", ckpt, roots=[root])
    assert "which is not a file name" in e.message
    pickled = build_checkpoint(root / "pickle", "gpt2", tokenizer, safe=False)
    (pickled / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    assert "which is not a file name" in fails("not_a_model_directory", pickled, config=PICKLE, roots=[root]).message


# ------------------------------------------------------------------ huge small files
def grow(file: Path, size: int) -> None:
    """Make ``file`` ``size`` bytes long (a sparse tail of zeros: no disk is used)."""
    if not file.exists():
        file.write_text("{}")
    with open(file, "r+b") as f:
        f.truncate(size)


@pytest.mark.parametrize(("name", "size"), [
    ("config.json", 300 * 2**20), ("config.json", MAX_JSON_BYTES + 1),
    ("model.safetensors.index.json", 64 * 2**20), ("generation_config.json", 64 * 2**20),
    ("tokenizer_config.json", 64 * 2**20), ("tokenizer.json", MAX_TOKENIZER_FILE_BYTES + 1),
])
def test_a_huge_json_is_refused_from_its_size(root, checkpoints, name, size):
    ckpt = copy_of(checkpoints("llama"), root / "ckpt")
    grow(ckpt / name, size)
    e = fails("file_too_large", ckpt, roots=[root])
    assert name in e.message and f"{size:,} bytes" in e.message and "MiB" in e.message


DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's JSON parser recurses


@pytest.mark.parametrize(("name", "text", "needle"), [
    ("config.json", DEEP, "is not a valid config"),
    ("config.json", json.dumps({"model_type": ["llama"]}), 'has no "model_type"'),
    ("config.json", json.dumps({"model_type": "llama", "architectures": "LlamaForCausalLM"}), '"architectures"'),
    ("model.safetensors.index.json", '{"weight_map": ' + DEEP + "}", "is not a valid shard index"),
    ("model.safetensors.index.json", '{"weight_map": [["a"]]}', "is not a valid shard index"),
])
def test_odd_json_is_not_a_model_directory(root, checkpoints, name, text, needle):
    ckpt = copy_of(checkpoints("llama"), root / "ckpt")
    (ckpt / name).write_text(text)
    assert needle in fails("not_a_model_directory", ckpt, roots=[root]).message


def test_json_files_at_the_cap_are_read(root, checkpoints):
    ckpt = copy_of(checkpoints("llama"), root / "ckpt")
    cfg = (ckpt / "config.json").read_bytes()
    (ckpt / "config.json").write_bytes(cfg + b" " * (MAX_JSON_BYTES - len(cfg)))
    assert inspect_checkpoint(ckpt).config["model_type"] == "llama"


# ------------------------------------------------------------------ malformed safetensors
def header_of(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def framed(header: object, payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


def first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _offsets(fix):
    def mutate(data: bytes) -> bytes:
        header, payload = header_of(data)
        fix(header[first_tensor(header)], header)
        return framed(header, payload)
    return mutate


def _gap(data: bytes) -> bytes:
    """Two tensors with four unused bytes between them: every offset is within the file and
    matches its dtype and shape, so only the safetensors library finds it (InvalidOffset)."""
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}
    return framed(header, b"\0" * 12)


MALFORMED = {
    "huge header length": lambda d: struct.pack("<Q", 2**62) + d[8:],
    "header past the end": lambda d: struct.pack("<Q", len(d)) + d[8:],
    "4 bytes": lambda d: d[:4],
    "empty": lambda d: b"",
    "truncated": lambda d: d[: len(d) // 2],
    "offsets past the end": _offsets(lambda t, h: t.update(data_offsets=[t["data_offsets"][0], 10**9])),
    "decreasing offsets": _offsets(lambda t, h: t.update(data_offsets=t["data_offsets"][::-1])),
    "dtype and shape mismatch": _offsets(lambda t, h: t.update(shape=[3, 3, 3, 3, 3])),
    "no data_offsets": _offsets(lambda t, h: t.pop("data_offsets")),
    "header not JSON": lambda d: struct.pack("<Q", 10) + b"{not json}" + d,
    "header a list": lambda d: framed([1, 2, 3], b""),
    "trailing bytes": lambda d: d + b"\0" * 64,
    "gap between tensors": _gap,
    "header nested too deep": lambda d: struct.pack("<Q", len(DEEP)) + DEEP.encode(),
    "dtype not a string": _offsets(lambda t, h: t.update(dtype=["F32"])),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_safetensors_fail_with_their_own_code(root, checkpoints, kind):
    ckpt = copy_of(checkpoints("llama"), root / "ckpt")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(MALFORMED[kind](weights.read_bytes()))
    e = fails("malformed_weights", ckpt, roots=[root])
    assert "model.safetensors" in e.message and ("copy it completely" in e.message or "copy them" in e.message)


def test_one_malformed_shard_fails_the_checkpoint(root, tokenizer):
    ckpt = build_checkpoint(root / "sharded", "llama", tokenizer, max_shard_size="20KB")
    shard = sorted(p for p in ckpt.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    assert shard.name in fails("malformed_weights", ckpt, roots=[root]).message


# ------------------------------------------------------------------ pickles
class Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


def evil_pickle(directory: Path, tokenizer, fn=print, arg="pwned") -> Path:
    ckpt = build_checkpoint(directory, "gpt2", tokenizer, safe=False)
    state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    state["evil"] = Evil(fn, arg)
    torch.save(state, ckpt / "pytorch_model.bin")
    return ckpt


def test_a_pickle_the_safe_loader_refuses_is_pickle_refused(root, tokenizer, tmp_path):
    import os

    ckpt = evil_pickle(root / "evil", tokenizer)
    e = fails("pickle_refused", ckpt, config=PICKLE, roots=[root])
    assert "'print'" in e.message and "weights_only=True" in e.message and "safetensors" in e.message
    marker = tmp_path / "ran"
    ckpt2 = evil_pickle(root / "evil2", tokenizer, os.system, f"touch {marker}")
    assert "'posix.system'" in fails("pickle_refused", ckpt2, config=PICKLE, roots=[root]).message
    assert not marker.exists()
    (ckpt / "pytorch_model.bin").write_bytes(b"garbage" * 100)
    fails("pickle_refused", ckpt, config=PICKLE, roots=[root])


def test_a_truncated_pickle_is_malformed_weights(root, tokenizer):
    ckpt = build_checkpoint(root / "p", "gpt2", tokenizer, safe=False)
    weights = ckpt / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:-4000])
    fails("malformed_weights", ckpt, config=PICKLE, roots=[root])


# ------------------------------------------------------------------ names the file system cannot take
def test_a_name_longer_than_the_file_system_allows(root):
    for name in ("a" * 256, "é" * 128):  # 256 bytes either way
        e = fails("path_too_long", root / name, roots=[root])
        assert "longer than the file system allows" in e.message
        assert isinstance(e, errors.InvalidCheckpointURI)
    fails("checkpoint_not_found", root / "missing" / ("a" * 256), roots=[root])


def test_uris_that_cannot_be_resolved(root):
    assert "no such user" in fails("invalid_uri", "~no-such-user-lt11/ckpt").message
    assert "cannot parse" in fails("invalid_uri", "file://[::1/ckpt").message


def test_symlink_loops_and_unreadable_checkpoints(root, checkpoints):
    import os

    (root / "loop").symlink_to(root / "loop")
    assert "symlink loop" in fails("checkpoint_unreadable", root / "loop", roots=[root]).message
    ckpt = copy_of(checkpoints("llama"), root / "ckpt")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").symlink_to(ckpt / "model.safetensors")
    assert "model.safetensors" in fails("checkpoint_unreadable", ckpt, roots=[root]).message
    if os.geteuid() != 0:  # root reads everything
        ckpt.chmod(0o000)
        try:
            assert "permission denied" in fails("checkpoint_unreadable", ckpt, roots=[root]).message
        finally:
            ckpt.chmod(0o755)


# ------------------------------------------------------------------ `layertrack score`: one line, its code
def one_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 3, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "weights_only=False" not in out.stderr
    return lines[0]


def score_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([layertrack_exe(), "score", *args, "--max-tokens", "600", "--seq-len", "64"],
                          capture_output=True, text=True, timeout=300)


def test_score_prints_one_line_for_a_refused_pickle_and_malformed_weights(root, tokenizer, checkpoints):
    line = one_line(score_cli(str(evil_pickle(root / "evil", tokenizer)), "--allow-pickle"))
    assert line.startswith("error: the pickle weights of") and line.endswith("(code pickle_refused)")
    ckpt = copy_of(checkpoints("llama"), root / "ckpt")
    weights = ckpt / "model.safetensors"
    for kind in ("huge header length", "truncated", "offsets past the end", "gap between tensors"):
        weights.write_bytes(MALFORMED[kind](checkpoints("llama").joinpath("model.safetensors").read_bytes()))
        line = one_line(score_cli(str(ckpt)))
        assert line.endswith("(code malformed_weights)") and "model.safetensors" in line, (kind, line)


# ------------------------------------------------------------------ a service job fails with the code
@pytest.fixture(scope="module")
def live(tmp_path_factory, pg_url, redis_server):
    from services import live_service

    with live_service(tmp_path_factory.mktemp("live-safety"), redis_server.new_url(), db_url=pg_url) as svc:
        yield svc


def test_jobs_fail_with_the_codes(live, tokenizer):
    """What the API cannot see (a pickle's contents, a tokenizer's size) fails the job with its
    code; a checkpoint that turns malformed after it was accepted too (retried job)."""
    run = f"safety-{uuid.uuid4().hex[:6]}"
    evil = evil_pickle(live.roots / run / "step-1", tokenizer)
    big_tok = build_checkpoint(live.roots / run / "step-2", "llama", tokenizer)
    grow(big_tok / "tokenizer.json", MAX_TOKENIZER_FILE_BYTES + 1)
    cfg = {"max_tokens": 600, "seq_len": 64, "allow_pickle": True}
    with live.client() as c:
        ids = [c.submit(run=run, step=1, uri=str(evil), config=cfg)["id"],
               c.submit(run=run, step=2, uri=str(big_tok), config=cfg)["id"]]
        done = [c.wait(i, timeout=240, poll=0.5) for i in ids]
        assert [j["error_code"] for j in done] == ["pickle_refused", "file_too_large"], (done, live.logs())
        assert all(j["status"] == "failed" for j in done)
        assert "'print'" in done[0]["error"] and "weights_only=False" not in done[0]["error"]
        # the pickle checkpoint becomes a malformed safetensors one; the same job retried
        (evil / "pytorch_model.bin").unlink()
        (evil / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
        assert c.retry(ids[0])["status"] == "queued"
        again = wait_until(lambda: (j := c.job(ids[0]))["status"] == "failed" and j, 240, what="the retried job")
        assert again["error_code"] == "malformed_weights", again
