"""The copy of an archive with config.json replaced: a zip writer that hashes as it copies.

`copy` writes every entry but the replaced ones as stored (same bytes, compression, timestamp),
in the original order, streaming the weights in chunks, and checks each entry's CRC-32 and size
(a deflated one inflated as it goes) as any zip reader will, so a damaged input is an error and
not an output Keras refuses later.
The manifest needs the sha256 of the output and of the input: both are computed from the same
reads, in two threads beside the copy (hashlib releases the GIL on large updates), through a
small pool of reused buffers. The output depends only on the input bytes and the replacement,
so it is byte-reproducible, and a replacement equal to the original gives the input's bytes.

Why a writer of its own rather than ``zipfile`` (``zin.open(info)`` into ``zout.open(info,
"w")``): zipfile rewrites each local header once its entry is written, so its output cannot be
hashed as it goes and needs a second read after the copy; it computes the CRC-32 twice (reading
and writing); and it hashes nothing of the source. Measured on the 554 MB VGG16 archive
(``bench/bench_archive.py --compare writers``, the copy alone, interleaved runs, medians, the
shared 2-core VM): with both cores free (7 runs) this writer takes 0.57 s, zipfile with the
source hashed in a thread during its copy and the output hashed after it 0.82 s: 0.69x the
time (whole processes 0.69 s and 0.95 s; CPU 1.13 s and 1.35 s). With one core taken by other
work (9 runs) 1.00 s against 1.22 s, 0.82x: it does less work, not only in parallel. It costs
a 16 MiB buffer pool (peak 41 MiB against 27 MiB) and this module: kept.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

from ...digest import InputChanged, _read_into, changed, sha256_file
from ...errors import DamagedArchive
from .zip_io import ArchiveFile

__all__ = ["Written", "copy"]


class Written(NamedTuple):
    """What `copy` produced: the sha256 of the output file and of the source file, both
    computed while copying, so the manifest needs no second read of either."""

    sha256: str
    source_sha256: str


_CHUNK = 1 << 20
# How many chunks may be read ahead of the slower hasher: 6 MiB, and up to 16 MiB for files
# from 512 MiB on (1/32 of the file). Two hashers and the copy share two cores on small
# machines; more slack lets each keep going while the scheduler runs the others (on VGG16,
# 554 MB, 16 chunks write in 0.58 s where 6 take 0.62 s), at a memory cost that stays small
# next to the file's size.
_MIN_CHUNKS, _MAX_CHUNKS = 6, 16
_ZIP64_LIMIT = 0xFFFFFFFF  # sizes and offsets from this value on need zip64 fields
_ZIP64_COUNT = 0xFFFF


def copy(archive: ArchiveFile, dst: str, replace: dict[str, bytes],
         drop: frozenset[str] = frozenset()) -> Written:
    """Copy ``archive`` to ``dst`` with the entries named in ``replace`` given new contents and
    those in ``drop`` left out."""
    infos = archive.zip.infolist()
    fd = archive.file.fileno()
    src_size = os.fstat(fd).st_size
    spans = []  # (local header offset, data offset, data end) in the source, per entry
    for info in infos:
        start = archive.data_offset(info)
        spans.append((info.header_offset, start, start + info.compress_size))
    # One sequential pass hashes the source while its entries are copied, when they lie in
    # central-directory order (as zipfile writes them); otherwise the source is hashed apart.
    sequential = all(spans[i][2] <= spans[i + 1][0] for i in range(len(spans) - 1)) and \
        (not spans or spans[-1][2] <= src_size)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    buffers = _Buffers(max(_MIN_CHUNKS, min(_MAX_CHUNKS, src_size // (32 * _CHUNK))), _CHUNK)
    out_hash = _Hasher()
    src_hash = _Hasher()
    try:
        with open(dst, "wb", buffering=0) as out:
            writer = _Out(out, out_hash)
            pos = 0  # how far the source has been hashed
            central = []
            for info, (header, start, end) in zip(infos, spans):
                if sequential:
                    _pass(fd, pos, start, buffers, src_hash)  # gap, local header
                    pos = start
                if info.filename in drop:
                    if sequential:
                        _pass(fd, start, end, buffers, src_hash)
                        pos = end
                    continue
                new = replace.get(info.filename)
                if new is not None:
                    data, crc, usize = _compress(new, info)
                    entry = _entry(info, writer.offset, len(data), usize, crc)
                    writer.write(entry.local_header())
                    writer.write(data)
                    if sequential:
                        _pass(fd, start, end, buffers, src_hash)
                else:
                    entry = _entry(info, writer.offset, info.compress_size, info.file_size,
                                   info.CRC)
                    writer.write(entry.local_header())
                    # Every entry's content is checked as any zip reader will: its CRC-32 and
                    # size, over the inflated bytes of a deflated one.
                    content = _Content(info)
                    _pass(fd, start, end, buffers, src_hash if sequential else None, writer,
                          content.feed)
                    content.check()
                if sequential:
                    pos = end
                central.append(entry)
            if sequential:
                _pass(fd, pos, src_size, buffers, src_hash)  # data descriptors, central directory
            _write_central(writer, central, archive.zip.comment)
        digest_out = out_hash.finish()
        digest_in = src_hash.finish() if sequential else sha256_file(archive.path)
        if changed(archive.stat, os.fstat(fd), archive.path):
            raise InputChanged()  # the config, the values, the copy and the digests may disagree
    finally:
        out_hash.close()
        src_hash.close()
    return Written(digest_out, digest_in)


def _compress(data: bytes, info: zipfile.ZipInfo) -> tuple[bytes, int, int]:
    # Stored or deflated: ArchiveFile refuses the other methods when it opens the archive.
    crc = zlib.crc32(data) & 0xFFFFFFFF
    if info.compress_type == zipfile.ZIP_STORED:
        return data, crc, len(data)
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush(), crc, len(data)


@dataclass
class _Entry:
    name: bytes
    flags: int
    method: int
    dostime: int
    dosdate: int
    crc: int
    csize: int
    usize: int
    offset: int
    create_version: int
    create_system: int
    extract_version: int
    internal_attr: int
    external_attr: int
    comment: bytes

    def _zip64_local(self) -> bool:
        return self.csize >= _ZIP64_LIMIT or self.usize >= _ZIP64_LIMIT

    def local_header(self) -> bytes:
        extra = b""
        csize, usize = self.csize, self.usize
        if self._zip64_local():
            extra = struct.pack("<HHQQ", 1, 16, usize, csize)
            csize = usize = 0xFFFFFFFF
        version = max(self.extract_version, 45 if extra else 20)
        return struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", version, 0, self.flags, self.method,
                           self.dostime, self.dosdate, self.crc, csize, usize, len(self.name),
                           len(extra)) + self.name + extra

    def central_header(self) -> bytes:
        fields = []
        csize, usize, offset = self.csize, self.usize, self.offset
        if self._zip64_local():  # as in the local header: both sizes, in this order
            fields += [usize, csize]
            csize = usize = 0xFFFFFFFF
        if offset >= _ZIP64_LIMIT:
            fields.append(offset)
            offset = 0xFFFFFFFF
        extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
        version = max(self.extract_version, 45 if extra else 20)
        return struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", max(self.create_version, version),
                           self.create_system, version, 0, self.flags, self.method, self.dostime,
                           self.dosdate, self.crc, csize, usize, len(self.name), len(extra),
                           len(self.comment), 0, self.internal_attr, self.external_attr,
                           offset) + self.name + extra + self.comment


def _entry(info: zipfile.ZipInfo, offset: int, csize: int, usize: int, crc: int) -> _Entry:
    flags = info.flag_bits & ~0x08  # sizes go in the header: no data descriptor
    try:
        name = info.filename.encode("ascii")
        flags &= ~0x800
    except UnicodeEncodeError:
        name = info.filename.encode("utf-8")
        flags |= 0x800
    y, mo, d, h, mi, s = info.date_time
    dosdate = (max(y, 1980) - 1980) << 9 | mo << 5 | d
    dostime = h << 11 | mi << 5 | (s // 2)
    return _Entry(name=name, flags=flags, method=info.compress_type, dostime=dostime,
                  dosdate=dosdate, crc=crc & 0xFFFFFFFF, csize=csize, usize=usize, offset=offset,
                  create_version=min(info.create_version, 63), create_system=info.create_system,
                  extract_version=min(info.extract_version, 63),
                  internal_attr=info.internal_attr & 0xFFFF,
                  external_attr=info.external_attr & 0xFFFFFFFF, comment=info.comment or b"")


def _write_central(writer: "_Out", entries: list[_Entry], comment: bytes) -> None:
    start = writer.offset
    for e in entries:
        writer.write(e.central_header())
    size = writer.offset - start
    count = len(entries)
    if count > _ZIP64_COUNT or size >= _ZIP64_LIMIT or start >= _ZIP64_LIMIT:
        end64 = writer.offset
        writer.write(struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count,
                                 size, start))
        writer.write(struct.pack("<4sLQL", b"PK\x06\x07", 0, end64, 1))
        count16 = min(count, 0xFFFF)
        size32 = min(size, 0xFFFFFFFF)
        start32 = min(start, 0xFFFFFFFF)
    else:
        count16, size32, start32 = count, size, start
    comment = comment[:0xFFFF]
    writer.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count16, count16, size32, start32,
                             len(comment)) + comment)


class _Hasher:
    """sha256 in a worker thread, fed in order through a queue. hashlib releases the GIL on
    large updates, so hashing the output, hashing the source and copying run on separate cores.
    The queue needs no bound of its own: the chunks in it come from `_Buffers`, whose fixed
    pool bounds the memory held whatever the file size (the few other items are zip headers
    and the rewritten config.json)."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="surgery-sha256", daemon=True)
        self._thread.start()
        self._closed = False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            data, done = item
            try:
                self._digest.update(data)
            except BaseException as exc:  # pragma: no cover - hashlib does not fail on bytes
                self._error = exc
            if done is not None:
                done()

    def update(self, data, done: Optional[Callable[[], None]] = None) -> None:
        """Hash ``data`` next; ``done()`` is called once it has been hashed."""
        self._queue.put((data, done))

    def finish(self) -> str:
        self.close()
        if self._error is not None:  # pragma: no cover
            raise self._error
        return self._digest.hexdigest()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()


class _Buffers:
    """A few reused chunk buffers: a fresh megabyte per read would be a fresh mmap, page faults
    and zeroing for every chunk (glibc serves large allocations with mmap). A buffer goes back to
    the pool when every hasher it was handed to is done with it."""

    def __init__(self, count: int, size: int):
        self._free: "queue.SimpleQueue[bytearray]" = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(bytearray(size))
        self._lock = threading.Lock()

    def get(self) -> bytearray:
        return self._free.get()

    def release_after(self, buf: bytearray, users: int) -> Callable[[], None]:
        left = [max(users, 1)]

        def done() -> None:
            with self._lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                self._free.put(buf)
        return done


class _Out:
    """The output file, its sha256 and the offset reached."""

    def __init__(self, f, hasher: _Hasher):
        self.f = f
        self.hasher = hasher
        self.offset = 0

    def write(self, data, done: Optional[Callable[[], None]] = None) -> None:
        view = memoryview(data)
        while view:
            n = self.f.write(view)
            view = view[n:]
        self.hasher.update(data, done)
        self.offset += len(data)


class _Content:
    """An entry's content as its stored bytes go by: its CRC-32 and size, checked against the
    zip directory at the end. A deflated entry is inflated a chunk at a time (never more than a
    chunk of output held, so a bomb costs time bounded by its size, not memory)."""

    def __init__(self, info: zipfile.ZipInfo):
        self.info = info
        self.crc = self.size = 0
        self._inflate = (zlib.decompressobj(-15) if info.compress_type == zipfile.ZIP_DEFLATED
                         else None)

    def _add(self, data) -> None:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        if self.size > self.info.file_size:
            raise self._damaged("holds more bytes than the zip directory says")

    def feed(self, data) -> None:
        if self._inflate is None:
            self._add(data)
            return
        try:
            while data:
                self._add(self._inflate.decompress(data, _CHUNK))
                data = self._inflate.unconsumed_tail
        except zlib.error:
            raise self._damaged("is not a valid deflate stream") from None

    def check(self) -> None:
        if self._inflate is not None:
            try:
                self._add(self._inflate.flush())
            except zlib.error:
                raise self._damaged("is not a valid deflate stream") from None
            if not self._inflate.eof:
                raise self._damaged("ends before its deflate stream does")
        if self.size != self.info.file_size:
            raise self._damaged("holds fewer bytes than the zip directory says")
        if self.crc != self.info.CRC:
            raise self._damaged("fails its CRC-32 check")

    def _damaged(self, what: str) -> DamagedArchive:
        return DamagedArchive(f"{self.info.filename} {what}: the file is damaged")


def _pass(fd: int, begin: int, end: int, buffers: _Buffers, src_hash: Optional[_Hasher],
          writer: Optional[_Out] = None, check: Optional[Callable] = None) -> None:
    """Read [begin, end) of the source in chunks: hash it as source bytes, copy it out, or both;
    ``check`` sees every chunk copied."""
    while begin < end:
        n = min(_CHUNK, end - begin)
        buf = buffers.get()
        view = memoryview(buf)[:n]
        if _read_into(fd, view, begin) != n:
            buffers.release_after(buf, 1)()
            raise InputChanged()  # it lay inside the file when the archive was opened
        users = (writer is not None) + (src_hash is not None)
        done = buffers.release_after(buf, users)
        if not users:
            done()
        if writer is not None:
            if check is not None:
                check(view)  # before the writer: a damaged chunk is never written out
            writer.write(view, done)
        if src_hash is not None:
            src_hash.update(view, done)
        begin += n


