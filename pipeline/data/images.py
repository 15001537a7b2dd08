"""Image helpers shared by the model stages: decode to RGB arrays, grids, PNG (no torch: the
driver reads them; `image_tensors` batches them to tensors)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode_rgb(data: bytes, size: int | None = None) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 HxWx3; resized (bicubic) to size x size when it differs."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        return np.asarray(img, dtype=np.uint8)


def grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Rows of equal-size uint8 images (each row BxHxWx3) tiled into one uint8 image."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    h, w = rows[0].shape[1:3]
    out = np.full((n_rows * (h + pad) + pad, n_cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = img
    return out


def tile(images: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
    """uint8 BxHxWx3 images in rows of `columns` (the last row may be shorter), as one grid image."""
    return grid([images[i : i + columns] for i in range(0, len(images), columns)], pad)


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 HxWx3 -> PNG file bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
