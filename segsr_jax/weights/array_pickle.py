"""Reading numpy arrays out of a pickle without running it: a restricted unpickler.

A pickle is a program; loading an untrusted one with :mod:`pickle` runs whatever it calls.
:func:`load_array_pickle` admits only numpy's array reconstruction (non-object dtypes) and
the protocol's plain containers and scalars, and refuses every other global, so a pinned
third-party weight file (e.g. LPIPS's) can be read as data.
"""

from __future__ import annotations

import io
import pickle

import numpy as np


class RefusedPickle(ValueError):
    """A pickle holding more than numpy arrays in plain containers (the message says what)."""


def _dtype(spec, align=False, copy=False):
    dt = np.dtype(spec, align, copy)
    if dt.hasobject:
        raise pickle.UnpicklingError(f"refusing object dtype {dt}")
    return dt


class _NdarrayToken:
    """Stands for ``numpy.ndarray`` in a pickle: accepted as ``_reconstruct``'s class argument,
    but not callable, so a pickle cannot construct arrays with arbitrary ``ndarray(...)``
    arguments."""


def _reconstruct(cls, shape, dtype_code):
    if cls is not _NdarrayToken:
        raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}")
    return np.ndarray.__new__(np.ndarray, shape, _dtype(dtype_code))


def _frombuffer(buf, dtype, shape, order):
    """numpy's pickle-protocol-5 array reconstruction, with the dtype checked."""
    return np.frombuffer(buf, _dtype(dtype)).reshape(shape, order=order)


def _latin1(text, encoding):
    """Protocol 2's spelling of bytes: ``_codecs.encode(text, "latin1")``, nothing else."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with {encoding!r}")
    return text.encode("latin1")


class _ArrayUnpickler(pickle.Unpickler):
    """Admits only ``numpy.ndarray`` reconstruction and non-object dtypes; the containers
    (dict, list, tuple) and scalars of the pickle protocol need no globals. Every other global
    (any callable a pickle could run) is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "ndarray"): _NdarrayToken,
        ("_codecs", "encode"): _latin1,
        ("numpy", "dtype"): _dtype,
    }

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing persistent ids")


def load_array_pickle(data: bytes):
    """Unpickle ``data`` holding only numpy arrays in plain containers (see
    :class:`_ArrayUnpickler`); anything else raises :class:`RefusedPickle`."""
    try:
        obj = _ArrayUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise RefusedPickle(f"refusing pickle: {e}") from None
    _check_tree(obj)
    return obj


def _check_tree(obj, path="") -> None:
    """Every leaf a non-object ndarray or a plain scalar; containers dict / list / tuple."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise RefusedPickle(f"refusing pickle: key {k!r} at {path or '/'}")
            _check_tree(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_tree(v, f"{path}/{i}")
    elif isinstance(obj, np.ndarray):
        if type(obj) is not np.ndarray or obj.dtype.hasobject:
            raise RefusedPickle(
                f"refusing pickle: array at {path or '/'} is {type(obj).__name__} of {obj.dtype}"
            )
    elif obj is not None and not isinstance(obj, (bool, int, float, str, bytes)):
        raise RefusedPickle(f"refusing pickle: {type(obj).__name__} at {path or '/'}")
