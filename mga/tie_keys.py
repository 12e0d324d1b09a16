"""Tie keys: the second key of the global order (mga.retrieval), a fixed integer per gallery id,
so the order of images with equal S_global does not depend on how the gallery is laid out,
split into blocks or spread over workers. Numpy only: the drivers that compute them for a
million stored ids import no torch.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# The tie rule's name, recorded with a search's rankings: an update of rankings made under another
# rule would break ties differently from a full search, so it searches in full (search.incremental).
TIE_RULE = "fnv1a64-utf8+splitmix64"
_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def utf8_tie_keys(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The tie rule's second key (TIE_RULE) of ids stored as UTF-8 bytes: id i is
    `data[starts[i]:starts[i] + lengths[i]]` (uint8; Arrow's string layout, or fixed-width rows).
    64-bit FNV-1a over the bytes, splitmix64's finaliser (ids that differ in one character land
    far apart), the top 63 bits: a fixed integer per id, whatever the gallery's layout. Numpy
    operations, one pass a byte position: ~0.1 s a million ids (a Python hash a row: ~1 s)."""
    key = np.full(len(starts), _FNV_OFFSET, np.uint64)
    last = max(len(data) - 1, 0)
    for position in range(int(lengths.max()) if len(lengths) else 0):
        byte = data[np.minimum(starts + position, last)]
        key = np.where(position < lengths, (key ^ byte) * _FNV_PRIME, key)
    for shift, multiplier in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        key ^= key >> np.uint64(shift)
        key *= np.uint64(multiplier)
    key ^= key >> np.uint64(31)
    return (key >> np.uint64(1)).astype(np.int64)


def tie_keys(ids: Iterable[str]) -> np.ndarray:
    """`utf8_tie_keys` of Python strings (trailing NUL characters aside)."""
    as_text = np.dtypes.StringDType()
    text = ids.astype(as_text) if isinstance(ids, np.ndarray) else np.array(list(ids), dtype=as_text)
    encoded = np.strings.encode(text, "utf-8")  # fixed-width rows of bytes, NUL-padded
    width = encoded.dtype.itemsize
    return utf8_tie_keys(encoded.view(np.uint8), np.arange(len(encoded), dtype=np.int64) * width, np.strings.str_len(encoded))
