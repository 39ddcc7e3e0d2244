"""Just enough of R's serialization format to read character vectors out of a package's lazy-load data.

CRAN packages keep their data sets in `data/Rdata.rdx` (a gzipped serialized index: name -> [offset,
length] in `Rdata.rdb`) and `Rdata.rdb` (each object: 4-byte big-endian length, a compression tag, then the
compressed serialization). This reads XDR serialization versions 2 and 3 for the types plain data uses
(character, logical, integer, double vectors, lists, pairlists, symbols, references) and refuses the rest;
it exists so the default model's corpus needs no R installation.
"""

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any

_NIL, _SYM, _LIST, _CHAR, _LGL, _INT, _REAL, _STR, _VEC = 0, 1, 2, 9, 10, 13, 14, 16, 19
_REF, _NILVALUE, _GLOBALENV, _EMPTYENV, _BASEENV, _MISSING = 255, 254, 253, 242, 241, 251
_SPECIAL_VALUES = {_NILVALUE, _GLOBALENV, _EMPTYENV, _BASEENV, _MISSING}


class RDataError(ValueError):
    pass


def read_lazyload(directory: Path, stem: str = "Rdata") -> dict[str, Any]:
    """Every object of `<directory>/<stem>.rdx/.rdb` as Python values (character vectors -> list[str])."""
    index = unserialize(gzip.decompress((directory / f"{stem}.rdx").read_bytes()))
    blob = (directory / f"{stem}.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        out[name] = unserialize(_decompress(blob[int(offset) : int(offset) + int(length)]))
    return out


def _decompress(record: bytes) -> bytes:
    size = struct.unpack(">I", record[:4])[0]
    tag, body = record[4:5], record[5:]
    if tag == b"Z":
        data = zlib.decompress(body)
    elif tag == b"2":
        data = bz2.decompress(body)
    elif tag == b"X":
        data = lzma.decompress(body)
    elif tag == b"0":
        data = body
    else:  # R's original format: zlib straight after the length
        data = zlib.decompress(record[4:])
    if len(data) != size:
        raise RDataError(f"decompressed {len(data)} bytes, record says {size}")
    return data


def unserialize(data: bytes) -> Any:
    return _Reader(data).read_top()


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.refs = data, 0, []

    def read_top(self) -> Any:
        if self.data[:2] != b"X\n":
            raise RDataError("not an XDR (binary) R serialization")
        self.pos = 2
        version = self.int()
        self.pos += 8  # writer's R version, minimal reader version
        if version == 3:
            length = self.int()
            self.pos += length  # native encoding name
        elif version != 2:
            raise RDataError(f"serialization version {version} is not supported")
        return self.item()

    def int(self) -> int:
        (value,) = struct.unpack(">i", self.data[self.pos : self.pos + 4])
        self.pos += 4
        return value

    def item(self) -> Any:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in _SPECIAL_VALUES or kind == _NIL:
            return None
        if kind == _REF:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == _SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == _LIST:
            return self.pairlist(has_attr, has_tag)
        if kind == _CHAR:
            n = self.int()
            if n == -1:
                return None
            text = self.data[self.pos : self.pos + n].decode("utf-8", errors="replace")
            self.pos += n
            return text
        if kind in (_LGL, _INT, _REAL, _STR, _VEC):
            n = self.int()
            if kind == _STR or kind == _VEC:
                values: Any = [self.item() for _ in range(n)]
            elif kind == _REAL:
                values = list(struct.unpack(f">{n}d", self.data[self.pos : self.pos + 8 * n]))
                self.pos += 8 * n
            else:
                values = list(struct.unpack(f">{n}i", self.data[self.pos : self.pos + 4 * n]))
                self.pos += 4 * n
            if has_attr:
                attrs = self.item()
                if isinstance(attrs, dict) and "names" in attrs and kind == _VEC:
                    return dict(zip(attrs["names"], values))
            return values
        raise RDataError(f"R object type {kind} is not supported by this reader")

    def pairlist(self, has_attr: bool, has_tag: bool) -> dict[str, Any]:
        out = {}
        while True:
            if has_attr:
                self.item()
            tag = self.item() if has_tag else str(len(out))
            out[tag] = self.item()
            flags = self.int()
            if flags & 0xFF != _LIST:
                self.pos -= 4
                self.item()  # the terminating NILVALUE
                return out
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
