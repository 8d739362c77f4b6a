"""ArrayRecord <-> torch tensors without ``np.load``'s and ``np.save``'s per-array cost.

Flower stores each array as ``.npy`` bytes and ``ArrayRecord.to_torch_state_dict`` reads every
one with ``np.load``, which parses the header with ``ast.literal_eval`` for every tensor of
every reply. ``record_tensors`` parses each distinct header once (a model's headers repeat
every round) and copies the payload straight into a tensor. Anything unusual (an unknown
header, Fortran order, an object dtype, a size that does not match) goes through
``np.load(allow_pickle=False)`` as before, which raises on malformed input.
``tensors_record`` writes the same bytes as Flower's ``np.save`` path, with cached headers.
"""

from __future__ import annotations

import ast
import functools
import io
import math
import warnings
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

_MAGIC = b"\x93NUMPY"


@functools.lru_cache(maxsize=4096)
def _header(prefix: bytes) -> tuple[np.dtype, tuple[int, ...], int, int] | None:
    """(dtype, shape, payload offset, element count) of a ``.npy`` prefix, or None to use ``np.load``."""
    major = prefix[6]
    size_bytes = 2 if major == 1 else 4
    length = int.from_bytes(prefix[8:8 + size_bytes], "little")
    start = 8 + size_bytes
    text = prefix[start:start + length]
    if len(text) != length:
        return None
    try:
        header = ast.literal_eval(text.decode("latin1"))
        dtype = np.dtype(header["descr"])
    except (ValueError, SyntaxError, KeyError, TypeError):
        return None
    shape = header.get("shape")
    if header.get("fortran_order") or dtype.hasobject or not isinstance(shape, tuple):
        return None
    try:
        count = math.prod(int(d) for d in shape)
    except (TypeError, ValueError):
        return None
    return dtype, shape, start + length, count


def record_tensors(record: ArrayRecord, copy: bool = True) -> OrderedDict[str, torch.Tensor]:
    """The record's arrays as tensors (what ``to_torch_state_dict`` returns, faster).

    ``copy=False`` returns views of the record's bytes (no copy):
    read-only memory, for a caller that only reads them (``load_state_dict`` copies them).
    """
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name in record.keys():
            out[name] = _tensor(record[name], copy)
    return out


def _tensor(arr, copy: bool) -> torch.Tensor:
    """One Flower ``Array`` as a tensor: the fast path for plain ``.npy`` bytes, else ``np.load``.

    ``arr.data`` may be any bytes-like object (``out_of_band`` makes it a numpy view).
    """
    data = memoryview(arr.data)
    if arr.stype == "numpy.ndarray" and data[:6] == _MAGIC and data[6] in (1, 2, 3):
        size_bytes = 2 if data[6] == 1 else 4
        length = int.from_bytes(data[8:8 + size_bytes], "little")
        parsed = _header(bytes(data[:8 + size_bytes + length]))
        if parsed is not None:
            dtype, shape, offset, count = parsed
            if len(data) - offset == count * dtype.itemsize:
                flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
                return torch.from_numpy(flat.copy() if copy else flat)
    return torch.from_numpy(arr.numpy())


def out_of_band(record: ArrayRecord) -> ArrayRecord:
    """``record`` with each array's bytes wrapped in a numpy view (no copy), for transport by Ray.

    Ray pickles a task's result with protocol 5: numpy buffers go out of band, straight into its
    shared-memory object store, and the receiver maps them without a copy; ``bytes`` are pickled
    in band, copied into a pickle first and out of it again on the other side. Only for
    Ray: Flower's gRPC path (a real SuperNode) needs ``bytes``. ``record_tensors`` reads both.
    """
    for arr in record.values():
        if isinstance(arr.data, bytes):
            arr.data = np.frombuffer(arr.data, dtype=np.uint8)
    return record


@functools.lru_cache(maxsize=4096)
def _npy_prefix(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of ``dtype`` and ``shape``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": shape})
    return buf.getvalue()


def tensors_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord of ``tensors`` with the bytes ``np.save`` would write (cached headers, one copy each).

    Filled item by item: ``ArrayRecord(dict_of_arrays)`` builds every ``Array`` a second time,
    and a client reply has one per tensor (100 clients a bundle: 1,000 of them).
    """
    record = ArrayRecord()
    for name, t in tensors.items():
        a = t.detach().cpu().contiguous().numpy()
        record[name] = Array(dtype=_dtype_name(a.dtype), shape=tuple(a.shape), stype="numpy.ndarray",
                             data=b"".join((_npy_prefix(a.dtype.str, a.shape), a.data)))  # one copy
    return record


@functools.lru_cache(maxsize=64)
def _dtype_name(dtype: np.dtype) -> str:
    return str(dtype)
