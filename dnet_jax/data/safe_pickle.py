"""A restricted unpickler for the CIFAR python batches.

``pickle.load`` runs whatever callable a pickle names, so loading a file from
an untrusted place can run code (e.g. ``os.system``). The CIFAR batches are
dicts of bytes keys -> lists of ints, bytes and one uint8 ndarray, written by
Python 2 ``cPickle``. Rebuilding them needs only numpy's array and dtype
reconstruction, so ``find_class`` admits exactly those and refuses the rest
(the approach of the Python docs, "Restricting Globals").
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from typing import Any, BinaryIO, Callable

import numpy as np

# numpy's own reconstruction functions, taken from how numpy pickles itself so
# that no private module is imported by name (numpy < 2 keeps them in
# ``numpy.core``, numpy >= 2 in ``numpy._core``).
_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # multiarray._reconstruct
_SCALAR = np.int64(0).__reduce__()[0]  # multiarray.scalar
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # numeric._frombuffer

# Names a CIFAR pickle (or a re-pickled copy of one) may reference, mapped to
# the object to use. Files written by either numpy generation resolve to the
# current implementation, so the deprecated ``numpy.core`` shim is not used.
_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    # ndarray.__reduce__: _reconstruct(ndarray, shape, dtype) + __setstate__.
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # numpy scalars (e.g. labels stored as np.int64 in a re-pickled file).
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    # Pickle protocol 5 arrays: _frombuffer(buffer, dtype, shape, order).
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    # Python 3 writes bytes at protocol <= 2 as _codecs.encode(str, 'latin1').
    ("_codecs", "encode"): codecs.encode,
}


class RefusedPickleError(pickle.UnpicklingError):
  """The pickle names a global outside the allowlist; nothing was called."""


class RestrictedUnpickler(pickle.Unpickler):
  """Unpickler whose globals are limited to numpy array reconstruction."""

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise RefusedPickleError(
          f"refused to load the pickle: it references {module}.{name}, which "
          "is not part of a CIFAR data batch (only numpy array "
          "reconstruction is allowed). The file is not a genuine CIFAR "
          "batch; do not load it with plain pickle.") from None


def safe_load(fileobj_or_path: str | os.PathLike | BinaryIO) -> Any:
  """Loads a CIFAR python pickle with ``RestrictedUnpickler``.

  Uses ``encoding="bytes"`` (as the CIFAR website's ``unpickle`` does), so
  Python 2 ``str`` values and dict keys come back as ``bytes``
  (``b"data"``, ``b"labels"``).

  Args:
    fileobj_or_path: a path or a binary file object.

  Returns:
    The unpickled object.

  Raises:
    RefusedPickleError: (a ``pickle.UnpicklingError``) the file references
      anything else than numpy array reconstruction.
  """
  if isinstance(fileobj_or_path, (str, os.PathLike)):
    with open(fileobj_or_path, "rb") as f:
      return RestrictedUnpickler(f, encoding="bytes").load()
  return RestrictedUnpickler(fileobj_or_path, encoding="bytes").load()


def safe_loads(data: bytes) -> Any:
  """``safe_load`` for an in-memory pickle."""
  return safe_load(io.BytesIO(data))
