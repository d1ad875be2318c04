"""Row-wise access to ``.npz`` members and streamed ``.npz`` writing, so large image arrays never sit in memory whole.

``np.load`` of an ``.npz`` is lazy per member, but reading a member reads all of it: a 50,000-image member is 10 GB at
256 px. :class:`NpyMember` reads a range of rows of one member (for ``np.savez`` files, which store members
uncompressed, straight from the file at the row's offset), and :func:`save_npz_streamed` writes an ``.npz`` from
chunks, byte for byte what ``np.savez`` writes for the concatenated arrays.
"""
from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np

from data_pipeline.files import atomic_save

__all__ = ["NpyMember", "iter_member_rows", "save_npz_streamed"]

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header: 30 bytes, name and extra lengths last
_LOCAL_MAGIC = b"PK\x03\x04"


class NpyMember:
    """One array member (``key``) of an ``.npz`` file, read by ranges of rows (first axis).

    Members stored uncompressed as C-order ``.npy`` (what ``np.savez`` writes) are read from the file at the rows'
    offset; any other member (compressed, Fortran order, object dtype) is loaded whole once, as ``np.load`` would.
    """

    def __init__(self, path: Union[str, os.PathLike], key: str):
        self.path, self.key = Path(path), key
        self._file: Optional[BinaryIO] = None
        self._whole: Optional[np.ndarray] = None
        name = key + ".npy"
        with zipfile.ZipFile(self.path) as zf:
            try:
                info = zf.getinfo(name)
            except KeyError:
                raise KeyError(f"{self.path}: no member {key!r} (has {sorted(n[:-4] for n in zf.namelist())})") \
                    from None
        direct = info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1  # stored, not encrypted
        if direct:
            f = open(self.path, "rb")
            try:
                f.seek(info.header_offset)
                head = f.read(_LOCAL_HEADER.size)
                if len(head) != _LOCAL_HEADER.size or head[:4] != _LOCAL_MAGIC:
                    raise ValueError(f"{self.path}: bad zip header for member {key!r}")
                fields = _LOCAL_HEADER.unpack(head)
                f.seek(info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1])
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    fortran, dtype, shape = True, None, ()  # read whole below
            except BaseException:
                f.close()
                raise
            if fortran or dtype is None or dtype.hasobject or len(shape) == 0:
                f.close()
                direct = False
            else:
                self._file, self._data_offset = f, f.tell()
                self.shape: Tuple[int, ...] = tuple(int(s) for s in shape)
                self.dtype: np.dtype = dtype
        if not direct:
            with np.load(self.path, allow_pickle=False) as z:
                self._whole = z[key]
            if self._whole.ndim == 0:
                raise ValueError(f"{self.path}: member {key!r} is a scalar, not an array of rows")
            self.shape, self.dtype = self._whole.shape, self._whole.dtype
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a new array (clipped to the member like a slice)."""
        start, stop, _ = slice(start, stop).indices(self.shape[0])
        stop = max(start, stop)
        if self._whole is not None:
            return self._whole[start:stop].copy()
        if self._file is None:
            raise ValueError(f"{self.path}: member {self.key!r} is closed")
        out = np.empty((stop - start,) + self.shape[1:], dtype=self.dtype)
        want = out.nbytes
        if want:
            self._file.seek(self._data_offset + start * self.row_bytes)
            got = self._file.readinto(memoryview(out.reshape(-1).view(np.uint8)))
            if got != want:
                raise ValueError(f"{self.path}: member {self.key!r} is truncated (rows {start}:{stop} need {want} "
                                 f"bytes, read {got})")
        return out

    def close(self) -> None:
        """Release the file (and a wholly loaded member)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._whole = None

    def __enter__(self) -> "NpyMember":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_member_rows(path: Union[str, os.PathLike], key: str, chunk: int) -> Iterator[np.ndarray]:
    """Member ``key`` of ``path`` in consecutive chunks of ``chunk`` rows (the last one shorter)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    with NpyMember(path, key) as m:
        for start in range(0, len(m), chunk):
            yield m.read(start, start + chunk)


def _npy_header(shape: Tuple[int, ...], dtype: np.dtype) -> dict:
    return {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
            "shape": tuple(int(s) for s in shape)}


def save_npz_streamed(path: Union[str, os.PathLike],
                      members: Sequence[Tuple[str, Sequence[int], Union[np.dtype, type, str], Iterable[np.ndarray]]]
                      ) -> Path:
    """Write an ``.npz`` whose members are given as (key, shape, dtype, chunks along the first axis).

    The file is what ``np.savez(path, key=np.concatenate(chunks), ...)`` writes (same zip layout, same ``.npy``
    headers and bytes), without ever holding a whole member; it is written to a temporary name and renamed, so a
    failure (e.g. chunks that do not add up to ``shape``) leaves no file and an existing one untouched.
    """
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f, zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED,
                                                   allowZip64=True) as zf:
            for key, shape, dtype, chunks in members:
                _write_member(zf, key, tuple(int(s) for s in shape), np.dtype(dtype), chunks)

    return atomic_save(path, write)


def _write_member(zf: zipfile.ZipFile, key: str, shape: Tuple[int, ...], dtype: np.dtype,
                  chunks: Iterable[np.ndarray]) -> None:
    """One ``.npy`` member of `zf` from its chunks along the first axis (as np.savez writes it)."""
    if dtype.hasobject or len(shape) == 0:
        raise ValueError(f"{key}: only non-object arrays with at least one axis can be streamed")
    with zf.open(key + ".npy", "w", force_zip64=True) as out:  # as np.savez (numpy gh-10776)
        try:
            np.lib.format.write_array_header_1_0(out, _npy_header(shape, dtype))
        except ValueError:  # header too long for format 1.0: np.savez moves to 2.0 as well
            np.lib.format.write_array_header_2_0(out, _npy_header(shape, dtype))
        rows = 0
        for c in chunks:
            c = np.asarray(c)
            if c.dtype != dtype or c.shape[1:] != shape[1:]:
                raise ValueError(f"{key}: chunk {c.dtype} {c.shape} does not fit {dtype} {shape}")
            rows += c.shape[0]
            if rows > shape[0]:
                raise ValueError(f"{key}: chunks hold more than the {shape[0]} rows declared")
            if c.size:
                out.write(np.ascontiguousarray(c).reshape(-1).view(np.uint8))
        if rows != shape[0]:
            raise ValueError(f"{key}: chunks hold {rows} rows, {shape[0]} declared")
