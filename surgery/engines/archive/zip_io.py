"""Opening a `.keras` file as a zip: its checks, its config.json, the bytes of its weights entry.

The file is opened once and every later read (the config, the weights' metadata and values, the
copy in engines/archive/zip_copy.py) comes from that descriptor; its state at opening
(``stat``) is what the copy checks at the end, so one version of the file feeds everything.

What is not a zip with ``config.json`` and ``model.weights.h5`` is `ArchiveUnsupported` (Keras
reads a legacy HDF5 model under any name; a truncated file gets Keras's own verdict). What a zip
contradicts itself in is `DamagedArchive`. ``config.json`` is read with a size cap
(`config_cap`) and parsed with its depth checked, so a hostile config is an error, not gigabytes
of memory or a RecursionError.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
import zlib

from ...errors import ArchiveUnsupported, DamagedArchive
from .h5.base import Source
from .keras_layout import CONFIG, WEIGHTS

__all__ = ["ArchiveFile", "Window", "config_cap"]

_ZIP_DAMAGE = (zipfile.BadZipFile, zlib.error, EOFError)  # what zipfile raises on a damaged entry

# config.json holds the architecture (kilobytes to a few megabytes) and the values of entries
# frozen inside layers (at most the weights themselves, base64: 4/3 of their size, zlib does not
# shrink floats much). More than that is not a config Keras wrote.
_CONFIG_BASE_CAP = 64 << 20


def config_cap(weights_size: int) -> int:
    """The most bytes a config.json beside a weights entry of ``weights_size`` can hold."""
    return _CONFIG_BASE_CAP + 3 * weights_size // 2


class ArchiveFile:
    """A `.keras` file opened and checked as a zip. Use it as a context manager (or `close`)."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        try:
            self.file = open(self.path, "rb")
        except OSError as exc:
            raise ArchiveUnsupported(f"cannot open: {exc.strerror or exc}") from None
        try:
            self.stat = os.fstat(self.file.fileno())
            self.zip = self._open_zip()
        except BaseException:
            self.file.close()
            raise
        try:
            self._check()
        except BaseException:
            self.close()
            raise

    def _open_zip(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self.file)
        except zipfile.BadZipFile:
            raise ArchiveUnsupported("not a zip archive (a .keras file is one)") from None
        except UnicodeDecodeError:  # a name flagged UTF-8 that is not
            raise DamagedArchive("a name in its zip directory is not UTF-8") from None

    def _check(self) -> None:
        names = self.zip.NameToInfo
        if CONFIG not in names:
            raise ArchiveUnsupported(f"the archive has no {CONFIG}")
        if WEIGHTS not in names:
            others = [n for n in names if n.startswith("model.weights")]
            detail = f" (it has {others[0]})" if others else ""
            raise ArchiveUnsupported(f"the archive has no {WEIGHTS}{detail}")
        for info in self.zip.infolist():
            if info.flag_bits & 0x1:
                raise ArchiveUnsupported(f"the entry {info.filename} is encrypted")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise ArchiveUnsupported(f"the entry {info.filename} uses compression method "
                                         f"{info.compress_type}")
            if info.header_offset + info.compress_size > self.stat.st_size:
                raise DamagedArchive(f"the entry {info.filename} lies outside the file "
                                     "(truncated?)")

    def __enter__(self) -> "ArchiveFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.zip.close()
        self.file.close()

    def config(self) -> dict:
        """config.json, parsed."""
        info = self.zip.getinfo(CONFIG)
        cap = config_cap(self.zip.getinfo(WEIGHTS).file_size)
        if info.file_size > cap:
            raise DamagedArchive(f"{CONFIG} is {info.file_size} bytes, more than a model config "
                                 f"beside these weights holds ({cap}): a damaged or hostile "
                                 "file?")
        try:
            # read(size), not read(): zipfile inflates up to what it is asked for (read() asks
            # for 2 GiB at a time), keeps the directory's size and checks the CRC-32 there.
            with self.zip.open(info) as entry:
                data = entry.read(info.file_size)
        except zipfile.BadZipFile as exc:
            raise DamagedArchive(f"{CONFIG}: {exc}") from None
        except EOFError:
            raise DamagedArchive(f"{CONFIG} is shorter than the zip directory says") from None
        except zlib.error:
            raise DamagedArchive(f"{CONFIG} is not a valid deflate stream") from None
        try:
            cfg = json.loads(data)
        except UnicodeDecodeError:
            raise DamagedArchive(f"{CONFIG} is not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise DamagedArchive(f"{CONFIG} is not JSON: {exc}") from None
        except RecursionError:  # json's own bound on nesting, raised before any of ours runs
            raise DamagedArchive(f"{CONFIG} nests deeper than a JSON reader follows") from None
        if not isinstance(cfg, dict):
            raise DamagedArchive(f"{CONFIG} does not hold a model config")
        return cfg

    def data_offset(self, info: zipfile.ZipInfo) -> int:
        """Where the (compressed) bytes of an entry start in the file."""
        header = os.pread(self.file.fileno(), 30, info.header_offset)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise DamagedArchive(f"the entry {info.filename} has no local header where the zip "
                                 "directory says")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.compress_size > self.stat.st_size:
            raise DamagedArchive(f"the entry {info.filename} lies outside the file (truncated?)")
        return start

    def weights(self) -> Source:
        """The bytes of model.weights.h5, for the HDF5 readers (engines/archive/h5/)."""
        info = self.zip.getinfo(WEIGHTS)
        if info.compress_type != zipfile.ZIP_STORED:
            # Keras stores its entries; a recompressed archive is streamed through zipfile.
            return Source(info.file_size, None, lambda: _Inflating(self.zip.open(WEIGHTS)))
        start = self.data_offset(info)
        fd = self.file.fileno()
        size = info.file_size

        def pread(offset: int, n: int) -> bytes:
            return os.pread(fd, n, start + offset)  # the readers keep within [0, size)

        return Source(size, pread, lambda: Window(fd, start, size))


class Window(io.RawIOBase):
    """A read-only file over [start, start + size) of a file descriptor (the stored weights
    entry inside the zip), for h5py."""

    def __init__(self, fd: int, start: int, size: int):
        super().__init__()
        self._fd, self._start, self._size, self._pos = fd, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._size - self._pos))
        data = os.pread(self._fd, n, self._start + self._pos) if n else b""
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


class _Inflating(io.RawIOBase):
    """A compressed entry streamed through zipfile, for h5py: what zipfile raises on damage (a
    wrong CRC-32, a bad deflate stream, an entry shorter than its size) is a DamagedArchive, not
    an exception that h5py passes up from its file callbacks as it is."""

    def __init__(self, entry):
        super().__init__()
        self._entry = entry

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._entry.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        try:
            return self._entry.seek(offset, whence)
        except _ZIP_DAMAGE as exc:
            raise DamagedArchive(f"{WEIGHTS}: {exc or type(exc).__name__}") from None

    def readinto(self, buffer) -> int:
        try:
            data = self._entry.read(len(buffer))
        except _ZIP_DAMAGE as exc:
            raise DamagedArchive(f"{WEIGHTS}: {exc or type(exc).__name__}") from None
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._entry.close()
        super().close()
