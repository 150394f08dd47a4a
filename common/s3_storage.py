"""File blobs in an S3-compatible store (AWS S3, MinIO, Ceph RGW), so API and workers on several hosts
share them without NFS. DIFFBATCH_FILES_URL names it (`parse_files_url`); credentials come from boto3's
usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, an instance role).

A blob appears whole or not at all: a small one in one PUT on commit, a larger one as a multipart upload
(parts of PART_BYTES) completed on commit and aborted on discard. Reads stream the object's body.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import parse_qs, urlsplit

from botocore.exceptions import ClientError

from common.storage import CHUNK_BYTES, OversizedLine, write_all

if TYPE_CHECKING:
    from types_boto3_s3 import S3Client
    from types_boto3_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger("diffbatch.storage")
# S3 refuses parts under 5 MiB but the last; a writer holds at most one part in memory.
PART_BYTES = 8 << 20
URL_OPTIONS = ("endpoint_url", "region", "addressing_style")
AddressingStyle = Literal["auto", "path", "virtual"]
ADDRESSING_STYLES: tuple[AddressingStyle, ...] = ("auto", "path", "virtual")
MISSING_KEY_CODES = ("404", "NoSuchKey", "NotFound")
URL_FORM = "s3://BUCKET[/PREFIX][?endpoint_url=http://HOST:PORT&region=NAME&addressing_style=path]"


@dataclass(frozen=True)
class S3Location:
    """Where DIFFBATCH_FILES_URL points: a bucket, a key prefix ('' or ending in '/'), and the endpoint."""

    bucket: str
    prefix: str
    endpoint_url: str | None
    region: str | None
    addressing_style: AddressingStyle


def parse_files_url(url: str) -> S3Location:
    """DIFFBATCH_FILES_URL, checked; raises ValueError naming the variable and the part that is wrong."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.hostname:
        raise ValueError(f"DIFFBATCH_FILES_URL: expected {URL_FORM}")
    if "@" in parts.netloc:  # never echoed: it would be a secret
        raise ValueError("DIFFBATCH_FILES_URL: credentials do not go in the URL; set AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - set(URL_OPTIONS))
    if unknown:
        raise ValueError(f"DIFFBATCH_FILES_URL: unknown option {unknown[0]!r}; the options are "
                         f"{', '.join(URL_OPTIONS)}")
    options = {name: values[-1] for name, values in query.items()}
    endpoint_url = options.get("endpoint_url") or None
    if endpoint_url is not None and not endpoint_url.startswith(("http://", "https://")):
        raise ValueError(f"DIFFBATCH_FILES_URL: endpoint_url must start with http:// or https://, "
                         f"got {endpoint_url!r}")
    # An on-prem endpoint (MinIO, an IP address) rarely resolves BUCKET.HOST: path style is its default.
    named = options.get("addressing_style") or ("path" if endpoint_url else "auto")
    style = next((known for known in ADDRESSING_STYLES if known == named), None)
    if style is None:
        raise ValueError(f"DIFFBATCH_FILES_URL: addressing_style must be one of {', '.join(ADDRESSING_STYLES)}, "
                         f"got {named!r}")
    prefix = parts.path.strip("/")
    return S3Location(bucket=parts.hostname, prefix=f"{prefix}/" if prefix else "", endpoint_url=endpoint_url,
                      region=options.get("region") or None, addressing_style=style)


def split_lines(chunks: Iterable[bytes], max_line_bytes: int | None = None) -> Iterator[bytes | OversizedLine]:
    """The lines of a byte stream as LocalBlobStore.lines gives them: split at b"\\n", endings stripped; a
    line whose bytes before its newline exceed ``max_line_bytes`` comes as OversizedLine(its whole length),
    counted without being kept, so memory stays under the limit plus one chunk."""
    line = bytearray()
    skipped: int | None = None  # bytes of an oversized line read past so far
    for chunk in chunks:
        start = 0
        while start < len(chunk):
            newline = chunk.find(b"\n", start)
            end = len(chunk) if newline < 0 else newline
            if skipped is not None:
                skipped += end - start
            elif max_line_bytes is not None and len(line) + end - start > max_line_bytes:
                skipped = len(line) + end - start
                line = bytearray()
            elif not line and newline >= 0:  # the common case, a whole line inside one chunk: no copy
                yield chunk[start:end].rstrip(b"\r\n")
                start = end + 1
                continue
            else:
                line += chunk[start:end]
            if newline < 0:
                break
            start = end + 1
            if skipped is not None:
                yield OversizedLine(skipped + 1)
                skipped = None
            else:
                whole, line = bytes(line), bytearray()
                yield whole.rstrip(b"\r\n")
    if skipped is not None:
        yield OversizedLine(skipped)
    elif line:
        yield bytes(line).rstrip(b"\r\n")


def _error_code(error: ClientError) -> str:
    return error.response.get("Error", {}).get("Code", "")


class S3BlobWriter:
    """One object being written: `write` parts, then `commit` (it appears whole) or `discard`."""

    def __init__(self, client: S3Client, bucket: str, key: str) -> None:
        self._client, self._bucket, self._key = client, bucket, key
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[CompletedPartTypeDef] = []
        self._committed = False
        self.size = 0

    def write(self, part: bytes) -> None:
        self._buffer += part
        self.size += len(part)
        while len(self._buffer) >= PART_BYTES:
            self._send(bytes(self._buffer[:PART_BYTES]))
            del self._buffer[:PART_BYTES]

    def _send(self, data: bytes) -> None:
        if self._upload_id is None:
            self._upload_id = self._client.create_multipart_upload(Bucket=self._bucket, Key=self._key)["UploadId"]
        number = len(self._parts) + 1
        sent = self._client.upload_part(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                                        PartNumber=number, Body=data)
        self._parts.append({"ETag": sent["ETag"], "PartNumber": number})

    def commit(self) -> int:
        """Make the object appear; returns its size in bytes."""
        try:
            if self._upload_id is None:
                self._client.put_object(Bucket=self._bucket, Key=self._key, Body=bytes(self._buffer))
            else:
                if self._buffer:
                    self._send(bytes(self._buffer))
                self._client.complete_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                                                       MultipartUpload={"Parts": self._parts})
            self._committed = True
        finally:
            self.discard()
        return self.size

    def discard(self) -> None:
        self._buffer = bytearray()
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is None or self._committed:
            return
        try:
            self._client.abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=upload_id)
        except Exception as error:  # noqa: BLE001 - never hide the error that led here; retention aborts it later
            if not isinstance(error, ClientError) or _error_code(error) != "NoSuchUpload":
                log.warning("could not abort the upload of %s (retention retries): %s", self._key, error)


class S3BlobStore:
    """Blobs as objects ``PREFIX + file_id`` in one bucket. The bucket must exist."""

    def __init__(self, client: S3Client, bucket: str, prefix: str = "") -> None:
        self.client, self.bucket, self.prefix = client, bucket, prefix

    @classmethod
    def from_url(cls, url: str) -> S3BlobStore:
        import boto3
        from botocore.config import Config

        where = parse_files_url(url)
        # Checksums only where S3 requires them: the CRC headers boto3 adds by default are refused by
        # some S3-compatible servers.
        config = Config(s3={"addressing_style": where.addressing_style},
                        retries={"mode": "standard", "max_attempts": 5},
                        request_checksum_calculation="when_required", response_checksum_validation="when_required")
        client = boto3.client("s3", endpoint_url=where.endpoint_url, region_name=where.region, config=config)
        return cls(client, where.bucket, where.prefix)

    def key(self, file_id: str) -> str:
        return self.prefix + file_id

    def writer(self, file_id: str) -> S3BlobWriter:
        return S3BlobWriter(self.client, self.bucket, self.key(file_id))

    def write(self, file_id: str, parts: Iterable[bytes]) -> int:
        """Store the parts as one object; returns its size in bytes."""
        return write_all(self.writer(file_id), parts)

    def read_chunks(self, file_id: str) -> Generator[bytes, None, None]:
        body = self.client.get_object(Bucket=self.bucket, Key=self.key(file_id))["Body"]
        try:
            yield from body.iter_chunks(CHUNK_BYTES)
        finally:
            body.close()

    def lines(self, file_id: str, max_line_bytes: int | None = None) -> Iterator[bytes | OversizedLine]:
        """The object's lines without their line endings, streamed (see `split_lines`)."""
        chunks = self.read_chunks(file_id)
        try:
            yield from split_lines(chunks, max_line_bytes)
        finally:
            chunks.close()  # a reader that stops early closes the connection now

    def exists(self, file_id: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(file_id))
        except ClientError as error:
            if _error_code(error) in MISSING_KEY_CODES:
                return False
            raise
        return True

    def delete(self, file_id: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(file_id))  # no error when already gone

    def location(self, file_id: str) -> str:
        return f"s3://{self.bucket}/{self.key(file_id)}"

    def purge_partials(self, cutoff: float) -> int:
        """Abort multipart uploads under the prefix whose last part (or start) is older than ``cutoff``."""
        aborted = 0
        for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                  Prefix=self.prefix):
            for upload in page.get("Uploads", []):
                key, upload_id, started = upload.get("Key"), upload.get("UploadId"), upload.get("Initiated")
                if key is None or upload_id is None or started is None or started.timestamp() >= cutoff:
                    continue
                try:
                    if self._last_part_written(key, upload_id) >= cutoff:
                        continue  # a long upload still going
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                except ClientError as error:
                    if _error_code(error) != "NoSuchUpload":  # its writer finished or aborted meanwhile
                        raise
                    continue
                aborted += 1
        return aborted

    def _last_part_written(self, key: str, upload_id: str) -> float:
        latest = 0.0
        for page in self.client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=key,
                                                                      UploadId=upload_id):
            for part in page.get("Parts", []):
                written = part.get("LastModified")
                if written is not None:
                    latest = max(latest, written.timestamp())
        return latest
