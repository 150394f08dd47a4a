"""The blob store: a file appears whole or not at all, whoever else writes it."""

from common.storage import LocalBlobStore


def test_two_writers_of_one_blob_do_not_corrupt_it(tmp_path):
    """A finalizer taken over while writing and the one that took over write the same file id: each
    writes its own temporary file, so the blob is one writer's whole content, never a mix."""
    store = LocalBlobStore(tmp_path)
    second = [b"second writer\n" * 1000]

    def first_writer_parts():
        yield b"first writer\n" * 500
        assert store.write("file-x", second) == len(second[0])  # the other writer, start to end
        yield b"first writer\n" * 500

    size = store.write("file-x", first_writer_parts())
    assert store.path("file-x").read_bytes() == b"first writer\n" * 1000 and size == 13000
    assert [p.name for p in tmp_path.iterdir()] == ["file-x"]  # no partial file left behind
