"""Run-length masks in the SIIM-ACR Pneumothorax form.

The competition's ``EncodedPixels`` are ``start length`` pairs over the image flattened **column-major** (down the
first column, then the second, ...), and each start is *relative*: counted from the end of the previous run (the
first from pixel 0). ``"-1"`` means an empty mask.
"""

from __future__ import annotations

import numpy as np

__all__ = ["rle_decode", "rle_encode"]


def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """Decode a relative, column-major RLE string into a bool mask (``height``, ``width``); ``"-1"``/``""`` is empty."""
    text = rle.strip()
    if text in ("", "-1"):
        return np.zeros((height, width), dtype=bool)
    try:
        values = np.array(text.split(), dtype=np.int64)
    except ValueError as error:
        raise ValueError(f"RLE must hold integers: {error}") from None
    if values.size % 2 or (values < 0).any():
        raise ValueError(f"RLE must hold non-negative start/length pairs, got {values.size} numbers")
    gaps, lengths = values[0::2], values[1::2]
    # Absolute start of run k = all gaps up to k + all lengths before k.
    starts = np.cumsum(gaps) + np.concatenate(([0], np.cumsum(lengths)[:-1]))
    ends = starts + lengths
    size = height * width
    if ends.size and ends[-1] > size:
        raise ValueError(f"RLE runs past the end of a {height}x{width} mask ({ends[-1]} > {size})")
    # +1 at each run start, -1 at each run end; the running sum is > 0 inside runs.
    edges = np.zeros(size + 1, dtype=np.int32)
    np.add.at(edges, starts, 1)
    np.add.at(edges, ends, -1)
    flat = np.cumsum(edges[:-1]) > 0
    return flat.reshape(width, height).T  # column-major: consecutive pixels run down a column


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask (non-zero = inside) as a relative, column-major RLE string; an empty mask gives ``"-1"``."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    flat = np.asarray(mask).T.reshape(-1).astype(bool)
    padded = np.concatenate(([False], flat, [False]))
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = changes[0::2], changes[1::2]
    if starts.size == 0:
        return "-1"
    gaps = starts - np.concatenate(([0], ends[:-1]))
    pairs = np.stack([gaps, ends - starts], axis=1).reshape(-1)
    return " ".join(map(str, pairs.tolist()))
