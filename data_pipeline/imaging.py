"""Image preprocessing shared by the shard writer and the loader: ADM/DiT centre crop, encode, decode."""
from __future__ import annotations

import io
from typing import Optional

import numpy as np
from PIL import Image

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "tif", "tiff", "gif")
MODES = {1: "L", 3: "RGB"}


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """Centre crop and resize as ADM/DiT do: halve with a box filter while the short side is at least twice the
    target, bicubic-resize the short side to ``image_size``, then crop the centre square."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size])


def load_image(data: bytes | str, channels: int) -> Image.Image:
    """Fully decode an image (file path or bytes) into mode L (1 channel) or RGB (3); raises on corrupt data."""
    img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data)
    img.load()
    if img.mode != MODES[channels]:
        img = img.convert(MODES[channels])
    return img


def encode_image(img: Image.Image, fmt: str, quality: int = 95) -> bytes:
    """PNG (lossless) or JPEG bytes of ``img``."""
    out = io.BytesIO()
    if fmt == "png":
        img.save(out, format="PNG", compress_level=6)
    elif fmt in ("jpg", "jpeg"):
        img.save(out, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    else:
        raise ValueError(f"unknown image format {fmt!r} (png or jpg)")
    return out.getvalue()


def decode_to_array(data: bytes, channels: int, image_size: Optional[int]) -> np.ndarray:
    """uint8 array [H, W, C] of encoded image bytes; raises ValueError on a corrupt image or a wrong size."""
    try:
        img = load_image(data, channels)
    except Exception as err:  # PIL raises many types on corrupt data
        raise ValueError(f"undecodable image ({type(err).__name__}: {err})") from None
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if image_size is not None and arr.shape[:2] != (image_size, image_size):
        raise ValueError(f"image is {arr.shape[1]}x{arr.shape[0]}, the manifest says {image_size}")
    return arr
