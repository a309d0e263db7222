"""Store clients (workers/stores.py) against real servers on loopback: moto's S3 (in this
process, tests/moto_s3.py, and as a process of its own for IAM authentication), an
http.server serving a checkpoint directory, and a server speaking the Hub's HTTP layout
(tests/hub_server.py) reached by huggingface_hub through HF_ENDPOINT. No client library is
mocked."""

from __future__ import annotations

import hashlib
import json

import pytest
from hub_server import Repo, files_of
from layertrack.workers import stores
from layertrack.workers.errors import (
    AccessDenied,
    CheckpointIncomplete,
    CheckpointNotFound,
    FileTooLarge,
    HostRefused,
    NoSafetensorsWeights,
    StoreUnreachable,
)
from layertrack.workers.locations import parse
from layertrack.workers.stores import ObjectInfo, checkpoint_files, fingerprint, open_store
from moto_s3 import MotoProcess
from services import wait_until
from stores_fixtures import DirServer

BUCKET = "store-tests"


def _bucket(s3, name: str = BUCKET) -> None:
    c = s3.client()
    if name not in [b["Name"] for b in c.list_buckets().get("Buckets", [])]:
        c.create_bucket(Bucket=name)


def _expected_files(directory) -> list[str]:
    names = {p.name for p in directory.iterdir()}
    index = directory / "model.safetensors.index.json"
    weights = (["model.safetensors.index.json", *sorted(set(json.loads(index.read_text())["weight_map"].values()))]
               if index.exists() else ["model.safetensors"])
    rest = [n for n in stores.OPTIONAL_FILES if n in names]
    return ["config.json", *weights, *rest]


# ------------------------------------------------------------------ S3
@pytest.mark.parametrize("which", ["single", "sharded"])
def test_s3_lists_and_reads_a_checkpoint(s3_env, tiny_single, tiny_sharded, which):
    directory = tiny_single if which == "single" else tiny_sharded
    _bucket(s3_env)
    s3_env.upload_dir(BUCKET, f"runs/{which}/checkpoint-10", directory)
    store = open_store(parse(f"s3://{BUCKET}/runs/{which}/checkpoint-10/"))
    listing = store.list()
    assert [o.key for o in listing] == sorted(p.name for p in directory.iterdir())
    for o in listing:
        data = (directory / o.key).read_bytes()
        assert o.size == len(data)
        assert o.checksum == ("md5", hashlib.md5(data).hexdigest())  # single-part uploads: the ETag is the MD5
    files = checkpoint_files(listing, store)
    assert [f.key for f in files] == _expected_files(directory)
    big = max(files, key=lambda f: f.size)
    raw = (directory / big.key).read_bytes()
    assert store.read(big.key) == raw
    assert store.read(big.key, 100, 1100) == raw[100:1100]
    assert store.read(big.key, len(raw) - 10) == raw[-10:]
    assert store.read(big.key, 5, 5) == b""
    assert store.read(big.key, 0, 8, version=big.version) == raw[:8]
    assert store.resolve() is None
    with pytest.raises(NotImplementedError):
        store.revisions()
    assert open_store(parse(f"s3://{BUCKET}/runs/{which}")).list_dirs() == ["checkpoint-10"]
    assert [o.key for o in open_store(parse(f"s3://{BUCKET}/runs/{which}")).list(recursive=True)] == [
        f"checkpoint-10/{p.name}" for p in sorted(directory.iterdir())]


def test_s3_fingerprint_from_metadata(s3_env, tiny_single):
    _bucket(s3_env)
    s3_env.upload_dir(BUCKET, "fp/a", tiny_single)
    loc = parse(f"s3://{BUCKET}/fp/a")
    store = open_store(loc)
    files = checkpoint_files(store.list(), store)
    first = fingerprint(loc, files, None)
    assert first == fingerprint(parse(f"s3://{BUCKET}/fp/a/"), checkpoint_files(store.list(), store), None)
    s3_env.reset_counts()
    fingerprint(loc, checkpoint_files(store.list(), store), None)
    assert s3_env.object_bytes == 0  # metadata only: no object read (no index in a single-file checkpoint)
    # the same content elsewhere is another location; changed content another fingerprint
    assert fingerprint(parse(f"s3://{BUCKET}/fp/b"), files, None) != first
    s3_env.client().put_object(Bucket=BUCKET, Key="fp/a/config.json",
                               Body=(tiny_single / "config.json").read_bytes() + b"\n")
    assert fingerprint(loc, checkpoint_files(store.list(), store), None) != first


def test_s3_missing_objects_are_not_found(s3_env, tiny_single):
    _bucket(s3_env)
    s3_env.upload_dir(BUCKET, "nf/ckpt", tiny_single)
    store = open_store(parse(f"s3://{BUCKET}/nf/ckpt"))
    with pytest.raises(CheckpointNotFound) as e:
        store.read("model-00009-of-00009.safetensors")
    assert e.value.code == "checkpoint_not_found"
    empty = open_store(parse(f"s3://{BUCKET}/nf/nothing-here"))
    assert empty.list() == []
    with pytest.raises(CheckpointNotFound, match="nothing is stored there"):
        checkpoint_files(empty.list(), empty)
    with pytest.raises(CheckpointNotFound, match="does not exist"):
        open_store(parse("s3://no-such-bucket-here/x")).list()


def test_s3_index_naming_a_missing_shard_is_incomplete(s3_env, tiny_sharded):
    _bucket(s3_env)
    shards = sorted(p.name for p in tiny_sharded.glob("model-*.safetensors"))
    s3_env.upload_dir(BUCKET, "inc/ckpt", tiny_sharded, skip=[shards[-1]])
    store = open_store(parse(f"s3://{BUCKET}/inc/ckpt"))
    with pytest.raises(CheckpointIncomplete) as e:
        checkpoint_files(store.list(), store)
    assert e.value.code == "checkpoint_incomplete" and e.value.transient
    assert shards[-1] in str(e.value)
    s3_env.upload_dir(BUCKET, "inc/ckpt", tiny_sharded)  # the last shard lands
    assert [f.key for f in checkpoint_files(store.list(), store)] == _expected_files(tiny_sharded)
    # shards there but no config.json yet: incomplete too
    s3_env.upload_dir(BUCKET, "inc/noconfig", tiny_sharded, skip=["config.json"])
    store = open_store(parse(f"s3://{BUCKET}/inc/noconfig"))
    with pytest.raises(CheckpointIncomplete, match=r"no config\.json"):
        checkpoint_files(store.list(), store)


def test_s3_stopped_server_is_unreachable(s3_env, tiny_single, monkeypatch):
    _bucket(s3_env)
    s3_env.upload_dir(BUCKET, "down/ckpt", tiny_single)
    monkeypatch.setattr(stores, "RETRY_TIMEOUT_S", 1.0)
    store = open_store(parse(f"s3://{BUCKET}/down/ckpt"))
    assert store.list()
    s3_env.stop()
    try:
        with pytest.raises(StoreUnreachable) as e:
            store.list()
        assert e.value.code == "store_unreachable" and e.value.transient
        with pytest.raises(StoreUnreachable):
            store.read("config.json")
    finally:
        s3_env.start()
    def back() -> bytes | None:  # a connection the server closed may fail once more: the worker retries too
        try:
            return store.read("config.json")
        except StoreUnreachable:
            return None

    assert wait_until(back, 20, what="the store to answer again") == (tiny_single / "config.json").read_bytes()


def test_s3_access_denied(tiny_single, monkeypatch):
    """moto evaluates IAM identity policies (not bucket policies) once IAM authentication is
    on: a user whose policy allows one bucket is denied the other; an unknown key is denied."""
    moto = MotoProcess()
    try:
        import boto3

        admin = dict(endpoint_url=moto.url, region_name="us-east-1", aws_access_key_id="admin",
                     aws_secret_access_key="admin")
        s3 = boto3.client("s3", **admin)
        for b in ("open-bucket", "locked-bucket"):
            s3.create_bucket(Bucket=b)
            s3.put_object(Bucket=b, Key="ckpt/config.json", Body=b"{}")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="read-open", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*",
                           "Resource": ["arn:aws:s3:::open-bucket", "arn:aws:s3:::open-bucket/*"]}]}))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        moto.enable_iam_auth()
        monkeypatch.setenv("AWS_ENDPOINT_URL", moto.url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        assert [o.key for o in open_store(parse("s3://open-bucket/ckpt")).list()] == ["config.json"]
        with pytest.raises(AccessDenied) as e:
            open_store(parse("s3://locked-bucket/ckpt")).list()
        assert e.value.code == "access_denied"
        assert key["SecretAccessKey"] not in str(e.value)
        with pytest.raises(AccessDenied):
            open_store(parse("s3://locked-bucket/ckpt")).read("config.json")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOBODY")
        with pytest.raises(AccessDenied):
            open_store(parse("s3://open-bucket/ckpt")).list()
    finally:
        moto.close()


def test_store_messages_are_classified_by_status_not_by_any_digits(s3_env):
    """A duration, a port or an address that happens to hold 401, 403 or 412 is no status: the
    message obstore gave when moto died mid-transfer ("... in 401.499544ms, after 3 retries ...
    error sending request") is store_unreachable, not access_denied."""
    store = open_store(parse(f"s3://{BUCKET}/x"))
    cut = ("Generic S3 error: Error performing GET http://127.0.0.1:53673/b/x/model.safetensors in 401.499544ms, "
           "after 3 retries, max_retries: 3, retry_timeout: 1s - HTTP error: error sending request")
    assert isinstance(store._error(ConnectionError(cut), "'model.safetensors'"), StoreUnreachable)
    for port_or_time in ("http://127.0.0.1:40312/b/x in 12ms", "in 403ms", "in 412 ms", "10.0.401.2"):
        assert not stores._has_status(port_or_time, 401, 403, 412), port_or_time
    denied = "Client error with status 403 Forbidden: <Error><Code>AccessDenied</Code></Error>"
    assert isinstance(store._error(ConnectionError(denied), "'x'"), AccessDenied)
    assert stores._has_status("Client error with status 401 Unauthorized", 401)
    assert isinstance(store._error(ConnectionError("Client error with status 412: "), "'x'"), CheckpointIncomplete)


# ------------------------------------------------------------------ local directories
def test_local_store(tiny_sharded):
    store = open_store(parse(str(tiny_sharded.parent)))
    assert store.list_dirs() == ["ckpt"]
    store = open_store(parse(str(tiny_sharded)))
    files = checkpoint_files(store.list(), store)
    assert [f.key for f in files] == _expected_files(tiny_sharded)
    f = files[1]
    assert store.read(f.key, 2, 10, version=f.version) == (tiny_sharded / f.key).read_bytes()[2:10]
    with pytest.raises(CheckpointNotFound):
        store.read("missing.json")


# ------------------------------------------------------------------ checkpoint_files rules
def test_checkpoint_files_rules(tiny_single):
    cfg = ObjectInfo("config.json", 10, "v")
    st = ObjectInfo("model.safetensors", 100, "v")
    assert [f.key for f in checkpoint_files([st, ObjectInfo("tokenizer.json", 5, "v"), cfg,
                                             ObjectInfo("optimizer.pt", 10**9, "v")])] == [
        "config.json", "model.safetensors", "tokenizer.json"]  # optimizer state is not fetched
    with pytest.raises(CheckpointIncomplete, match="no weights"):
        checkpoint_files([cfg])
    with pytest.raises(NoSafetensorsWeights, match="pickle"):
        checkpoint_files([cfg, ObjectInfo("pytorch_model.bin", 100, "v")])
    assert [f.key for f in checkpoint_files([cfg, ObjectInfo("pytorch_model.bin", 100, "v")], allow_pickle=True)] == [
        "config.json", "pytorch_model.bin"]
    with pytest.raises(FileTooLarge):
        checkpoint_files([ObjectInfo("config.json", 17 << 20, "v"), st])


# ------------------------------------------------------------------ http(s)
def test_http_store_discovers_the_layout_and_refuses_loopback_unless_allowed(tiny_sharded):
    server = DirServer(tiny_sharded.parent)
    try:
        loc = parse(f"{server.url}/ckpt/")
        with pytest.raises(HostRefused) as e:
            open_store(loc).list()
        assert e.value.code == "host_refused" and "LAYERTRACK_FETCH_ALLOW_HOSTS" in str(e.value)
        assert server.requests == []  # refused before any connection
        with pytest.raises(HostRefused):  # a name that resolves to loopback is judged by its address
            open_store(parse(f"http://localhost:{server.url.rsplit(':', 1)[1]}/ckpt/"), allow_hosts="10.0.0.0/8").list()
        store = open_store(loc, allow_hosts="127.0.0.1")
        listing = store.list()
        assert sorted(o.key for o in listing) == sorted(_expected_files(tiny_sharded))
        assert all(o.version for o in listing)  # Last-Modified
        files = checkpoint_files(listing, store)
        assert [f.key for f in files] == _expected_files(tiny_sharded)
        shard = files[2]
        raw = (tiny_sharded / shard.key).read_bytes()
        assert store.read(shard.key, 10, 5000, version=shard.version) == raw[10:5000]
        assert store.read(shard.key) == raw
        with pytest.raises(CheckpointNotFound):
            store.read("nope.bin")
        with pytest.raises(NotImplementedError):
            store.list_dirs()
        # the allow list also takes networks
        assert open_store(loc, allow_hosts="127.0.0.0/8").list()
    finally:
        server.close()


def test_http_server_without_range_support(tiny_single):
    server = DirServer(tiny_single.parent, ranges=False)  # plain http.server: no Range
    try:
        store = open_store(parse(f"{server.url}/ckpt"), allow_hosts="127.0.0.1")
        files = checkpoint_files(store.list(), store)
        raw = (tiny_single / "model.safetensors").read_bytes()
        assert store.read("model.safetensors", 100, 200) == raw[100:200]
        assert [f.key for f in files] == _expected_files(tiny_single)
    finally:
        server.close()


def test_http_unreachable(monkeypatch):
    from layertrack.service.embedded import free_port

    with pytest.raises(StoreUnreachable):
        open_store(parse(f"http://127.0.0.1:{free_port()}/ckpt"), allow_hosts="127.0.0.1").read("config.json")


# ------------------------------------------------------------------ the Hub
@pytest.fixture()
def pythia_like(hub, tiny_single, tiny_sharded):
    """org/tiny with revisions step1000, step2000 (branches), v1 (a tag) and main."""
    repo = Repo()
    shas = {}
    shas["step1000"] = repo.commit(files_of(tiny_single), branch="step1000")
    shas["step2000"] = repo.commit(files_of(tiny_sharded), branch="step2000")
    shas["main"] = repo.commit({**files_of(tiny_sharded), **files_of(tiny_single, "sub/")}, branch="main", tag="v1")
    hub.repos["org/tiny"] = repo
    return shas


def test_hub_resolves_revisions_and_reads(hub, pythia_like, tiny_single, tiny_sharded):
    store = open_store(parse("hf://org/tiny@step1000"))
    assert store.resolve() == pythia_like["step1000"]
    listing = store.list()
    assert [o.key for o in listing] == sorted(p.name for p in tiny_single.iterdir())
    weights = next(o for o in listing if o.key == "model.safetensors")
    raw = (tiny_single / "model.safetensors").read_bytes()
    assert weights.checksum == ("sha256", hashlib.sha256(raw).hexdigest()) == ("sha256", weights.version)
    config = next(o for o in listing if o.key == "config.json")
    assert config.checksum[0] == "git-sha1"
    assert store.read("model.safetensors", 8, 1008, version=weights.version) == raw[8:1008]
    assert store.read("config.json") == (tiny_single / "config.json").read_bytes()

    sharded = open_store(parse("hf://org/tiny@step2000"))
    assert [f.key for f in checkpoint_files(sharded.list(), sharded)] == _expected_files(tiny_sharded)
    main = open_store(parse("hf://org/tiny"))  # no revision: main
    assert main.resolve() == pythia_like["main"] == open_store(parse("hf://org/tiny@v1")).resolve()
    assert main.list_dirs() == ["sub"]
    sub = open_store(parse("hf://org/tiny/sub"))
    assert [f.key for f in checkpoint_files(sub.list(), sub)] == _expected_files(tiny_single)
    by_sha = open_store(parse(f"hf://org/tiny@{pythia_like['step1000']}"))
    assert by_sha.resolve() == pythia_like["step1000"]
    # the same commit by branch or by sha: one fingerprint
    assert fingerprint(parse("hf://org/tiny@step1000"), listing, store.resolve()) == fingerprint(
        parse(f"hf://org/tiny@{pythia_like['step1000']}"), by_sha.list(), by_sha.resolve())
    assert sorted(open_store(parse("hf://org/tiny")).revisions()) == sorted([
        ("main", pythia_like["main"]), ("step1000", pythia_like["step1000"]), ("step2000", pythia_like["step2000"]),
        ("v1", pythia_like["main"])])
    # every read is pinned to the resolved commit
    resolved = [p.split("/resolve/")[1].split("/")[0] for _, p in hub.requests if "/resolve/" in p]
    assert resolved and set(resolved) <= set(pythia_like.values())


def test_hub_errors(hub, pythia_like, monkeypatch):
    with pytest.raises(CheckpointNotFound, match="revision 'step9'"):
        open_store(parse("hf://org/tiny@step9")).resolve()
    with pytest.raises(CheckpointNotFound, match="does not exist"):
        open_store(parse("hf://org/nothing")).resolve()
    with pytest.raises(CheckpointNotFound):
        open_store(parse("hf://org/tiny@step1000")).read("missing.json")
    # a private repository: not found without the token, readable with HF_TOKEN
    hub.repos["org/private"] = Repo(private=True)
    sha = hub.repos["org/private"].commit({"config.json": b"{}", "model.safetensors": b"x"})
    with pytest.raises(CheckpointNotFound, match="HF_TOKEN"):
        open_store(parse("hf://org/private")).resolve()
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert open_store(parse("hf://org/private")).resolve() == sha
    assert open_store(parse("hf://org/private")).read("model.safetensors") == b"x"
    # a gated repository without the token: access denied
    hub.repos["org/gated"] = Repo(gated=True)
    hub.repos["org/gated"].commit({"config.json": b"{}"})
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(AccessDenied) as e:
        open_store(parse("hf://org/gated")).resolve()
    assert e.value.code == "access_denied"


def test_hub_listing_follows_pages(hub, tiny_sharded):
    hub.page_size = 2
    repo = Repo()
    repo.commit(files_of(tiny_sharded))
    hub.repos["org/paged"] = repo
    store = open_store(parse("hf://org/paged"))
    assert [o.key for o in store.list()] == sorted(p.name for p in tiny_sharded.iterdir())
