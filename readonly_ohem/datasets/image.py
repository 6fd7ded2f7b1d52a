"""Image files of a dataset: their size from the header and their pixels as ``cv2.imread`` gives them.

Read with PIL (no OpenCV needed); shared by the imdbs (``image_sizes``), the minibatch blobs and
``im_detect``'s callers.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from readonly_ohem.errors import DataError


def image_size(path) -> tuple[int, int]:
    """(width, height) from the file header."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read image ({e})") from None


def load_image_bgr(path) -> np.ndarray:
    """(H, W, 3) uint8 BGR, as ``cv2.imread`` (grey and palette images become 3-channel)."""
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read image ({e})") from None
    return rgb[:, :, ::-1]
