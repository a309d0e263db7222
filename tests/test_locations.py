"""Checkpoint locations (workers/locations.py) and the address policy (workers/netpolicy.py):
pure functions, no server."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import pytest
from layertrack.workers import netpolicy
from layertrack.workers.errors import CredentialsInURI, InvalidCheckpointURI, LayertrackError
from layertrack.workers.locations import Location, parse, parse_roots, within


@pytest.mark.parametrize("uri, scheme, container, path, revision, normal", [
    ("s3://ml-ckpts/runs/step-1000/", "s3", "ml-ckpts", "runs/step-1000", None, "s3://ml-ckpts/runs/step-1000"),
    ("s3://ml-ckpts", "s3", "ml-ckpts", "", None, "s3://ml-ckpts/"),
    ("s3a://b1/x", "s3", "b1", "x", None, "s3://b1/x"),
    ("gs://bucket/a/b", "gs", "bucket", "a/b", None, "gs://bucket/a/b"),
    ("az://container/p", "az", "container", "p", None, "az://container/p"),
    ("abfs://container/p/", "az", "container", "p", None, "az://container/p"),
    ("hf://EleutherAI/pythia-70m", "hf", "EleutherAI/pythia-70m", "", None, "hf://EleutherAI/pythia-70m"),
    ("hf://EleutherAI/pythia-70m@step1000", "hf", "EleutherAI/pythia-70m", "", "step1000",
     "hf://EleutherAI/pythia-70m@step1000"),
    ("hf://org/repo@refs%2Fpr%2F1/sub/dir/", "hf", "org/repo", "sub/dir", "refs/pr/1", "hf://org/repo@refs%2Fpr%2F1/sub/dir"),
    ("hf://EleutherAI/", "hf", "EleutherAI", "", None, "hf://EleutherAI/"),
    ("https://Files.Example.com/ckpts/a%20b/", "https", "files.example.com", "ckpts/a b", None,
     "https://files.example.com/ckpts/a%20b"),
    ("http://127.0.0.1:8080/c", "http", "127.0.0.1:8080", "c", None, "http://127.0.0.1:8080/c"),
    ("https://h:443/c", "https", "h", "c", None, "https://h/c"),
    ("http://[::1]:81/c", "http", "[::1]:81", "c", None, "http://[::1]:81/c"),
    ("file:///data/ckpt", "file", "", "/data/ckpt", None, "file:///data/ckpt"),
    ("file://localhost/data/ckpt", "file", "", "/data/ckpt", None, "file:///data/ckpt"),
    ("/data/x/../ckpt", "file", "", "/data/ckpt", None, "file:///data/ckpt"),
])
def test_parse_and_normal_form(uri, scheme, container, path, revision, normal):
    loc = parse(uri)
    assert (loc.scheme, loc.container, loc.path, loc.revision) == (scheme, container, path, revision)
    assert loc.uri() == normal
    assert parse(loc.uri()) == loc  # the normal form parses back to the same location
    assert loc.remote == (scheme != "file")


def test_relative_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse("ckpts/step-1").path == str(tmp_path / "ckpts" / "step-1")
    assert parse("~").path == os.path.expanduser("~")


def test_child():
    assert parse("s3://b/runs").child("checkpoint-1000").uri() == "s3://b/runs/checkpoint-1000"
    assert parse("s3://b").child("a/b").uri() == "s3://b/a/b"
    assert parse("hf://o/r@step1").child("sub").uri() == "hf://o/r@step1/sub"
    assert parse("/x").child("y").path == "/x/y"
    for bad in ("..", "a/../b", "", "a//b"):
        with pytest.raises(InvalidCheckpointURI):
            parse("s3://b/runs").child(bad)


@pytest.mark.parametrize("uri, secret", [
    ("s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/ckpt", "wJalrXUtnFEMI"),
    ("https://user:hunter2@example.com/ckpt/", "hunter2"),
    ("https://ghp_token123@example.com/ckpt/", "ghp_token123"),
    ("hf://hf_abcdef@org/repo", "hf_abcdef"),
    ("https://bucket.s3.amazonaws.com/ckpt/?X-Amz-Algorithm=AWS4&X-Amz-Signature=deadbeef99", "deadbeef99"),
    ("https://acct.blob.core.windows.net/c/ckpt?sv=2022&sig=SASSECRET42", "SASSECRET42"),
    ("https://example.com/ckpt?token=tok-777", "tok-777"),
    ("https://storage.googleapis.com/b/o?X-Goog-Signature=gsig55", "gsig55"),
    ("s3://bucket/ckpt?versionId=v9secret", "v9secret"),
    ("gs://bucket/ckpt?x=1", "x=1"),
    ("az://container/ckpt?sig=azsecret", "azsecret"),
    ("hf://org/repo?token=hftoken1", "hftoken1"),
])
def test_credentials_in_uri_are_refused_without_echoing_them(uri, secret):
    with pytest.raises(CredentialsInURI) as e:
        parse(uri)
    assert e.value.code == "credentials_in_uri"
    assert isinstance(e.value, LayertrackError) and isinstance(e.value, InvalidCheckpointURI)
    assert secret not in str(e.value)
    assert "environment" in str(e.value)  # says what to do instead


@pytest.mark.parametrize("uri", [
    "ftp://host/x", "s3://", "s3:///key", "s3://b/runs/../other", "s3://b/a//b", "s3://b/./a", "gs://b/a\nb",
    "hf://org/repo@", "hf://datasets/org/name", "hf://org/re po", "hf://org@rev/repo",
    "https://", "https://exa mple.com/x", "https://example.com/x?page=2", "http://h:99999/x", "https://h/x#frag",
    "file://otherhost/x", "", "   ", "a\x00b", "az://container@account.blob.core.windows.net/p",
])
def test_malformed_uris_are_invalid(uri):
    with pytest.raises(InvalidCheckpointURI) as e:
        parse(uri)
    assert e.value.code in ("invalid_uri", "credentials_in_uri")
    if uri in ("https://example.com/x?page=2", "ftp://host/x", "s3://b/runs/../other"):
        assert e.value.code == "invalid_uri"


def test_hf_org_without_repo_is_a_prefix():
    org = parse("hf://org")
    assert org == Location("hf", "org", "")
    assert org.uri() == "hf://org/"


@pytest.mark.parametrize("loc, root, admitted", [
    ("s3://b/runs/x", "s3://b/runs", True),
    ("s3://b/runs", "s3://b/runs/", True),
    ("s3://b/runs-evil/x", "s3://b/runs", False),
    ("s3://b/runs-evil", "s3://b/runs", False),
    ("s3://b/other", "s3://b/", True),
    ("s3://b2/runs/x", "s3://b/runs", False),
    ("gs://b/runs/x", "s3://b/runs", False),
    ("hf://EleutherAI/pythia-70m@step1000", "hf://EleutherAI/", True),
    ("hf://EleutherAI/pythia-70m", "hf://EleutherAI", True),
    ("hf://EleutherAIx/pythia-70m", "hf://EleutherAI/", False),
    ("hf://Eleuther/pythia-70m", "hf://EleutherAI/", False),
    ("hf://EleutherAI/pythia-70m@step1", "hf://EleutherAI/pythia-70m", True),
    ("hf://EleutherAI/pythia-70m-deduped", "hf://EleutherAI/pythia-70m", False),
    ("hf://EleutherAI/pythia-70m@step1", "hf://EleutherAI/pythia-70m@main", False),
    ("hf://EleutherAI/pythia-70m@main/sub", "hf://EleutherAI/pythia-70m@main", True),
    ("hf://o/r/sub/x", "hf://o/r/sub", True),
    ("hf://o/r/sub2", "hf://o/r/sub", False),
    ("https://h/ckpts/a", "https://h/ckpts", True),
    ("https://h/ckpts2", "https://h/ckpts", False),
    ("http://h/ckpts/a", "https://h/ckpts", False),
    ("https://h:8443/ckpts/a", "https://h/ckpts", False),
    ("/data/runs/a", "/data/runs", True),
    ("/data/runs-evil", "/data/runs", False),
    ("/anything", "/", True),
    ("s3://b/runs/x", "/data", False),
])
def test_within(loc, root, admitted):
    assert within(parse(loc), parse(root)) is admitted


def test_parse_roots():
    assert parse_roots("/a:/b") == [parse("/a"), parse("/b")]  # the old ':'-separated directory lists
    assert parse_roots("/a, s3://ml/runs/ ,hf://EleutherAI/") == [parse("/a"), parse("s3://ml/runs"),
                                                                   parse("hf://EleutherAI/")]
    assert parse_roots("/a:s3://ml/runs:hf://E/:file:///c") == [parse("/a"), parse("s3://ml/runs"), parse("hf://E"),
                                                                parse("/c")]
    # a host:port stays whole; so does an IPv6 literal
    assert parse_roots("http://h:8080/x:/local") == [parse("http://h:8080/x"), parse("/local")]
    assert parse_roots("http://[::1]:81/x") == [parse("http://[::1]:81/x")]
    assert parse_roots("") == [] and parse_roots(" , :") == []
    with pytest.raises(CredentialsInURI):
        parse_roots("/a,s3://k:s@b/x")


def test_locations_imports_no_store_client():
    """The API imports locations.py: no store client, torch or httpx comes with it."""
    code = ("import sys, layertrack.workers.locations, layertrack.workers.netpolicy; "
            "heavy = [m for m in ('obstore', 'boto3', 'botocore', 'huggingface_hub', 'httpx', 'torch', "
            "'transformers', 'layertrack.workers.stores') if m in sys.modules]; print(heavy); assert not heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ netpolicy
@pytest.mark.parametrize("addr, private", [
    ("127.0.0.1", True), ("10.1.2.3", True), ("192.168.0.1", True), ("169.254.169.254", True), ("::1", True),
    ("fd00::1", True), ("::ffff:10.0.0.1", True), ("64:ff9b::a00:1", True), ("2002:0a00:0001::", True),
    ("64:ff9b:1::1", True), ("224.0.0.1", True), ("8.8.8.8", False), ("2606:4700::1111", False),
    ("64:ff9b::808:808", False),
])
def test_private_addresses(addr, private):
    assert netpolicy.is_private(ipaddress.ip_address(addr)) is private


def test_check_address_and_allow_list():
    with pytest.raises(netpolicy.AddressRefused, match=r"non-public address 10\.0\.0\.5"):
        netpolicy.check_address("internal", "10.0.0.5", "")
    netpolicy.check_address("internal", "10.0.0.5", "10.0.0.0/8")
    netpolicy.check_address("internal", "10.0.0.5", "other, internal")
    netpolicy.check_address("x", "::ffff:10.0.0.5", "10.0.0.0/24")  # judged by the IPv4 it embeds
    netpolicy.check_address("public", "8.8.8.8", "")
    with pytest.raises(netpolicy.AddressRefused):
        netpolicy.resolve_checked("localhost", 80, "")
    assert netpolicy.resolve_checked("localhost", 80, "localhost")
