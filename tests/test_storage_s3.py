"""The blob store contract, held by both stores: local disk and S3 (moto's S3 server, a real HTTP endpoint
on loopback). And one batch end to end with its files in S3 only."""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
from pydantic import ValidationError

from common.s3_storage import S3BlobStore
from common.settings import Settings
from common.storage import BlobStore, LocalBlobStore, OversizedLine, open_blob_store
from tests.harness import Service, completion_line

MiB = 1 << 20
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "diffbatch-test", "AWS_SECRET_ACCESS_KEY": "diffbatch-test-secret"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's standalone S3 server on a free loopback port, for the whole session."""
    try:
        import moto.server  # noqa: F401
    except ImportError as exc:
        if os.environ.get("CI") == "true":
            raise AssertionError("CI=true but moto[server] is not installed (pip install -e '.[dev]')") from exc
        pytest.skip("moto[server] is not installed")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # only guards a hang: it answers within seconds
        while True:
            assert server.poll() is None, f"moto_server exited with {server.returncode}"
            try:
                httpx.get(url, timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "moto_server did not answer"
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def s3_url(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """DIFFBATCH_FILES_URL of a new empty bucket, under a prefix."""
    import boto3

    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    bucket = f"diffbatch-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/files?endpoint_url={s3_endpoint}&region=us-east-1"


@dataclass
class Store:
    blobs: BlobStore
    leftovers: Callable[[], list[str]]  # everything stored: blobs and unfinished writes


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path) -> Store:
    if request.param == "local":
        local = LocalBlobStore(tmp_path / "files")
        return Store(local, lambda: sorted(p.name for p in local.root.iterdir()) if local.root.exists() else [])
    s3 = open_blob_store(Settings(data_dir=tmp_path, files_url=request.getfixturevalue("s3_url")))
    assert isinstance(s3, S3BlobStore)

    def leftovers() -> list[str]:
        objects = s3.client.list_objects_v2(Bucket=s3.bucket).get("Contents", [])
        uploads = s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])
        return sorted([o["Key"] for o in objects] + [f"{u['Key']} (upload)" for u in uploads])

    return Store(s3, leftovers)


def _chunks(total: int, size: int = MiB) -> Iterator[bytes]:
    """Distinct chunks, so parts stored out of order or twice would show."""
    for i in range(0, total, size):
        yield (f"{i:016d}".encode() * (size // 16 + 1))[:min(size, total - i)]


def test_round_trip(store: Store):
    assert not store.blobs.exists("file-a")
    assert store.blobs.write("file-a", [b"one\n", b"two", b"\n"]) == 8
    assert store.blobs.exists("file-a") and "file-a" in store.blobs.location("file-a")
    assert b"".join(store.blobs.read_chunks("file-a")) == b"one\ntwo\n"
    assert list(store.blobs.lines("file-a")) == [b"one", b"two"]
    empty = store.blobs.writer("file-empty")
    assert empty.commit() == 0 and b"".join(store.blobs.read_chunks("file-empty")) == b""


def test_a_blob_larger_than_a_part_streams_in_and_out_whole(store: Store):
    total = 21 * MiB + 123  # three parts of 8 MiB in S3, the last one short
    writer = store.blobs.writer("file-big")
    for chunk in _chunks(total):
        writer.write(chunk)
    assert writer.commit() == total
    digest = hashlib.sha256()
    for chunk in store.blobs.read_chunks("file-big"):
        assert len(chunk) <= MiB
        digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(b"".join(_chunks(total))).hexdigest()
    assert [name.rsplit("/", 1)[-1] for name in store.leftovers()] == ["file-big"]  # no part left over
    if isinstance(store.blobs, S3BlobStore):  # stored as a multipart upload of three parts
        head = store.blobs.client.head_object(Bucket=store.blobs.bucket, Key=store.blobs.key("file-big"))
        assert head["ETag"].endswith('-3"')
    writer.discard()  # after commit: a no-op
    assert store.blobs.exists("file-big")


def test_lines_past_the_limit_come_as_oversized_and_the_rest_as_lines(store: Store):
    limit = MiB  # lines cross the 1 MiB read chunks
    content = (b"first\n" + b"x" * (3 * MiB) + b"\n" + b"y" * limit + b"\r\n" + b"z" * limit + b"\n\n"
               + b"w" * (limit + 1) + b"\n" + b"tail")
    store.blobs.write("file-lines", [content])
    got = [line if isinstance(line, OversizedLine) else (line[:1], len(line))
           for line in store.blobs.lines("file-lines", max_line_bytes=limit)]
    assert got == [(b"f", 5), OversizedLine(3 * MiB + 1), OversizedLine(limit + 2), (b"z", limit), (b"", 0),
                   OversizedLine(limit + 2), (b"t", 4)]


def test_lines_split_across_any_chunking_match_the_local_reader(tmp_path):
    """S3 reads lines from a stream of chunks: wherever the chunks break, the lines are the local store's."""
    from common.s3_storage import split_lines

    local = LocalBlobStore(tmp_path)
    contents = [b"", b"\n", b"a", b"ab\r\n\r\ncd\n", b"12345678\n123456789\n1234567\r\n", b"0123456789" * 3,
                b"x\n" + b"y" * 20 + b"\n\nz" + b"\r" * 9 + b"\n12345678"]
    for number, content in enumerate(contents):
        local.write(f"file-{number}", [content])
        for limit in (None, 8):
            want = list(local.lines(f"file-{number}", max_line_bytes=limit))
            for size in (1, 2, 3, 7, 64):
                chunks = [content[i:i + size] for i in range(0, len(content), size)]
                assert list(split_lines(chunks, limit)) == want, (content, limit, size)


def test_a_discarded_or_failed_write_leaves_nothing(store: Store):
    writer = store.blobs.writer("file-gone")
    for chunk in _chunks(10 * MiB):  # past one part: an S3 upload is under way
        writer.write(chunk)
    writer.discard()
    writer.discard()

    def failing_parts() -> Iterator[bytes]:
        yield from _chunks(9 * MiB)
        raise RuntimeError("the client went away")

    with pytest.raises(RuntimeError):
        store.blobs.write("file-failed", failing_parts())
    assert store.leftovers() == []
    assert not store.blobs.exists("file-gone") and not store.blobs.exists("file-failed")


def test_delete_removes_the_blob_and_a_second_delete_is_no_error(store: Store):
    store.blobs.write("file-d", [b"{}\n"])
    store.blobs.delete("file-d")
    store.blobs.delete("file-d")
    assert not store.blobs.exists("file-d") and store.leftovers() == []


def test_unfinished_writes_older_than_the_cutoff_are_purged(store: Store):
    writer = store.blobs.writer("file-killed")
    for chunk in _chunks(9 * MiB):
        writer.write(chunk)
    assert store.leftovers() != []  # a temporary file, or an S3 upload with one part
    assert store.blobs.purge_partials(time.time() - 3600) == 0  # written just now: kept
    assert store.blobs.purge_partials(time.time() + 60) == 1
    assert store.leftovers() == []
    writer.discard()  # its writer coming back finds nothing to remove, and says nothing


def test_files_url_is_checked_at_startup_naming_the_setting(tmp_path):
    for url, says in [("http://bucket/x", "expected s3://BUCKET"), ("s3://b?endpoint=http://x", "'endpoint'"),
                      ("s3://b?endpoint_url=127.0.0.1:9000", "http://"), ("s3://key:secret@b", "AWS_ACCESS_KEY_ID"),
                      ("s3://b?addressing_style=dns", "addressing_style")]:
        with pytest.raises(ValidationError) as error:
            Settings(data_dir=tmp_path, files_url=url)
        message = error.value.errors()[0]["msg"]
        assert "DIFFBATCH_FILES_URL" in message and says in message and "key:secret" not in message
    assert isinstance(open_blob_store(Settings(data_dir=tmp_path)), LocalBlobStore)


def test_a_batch_runs_with_its_files_in_s3_only(tmp_path, tiny_model, s3_url: str):
    """Upload, run and download through the API and a real worker: every blob is an S3 object."""
    with Service.embedded(tmp_path, tiny_model, files_url=s3_url) as svc:
        batch = svc.submit([completion_line("a"), completion_line("b")])
        done = svc.wait(batch["id"])
        assert done["status"] == "completed", done
        assert sorted(line["custom_id"] for line in svc.lines_of(done["output_file_id"])) == ["a", "b"]
        blobs = svc.runtime.blobs
        keys = [o["Key"] for o in blobs.client.list_objects_v2(Bucket=blobs.bucket)["Contents"]]
        assert sorted(keys) == sorted(f"files/{f}" for f in (batch["input_file_id"], done["output_file_id"]))
        assert not svc.settings.files_dir.exists()
