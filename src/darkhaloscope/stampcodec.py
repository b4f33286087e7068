"""Fast path behind ``contract.decode_stamps`` (same results as ``np.load``).

* ``read_npz_members``: the stamps are ``np.savez`` archives, i.e. ZIP files whose members are stored
  uncompressed ``.npy`` files. Parsing the local headers and ``.npy`` headers directly (and checking each
  member's CRC-32, as ``np.load`` does) is ~10x cheaper than ``np.load`` + ``zipfile`` per row. Anything
  unexpected (compression, other member names, dtype, Fortran order, ...) returns None and the caller
  falls back to ``np.load``. Written by hand because no library parses many tiny npz blobs cheaply.
"""

from __future__ import annotations

import ast
import math
import struct
import zlib

import numpy as np

_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # ZIP local file header (30 bytes)
_SIG = b"PK\x03\x04"
_EOCD = b"PK\x05\x06"  # end of central directory, the last 22 bytes of a comment-less ZIP
_NPY_MAGIC = b"\x93NUMPY"
_header_cache: dict[bytes, tuple] = {}


def _npy_header(raw: bytes) -> tuple | None:
    hit = _header_cache.get(raw)
    if hit is None:
        try:
            d = ast.literal_eval(raw.decode("latin1"))
            shape = tuple(int(n) for n in d["shape"])
            hit = (np.dtype(d["descr"]), shape, bool(d["fortran_order"]), math.prod(shape))
        except Exception:
            return None
        if len(_header_cache) < 64:
            _header_cache[raw] = hit
    return hit


def read_npz_members(blob: bytes, names: tuple[str, ...]) -> list[np.ndarray] | None:
    """The arrays stored under ``names`` (in this order, as the leading members of the archive), or
    None when the blob is not a plain stored npz of that layout (then use np.load)."""
    out = []
    pos = 0
    mv = memoryview(blob)
    if bytes(mv[-22:-18]) != _EOCD:  # truncated archive (np.load would refuse it): let np.load decide
        return None
    try:
        for name in names:
            sig, _ver, flags, method, _t, _d, crc, _cs, _us, n_name, n_extra = _LOCAL.unpack_from(blob, pos)
            if sig != _SIG or method != 0 or flags & 0x08:
                return None
            start = pos + 30
            if bytes(mv[start:start + n_name]).decode("utf-8", "replace") != name + ".npy":
                return None
            data = start + n_name + n_extra
            if bytes(mv[data:data + 6]) != _NPY_MAGIC:
                return None
            major = blob[data + 6]
            if major == 1:
                hlen = struct.unpack_from("<H", blob, data + 8)[0]
                hstart = data + 10
            elif major in (2, 3):
                hlen = struct.unpack_from("<I", blob, data + 8)[0]
                hstart = data + 12
            else:
                return None
            header = _npy_header(bytes(mv[hstart:hstart + hlen]))
            if header is None:
                return None
            dtype, shape, fortran, count = header
            if fortran or dtype.hasobject:
                return None
            body = hstart + hlen
            end = body + dtype.itemsize * count
            if end > len(blob) or zlib.crc32(mv[data:end]) != crc:
                return None
            out.append(np.frombuffer(blob, dtype=dtype, count=count, offset=body).reshape(shape))
            pos = end
    except (struct.error, IndexError, ValueError):
        return None
    return out


# ----------------------------------------------------------------------------------------------------
# Writer: ``write_npz`` builds the same kind of archive as ``np.savez`` (a ZIP of stored, uncompressed
# ``.npy`` members) directly as bytes. ``np.savez`` goes through ``zipfile`` with a per-member file
# object, zip64 extras and the current time as timestamp: ~0.3 ms per 3-band stamp and not
# byte-reproducible. Here the .npy header of each (dtype, shape) is made once by ``np.lib.format``, the
# ZIP headers are packed with ``struct`` and every timestamp is fixed, so the same arrays always give the
# same bytes (~10x cheaper). Written by hand because no library writes many tiny npz blobs cheaply.
# ----------------------------------------------------------------------------------------------------

_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # ZIP central directory header (46 bytes)
_END = struct.Struct("<4sHHHHIIH")               # end of central directory record (22 bytes)
_ZIP_VERSION = 20                                # "2.0": plain stored members, no zip64
_DOS_TIME, _DOS_DATE = 0, (1980 - 1980) << 9 | 1 << 5 | 1  # 1980-01-01 00:00:00, the earliest DOS date
_npy_prefix_cache: dict[tuple, bytes] = {}


def _npy_prefix(array: np.ndarray) -> bytes:
    """The .npy magic + header that ``np.save`` writes before the data of a C-ordered ``array``."""
    key = (array.dtype.str, array.shape)
    hit = _npy_prefix_cache.get(key)
    if hit is None:
        import io

        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(array))
        hit = buf.getvalue()
        if len(_npy_prefix_cache) < 64:
            _npy_prefix_cache[key] = hit
    return hit


def write_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """Bytes of an uncompressed .npz holding ``arrays`` (member ``<key>.npy`` per key, in order) that
    ``np.load`` reads back exactly; deterministic (fixed timestamps). Archives above 4 GiB are not
    supported (no zip64), far beyond a stamp."""
    local, central = [], []
    offset = 0
    for key, value in arrays.items():
        array = np.ascontiguousarray(value)
        if array.dtype.hasobject:
            raise ValueError(f"write_npz: member {key!r} has dtype object")
        name = f"{key}.npy".encode("utf-8")
        prefix = _npy_prefix(array)
        data = memoryview(array).cast("B")
        size = len(prefix) + data.nbytes
        crc = zlib.crc32(data, zlib.crc32(prefix))
        header = _LOCAL.pack(_SIG, _ZIP_VERSION, 0, 0, _DOS_TIME, _DOS_DATE, crc, size, size, len(name), 0)
        local += [header, name, prefix, data]
        central.append(_CENTRAL.pack(b"PK\x01\x02", _ZIP_VERSION, _ZIP_VERSION, 0, 0, _DOS_TIME, _DOS_DATE,
                                     crc, size, size, len(name), 0, 0, 0, 0, 0, offset) + name)
        offset += len(header) + len(name) + size
    directory = b"".join(central)
    end = _END.pack(_EOCD, 0, 0, len(central), len(central), len(directory), offset, 0)
    return b"".join(local) + directory + end
