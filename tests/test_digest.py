"""The background digest of an input model file (surgery/digest.py): the same sha256 as hashing
the file in the calling thread, and an error, not a digest, when the file changes meanwhile."""

import hashlib
import os

import pytest

from surgery.digest import FileDigest, sha256_file


def _write(path, size: int, seed: int = 0) -> bytes:
    data = bytes((i * 131 + seed) % 251 for i in range(size))
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("size", [0, 1, (1 << 18) - 1, 1 << 18, 3 * (1 << 18) + 17])
def test_digest_matches_hashlib_at_buffer_edges(tmp_path, size):
    f = tmp_path / "model.keras"
    data = _write(f, size)
    expected = hashlib.sha256(data).hexdigest()
    with FileDigest(str(f)) as digest:
        assert digest.result() == expected
    assert sha256_file(str(f)) == expected


def test_a_file_rewritten_in_place_is_an_error(tmp_path):
    f = tmp_path / "model.keras"
    _write(f, 1 << 16)
    digest = FileDigest(str(f))
    digest._thread.join()  # hashed the first version
    with open(f, "r+b") as out:  # as a Keras save onto the same path does: same inode
        out.write(b"changed")
    with pytest.raises(OSError, match="changed while it was being read"):
        digest.result()


def test_a_file_replaced_by_rename_is_an_error(tmp_path):
    f = tmp_path / "model.keras"
    _write(f, 1 << 16)
    other = tmp_path / "other.keras"
    _write(other, 1 << 16, seed=1)
    digest = FileDigest(str(f))
    digest._thread.join()
    os.replace(other, f)
    with pytest.raises(OSError, match="changed"):
        digest.result()


def test_cancel_stops_and_closes(tmp_path):
    f = tmp_path / "model.keras"
    _write(f, 1 << 20)
    digest = FileDigest(str(f))
    digest.cancel()
    assert not digest._thread.is_alive()
    assert digest._fd == -1
    with FileDigest(str(f)):
        pass  # leaving the block early cancels too: nothing left open
