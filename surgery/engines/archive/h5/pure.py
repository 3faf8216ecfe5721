"""The pure HDF5 backend: the metadata h5py writes by default, read with `struct`, no NumPy.

Why it exists, measured (``bench/bench_archive.py --compare readers --runs 7``: whole
processes, interleaved, medians; a shared 2-core VM with the other core busy elsewhere): on a
ResNet50 .keras, ``surgery show`` takes 0.126 s and 26 MiB with it, 0.389 s and 52 MiB with
h5py; ``surgery plan`` 0.133 s against 0.396 s (a later run: 0.156 against 0.428 s, and
0.160 against 0.446 s). That is 0.26 s (3x) and half the memory saved on
every read-only command (show, plan, verify, lint --model, diff --spec), which CI and pre-commit
hooks run often. Importing h5py (NumPy and HDF5's library with it) is 0.13-0.19 s of that; the
rest is h5py's cost per object over the 676 groups and datasets of ResNet50's file.

What it reads is what Keras writes through h5py (libver 'earliest'): superblock version 0 or 1
with 8-byte offsets and lengths, version-1 object headers, groups as symbol tables (version-1
B-trees, local heaps), attributes whose strings are fixed-length or in the global heap, datasets
of little-endian IEEE floats stored contiguous or compact, unfiltered. `reads` says up front
whether a file is of that kind (its superblock); within one, a layout it does not read
(a version-2 object header, a new-style group, a chunked or filtered dataset, a shared message)
is `ArchiveUnsupported`, and a structure that contradicts itself (an address outside the file, a
missing signature, a message running past its block) is `H5FormatError`: every read and every
field is checked, so no `struct.error` or `IndexError` stands for a damaged file.

A hostile file cannot make it loop or run away: every structure is parsed once per address
(object headers, heaps, groups by header), B-tree walks and continuation chains keep a visited
set, and the metadata read in all is bounded by twice the file's size (a valid file holds each
structure once, so its metadata is at most its size). Dataset values, read only when asked, are
bounded by the file's size too, since their storage is checked to lie inside it.
"""

from __future__ import annotations

import math
import struct
from typing import Optional

from ....errors import ArchiveUnsupported, H5FormatError
from .base import Reader, Source

__all__ = ["PureReader", "reads"]

_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_UNDEFINED = 0xFFFFFFFFFFFFFFFF
_MAX_BTREE_DEPTH = 32

# Object header message types this reader interprets.
_DATASPACE, _LINK_INFO, _DATATYPE, _LINK, _LAYOUT, _FILTERS, _ATTRIBUTE = 1, 2, 3, 6, 8, 11, 12
_CONTINUATION, _SYMBOL_TABLE = 0x10, 0x11
_SHARED = 0x02  # message flag: the data is a reference to a shared message

# (itemsize, exponent bits, mantissa bits) of the float types h5py writes for weights. Keras
# stores bfloat16 as opaque 2-byte items, not as an HDF5 float: h5py reads those, and refuses.
_FLOATS = {(2, 5, 10): "float16", (4, 8, 23): "float32", (8, 11, 52): "float64"}

_Members = dict[str, tuple[int, Optional[tuple[int, int]]]]  # name -> (header, symbol table)


def reads(source: Source) -> Optional[str]:
    """None if this backend reads ``source``'s layout, else why not (from the superblock)."""
    if source.pread is None:
        return "the weights entry is compressed in the zip (Keras stores it)"
    head = source.pread(0, 24) if source.size >= 24 else b""
    if len(head) < 24 or head[:8] != _SIGNATURE:
        return "no HDF5 signature at its start"
    if head[8] not in (0, 1):
        return f"superblock version {head[8]}"
    if head[13] != 8 or head[14] != 8:
        return "offsets or lengths are not 8 bytes"
    return None


def _unpack(fmt: str, data: bytes, offset: int, what: str) -> tuple:
    end = offset + struct.calcsize(fmt)
    if offset < 0 or end > len(data):
        raise H5FormatError(f"{what} is truncated")
    return struct.unpack_from(fmt, data, offset)


class PureReader(Reader):
    backend = "pure"

    def __init__(self, source: Source):
        assert source.pread is not None  # `reads` said so
        self._pread = source.pread
        self._size = source.size
        self._budget = 2 * source.size + (1 << 20)  # metadata bytes left to read: see above
        self._base = 0  # the superblock is at the start; addresses in it are from its base
        head = self._meta(0, 24, "superblock")
        version = head[8]
        pos = 24 + (4 if version == 1 else 0)
        base, _free, _eof, _driver = _unpack("<4Q", self._meta(pos, 32, "superblock"), 0,
                                             "superblock")
        self._base = base
        entry = self._meta(pos + 32, 40, "root group entry")
        _name, header, cache, _res = _unpack("<QQLL", entry, 0, "root group entry")
        table = _unpack("<QQ", entry, 24, "root group entry") if cache == 1 else None
        self._root: tuple[int, Optional[tuple[int, int]]] = (header, table)
        self._messages: dict[int, list[tuple[int, int, bytes]]] = {}
        self._heaps: dict[int, bytes] = {}
        self._collections: dict[int, dict[int, bytes]] = {}
        self._by_header: dict[int, _Members] = {}  # groups by object header address
        self._by_path: dict[str, Optional[_Members]] = {}

    # reading

    def _read(self, addr: int, n: int, what: str) -> bytes:
        """``n`` bytes at file address ``addr`` (relative to the base address)."""
        if addr == _UNDEFINED or n < 0 or addr < 0 or self._base + addr + n > self._size:
            raise H5FormatError(f"{what} at address {addr} lies outside the file "
                                f"({self._size} bytes)")
        data = self._pread(self._base + addr, n) if n else b""
        if len(data) != n:
            raise H5FormatError(f"{what} at address {addr} is truncated")
        return data

    def _meta(self, addr: int, n: int, what: str) -> bytes:
        """As `_read` (whose bounds come first: at most the file's size), for metadata:
        counted against the budget."""
        data = self._read(addr, n, what)
        self._budget -= n
        if self._budget < 0:
            raise H5FormatError(f"its metadata takes more reading than a file of {self._size} "
                                "bytes can hold (a structure is reached more than once)")
        return data

    # object headers

    def messages(self, addr: int) -> list[tuple[int, int, bytes]]:
        """(type, flags, data) of every message of the object header at ``addr``."""
        cached = self._messages.get(addr)
        if cached is not None:
            return cached
        prefix = self._meta(addr, 16, "object header")
        if prefix[:4] == b"OHDR":
            raise ArchiveUnsupported("a version-2 object header (the file was written with "
                                     "libver 'latest'?)")
        version, _r, _count, _refs, size = _unpack("<BBHLL", prefix, 0, "object header")
        if version != 1:
            raise H5FormatError(f"object header at address {addr} has version {version}")
        blocks = [(addr + 16, size)]
        seen = {addr + 16}
        out: list[tuple[int, int, bytes]] = []
        while blocks:
            start, length = blocks.pop(0)
            block = self._meta(start, length, "object header block")
            p = 0
            while p + 8 <= length:
                mtype, msize, flags = _unpack("<HHB", block, p, "object header message")
                if p + 8 + msize > length:
                    raise H5FormatError(f"a message of the object header at address {addr} "
                                        "runs past its block")
                data = block[p + 8:p + 8 + msize]
                p += 8 + msize
                if mtype == _CONTINUATION:
                    c_addr, c_len = _unpack("<QQ", data, 0, "continuation message")
                    if c_addr in seen:
                        raise H5FormatError(f"the object header at address {addr} continues "
                                            "into itself")
                    seen.add(c_addr)
                    blocks.append((c_addr, c_len))
                elif mtype != 0:
                    out.append((mtype, flags, data))
        self._messages[addr] = out
        return out

    def _message(self, addr: int, mtype: int, what: str) -> Optional[bytes]:
        """The data of the first message of ``mtype`` in the header at ``addr``, if any."""
        for t, flags, data in self.messages(addr):
            if t == mtype:
                if flags & _SHARED:
                    raise ArchiveUnsupported(f"{what} is a shared message")
                return data
        return None

    # groups

    def _group(self, header: int, table: Optional[tuple[int, int]]) -> _Members:
        cached = self._by_header.get(header)
        if cached is not None:
            return cached
        if table is None:
            found = self._message(header, _SYMBOL_TABLE, "a symbol table")
            if found is None:
                raise H5FormatError(f"the object at address {header} is not a group")
            table = _unpack("<QQ", found, 0, "symbol table message")
        btree, heap = table
        members: _Members = {}
        self._walk_btree(btree, self._heap(heap), members)
        self._by_header[header] = members
        return members

    def _heap(self, addr: int) -> bytes:
        """The data segment of a local heap (a group's member names)."""
        cached = self._heaps.get(addr)
        if cached is None:
            head = self._meta(addr, 32, "local heap")
            if head[:4] != b"HEAP":
                raise H5FormatError(f"no local heap at address {addr}")
            size, _free, data = _unpack("<QQQ", head, 8, "local heap")
            cached = self._heaps[addr] = self._meta(data, size, "local heap data")
        return cached

    def _walk_btree(self, root: int, heap: bytes, members: _Members) -> None:
        # Depth first, explicitly: each node once (a valid tree shares none), levels falling by
        # one from the root's, so neither a cycle nor a deep chain can keep it going.
        stack = [(root, None)]
        seen: set[int] = set()
        while stack:
            addr, expected = stack.pop()
            if addr in seen:
                raise H5FormatError(f"the group B-tree reaches node {addr} twice")
            seen.add(addr)
            head = self._meta(addr, 24, "group B-tree node")
            if head[:4] != b"TREE" or head[4] != 0:
                raise H5FormatError(f"no group B-tree node at address {addr}")
            level = head[5]
            (used,) = _unpack("<H", head, 6, "group B-tree node")
            if (expected is not None and level != expected) or level > _MAX_BTREE_DEPTH:
                raise H5FormatError(f"the group B-tree node at address {addr} is at level "
                                    f"{level}")
            body = self._meta(addr + 24, (2 * used + 1) * 8, "group B-tree node")
            children = [_unpack("<Q", body, 8 + 16 * i, "group B-tree node")[0]
                        for i in range(used)]
            if level > 0:
                stack.extend((child, level - 1) for child in reversed(children))
                continue
            for child in children:
                self._symbols(child, heap, members)

    def _symbols(self, addr: int, heap: bytes, members: _Members) -> None:
        snod = self._meta(addr, 8, "symbol table node")
        if snod[:4] != b"SNOD":
            raise H5FormatError(f"no symbol table node at address {addr}")
        (count,) = _unpack("<H", snod, 6, "symbol table node")
        entries = self._meta(addr + 8, 40 * count, "symbol table node")
        for k in range(count):
            name_off, header, cache = _unpack("<QQL", entries, 40 * k, "symbol table entry")
            if cache == 2:
                raise ArchiveUnsupported("a symbolic link in the weights file")
            table = _unpack("<QQ", entries, 40 * k + 24, "symbol table entry") \
                if cache == 1 else None
            name = _heap_name(heap, name_off)
            if name in members:
                raise H5FormatError(f"a group has two members named {name!r}")
            members[name] = (header, table)

    def _members(self, path: str) -> Optional[_Members]:
        if path in self._by_path:
            return self._by_path[path]
        if path == "":
            header, table = self._root
        else:
            parent, _, name = path.rpartition("/")
            members = self._members(parent)
            if members is None or name not in members:
                self._by_path[path] = None
                return None
            header, table = members[name]
            if table is None and not self._is_group(header):
                self._by_path[path] = None
                return None
        result = self._by_path[path] = self._group(header, table)
        return result

    def _is_group(self, header: int) -> bool:
        types = {t for t, _, _ in self.messages(header)}
        if _LINK_INFO in types or _LINK in types:
            raise ArchiveUnsupported("a new-style group (link messages) in the weights file")
        return _SYMBOL_TABLE in types

    def _lookup(self, path: str) -> int:
        parent, _, name = path.rpartition("/")
        members = self._members(parent)
        if members is None or name not in members:
            raise H5FormatError(f"no object {path}")
        return members[name][0]

    # the Reader interface

    def children(self, path: str) -> Optional[dict[str, str]]:
        members = self._members(path)
        if members is None:
            return None
        return {name: ("group" if table is not None or self._is_group(header) else "dataset")
                for name, (header, table) in members.items()}

    def shape(self, path: str) -> tuple[int, ...]:
        return self._plain(path)[0]

    def dataset(self, path: str) -> tuple[str, bytes]:
        dims, itemsize, storage = self._plain(path)
        header = self._lookup(path)
        dtype = _float_type(self._message(header, _DATATYPE, f"{path}'s datatype"), path)
        nbytes = math.prod(dims) * itemsize
        if isinstance(storage, bytes):
            return dtype, storage
        return dtype, self._read(storage, nbytes, f"{path}'s data")

    def _plain(self, path: str) -> tuple[tuple[int, ...], int, "int | bytes"]:
        """(dims, itemsize, data address or compact bytes) of a dataset stored as h5py writes
        one by default: contiguous (or compact), unfiltered, its storage inside the file and of
        exactly the size its dataspace and datatype give."""
        header = self._lookup(path)
        space = self._message(header, _DATASPACE, f"{path}'s dataspace")
        dtype = self._message(header, _DATATYPE, f"{path}'s datatype")
        layout = self._message(header, _LAYOUT, f"{path}'s layout")
        if space is None or dtype is None or layout is None:
            raise H5FormatError(f"{path} is not a dataset")
        if self._message(header, _FILTERS, f"{path}'s filters") is not None:
            raise ArchiveUnsupported(f"{path} is filtered (compressed)")
        dims, _scalar = _dataspace(space, path)
        (itemsize,) = _unpack("<L", dtype, 4, f"{path}'s datatype")
        nbytes = math.prod(dims) * itemsize
        if not layout or layout[0] != 3:
            raise ArchiveUnsupported(f"{path}: data layout version "
                                     f"{layout[0] if layout else '(none)'}")
        kind = _unpack("<B", layout, 1, f"{path}'s layout")[0]
        if kind == 1:  # contiguous: address, size
            address, size = _unpack("<QQ", layout, 2, f"{path}'s layout")
            if size != nbytes:
                raise H5FormatError(f"{path}: {size} bytes stored for {nbytes}")
            if nbytes and (address == _UNDEFINED or self._base + address + nbytes > self._size):
                raise H5FormatError(f"{path}: its {nbytes} bytes lie outside the file")
            return dims, itemsize, address
        if kind == 0:  # compact: the bytes are in the header
            (size,) = _unpack("<H", layout, 2, f"{path}'s layout")
            if size != nbytes or len(layout) < 4 + size:
                raise H5FormatError(f"{path}: {size} bytes stored for {nbytes}")
            return dims, itemsize, bytes(layout[4:4 + size])
        raise ArchiveUnsupported(f"{path}: data layout class {kind} (chunked)")

    def name_attr(self, path: str) -> Optional[str]:
        members = self._members(path.rpartition("/")[0])
        name = path.rpartition("/")[2]
        if members is None or name not in members:
            return None
        return self._string_attr(members[name][0], "name", path)

    def dtype(self, path: str) -> str:
        header = self._lookup(path)
        data = self._message(header, _DATATYPE, f"{path}'s datatype")
        if data is None:
            raise H5FormatError(f"{path} has no datatype")
        return _type_name(data, path, lambda: self._string_attr(header, "dtype", path))

    def _string_attr(self, header: int, wanted: str, path: str) -> Optional[str]:
        """The string attribute ``wanted`` of the object whose header is at ``header``."""
        for mtype, flags, data in self.messages(header):
            if mtype == _ATTRIBUTE:
                attr_name, value = self._attribute(data, flags, path)
                if attr_name == wanted:
                    return value
        return None

    def _attribute(self, data: bytes, flags: int, path: str) -> tuple[str, Optional[str]]:
        what = f"an attribute of {path}"
        if flags & _SHARED:
            raise ArchiveUnsupported(f"{what} is a shared message")
        version = _unpack("<B", data, 0, what)[0]
        name_size, dt_size, ds_size = _unpack("<HHH", data, 2, what)
        if version == 1:
            p = 8
            pad = lambda n: (n + 7) & ~7  # noqa: E731
        elif version in (2, 3):
            if data[1] & 0x3:
                raise ArchiveUnsupported(f"{what} has a shared datatype or dataspace")
            p = 8 + (1 if version == 3 else 0)
            pad = lambda n: n  # noqa: E731
        else:
            raise ArchiveUnsupported(f"{what}: attribute message version {version}")
        if p + pad(name_size) + pad(dt_size) + pad(ds_size) > len(data):
            raise H5FormatError(f"{what} is truncated")
        name = _text(data[p:p + name_size].split(b"\0", 1)[0], what)
        p += pad(name_size)
        dtype = data[p:p + dt_size]
        p += pad(dt_size)
        _dims, scalar = _dataspace(data[p:p + ds_size], what)
        p += pad(ds_size)
        if not scalar or not dtype:
            return name, None
        value = data[p:]
        klass = dtype[0] & 0x0F
        if klass == 3:  # fixed-length string
            (size,) = _unpack("<L", dtype, 4, what)
            return name, value[:size].split(b"\0", 1)[0].decode("utf-8", "replace")
        if klass == 9 and len(dtype) > 1 and (dtype[1] & 0x0F) == 1:  # variable-length string
            length, collection, index = _unpack("<LQL", value, 0, what)
            return name, self._global_object(collection, index)[:length].decode("utf-8",
                                                                                 "replace")
        return name, None

    def _global_object(self, collection: int, index: int) -> bytes:
        objects = self._collections.get(collection)
        if objects is None:
            head = self._meta(collection, 16, "global heap collection")
            if head[:4] != b"GCOL":
                raise H5FormatError(f"no global heap collection at address {collection}")
            (size,) = _unpack("<Q", head, 8, "global heap collection")
            if size < 16:
                raise H5FormatError(f"the global heap collection at address {collection} is "
                                    f"{size} bytes")
            body = self._meta(collection + 16, size - 16, "global heap collection")
            objects = self._collections[collection] = {}
            p = 0
            while p + 16 <= len(body):
                obj_index, _refs, _res, obj_size = _unpack("<HHLQ", body, p, "global heap")
                if obj_index == 0:
                    break  # free space: the rest of the collection
                if p + 16 + obj_size > len(body):
                    raise H5FormatError("a global heap object runs past its collection")
                objects[obj_index] = body[p + 16:p + 16 + obj_size]
                p += 16 + ((obj_size + 7) & ~7)
        if index not in objects:
            raise H5FormatError(f"global heap object {index} not found")
        return objects[index]


def _heap_name(heap: bytes, offset: int) -> str:
    end = heap.find(b"\0", offset)
    if offset >= len(heap) or end < 0:
        raise H5FormatError("a member name lies outside its local heap")
    return _text(heap[offset:end], "a member name")


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise H5FormatError(f"{what} is not UTF-8") from None


def _dataspace(data: bytes, what: str) -> tuple[tuple[int, ...], bool]:
    """(dims, is_scalar) of a dataspace message."""
    version, rank = _unpack("<BB", data, 0, f"{what}'s dataspace")
    if version == 1:
        p = 8
        scalar = rank == 0
    elif version == 2:
        p = 4
        kind = _unpack("<BB", data, 2, f"{what}'s dataspace")[1]
        if kind == 2:
            raise ArchiveUnsupported(f"{what} has a null dataspace")
        scalar = kind == 0
    else:
        raise ArchiveUnsupported(f"{what}: dataspace version {version}")
    dims = _unpack(f"<{rank}Q", data, p, f"{what}'s dataspace")
    return tuple(int(d) for d in dims), scalar


# HDF5 datatype classes other than integers, floats and opaque items, for messages.
_CLASS_NAMES = {2: "time values", 3: "fixed-length strings", 4: "bit fields", 6: "a compound type",
                7: "references", 8: "an enumeration", 9: "variable-length items", 10: "arrays"}


def _type_name(data: bytes, path: str, opaque_tag) -> str:
    """The NumPy name of a datatype message's type (see Reader.dtype); ``opaque_tag()`` gives
    the dataset's ``dtype`` attribute, asked only for opaque items (how bfloat16 is marked)."""
    what = f"{path}'s datatype"
    cls, bits0 = _unpack("<BB", data, 0, what)
    (size,) = _unpack("<L", data, 4, what)
    klass = cls & 0x0F
    if klass == 0:  # fixed-point; bit 3: signed
        return f"{'int' if bits0 & 0x08 else 'uint'}{8 * size}"
    if klass == 1:
        exp_bits, _loc, mant_bits = _unpack("<BBB", data, 13, what)
        return _FLOATS.get((size, exp_bits, mant_bits), f"{size}-byte floats with a "
                                                         f"{exp_bits}-bit exponent")
    if klass == 5:
        return "bfloat16" if size == 2 and opaque_tag() == "bfloat16" else \
            f"opaque {size}-byte items"
    return _CLASS_NAMES.get(klass, f"HDF5 type class {klass}")


def _float_type(data: Optional[bytes], path: str) -> str:
    """The dtype name of a little-endian IEEE float datatype message."""
    if data is None:
        raise H5FormatError(f"{path} has no datatype")
    cls, bits0 = _unpack("<BB", data, 0, f"{path}'s datatype")
    (size,) = _unpack("<L", data, 4, f"{path}'s datatype")
    if cls & 0x0F != 1 or bits0 & 0x01:  # floating point; bit 0: big-endian
        raise ArchiveUnsupported(f"{path} is not stored as little-endian IEEE floats (bfloat16 "
                                 "is stored as opaque items)")
    exp_bits, _loc, mant_bits = _unpack("<BBB", data, 13, f"{path}'s datatype")
    name = _FLOATS.get((size, exp_bits, mant_bits))
    if name is None:
        raise ArchiveUnsupported(f"{path}: floats of {size} bytes, {exp_bits}-bit exponent")
    return name
