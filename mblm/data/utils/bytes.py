"""Conversions between strings, bytes, byte lists and uint8 tensors."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image
from PIL.Image import Image as PILImage

DEFAULT_ENCODING: str = "utf8"


class Bytes:
    """Static conversion helpers. Tensors of bytes are uint8 unless stated otherwise."""

    @staticmethod
    def tensor_to_str(t: torch.Tensor, encoding: str = DEFAULT_ENCODING) -> str:
        return bytes(t.tolist()).decode(encoding)

    @staticmethod
    def tensor_to_image(t: torch.Tensor) -> PILImage:
        """A (C, H, W) uint8 tensor as a Pillow image."""
        return Image.fromarray(t.permute(1, 2, 0).numpy())

    @staticmethod
    def str_to_tensor(s: str, encoding: str = DEFAULT_ENCODING) -> torch.Tensor:
        # torch.frombuffer wants a writable buffer; it shares the bytearray's memory (no copy)
        return torch.frombuffer(Bytes.str_to_bytearray(s, encoding), dtype=torch.uint8)

    @staticmethod
    def str_to_bytearray(s: str, encoding: str = DEFAULT_ENCODING) -> bytearray:
        return bytearray(s.encode(encoding))

    @staticmethod
    def str_to_bytes(s: str, encoding: str = DEFAULT_ENCODING) -> bytes:
        return s.encode(encoding)

    @staticmethod
    def bytes_to_str(b: bytes | bytearray, encoding: str = DEFAULT_ENCODING) -> str:
        return b.decode(encoding)

    @staticmethod
    def byte_list_to_str(b: list[int], encoding: str = DEFAULT_ENCODING) -> str:
        return bytes(b).decode(encoding)

    @staticmethod
    def byte_list_to_str_safe(b: list[int], default: str, encoding: str = DEFAULT_ENCODING) -> str:
        """Like ``byte_list_to_str`` but returns ``default`` when the bytes do not decode (or
        are not bytes at all)."""
        try:
            return bytes(b).decode(encoding)
        except Exception:
            return default

    @staticmethod
    def bytes_to_tensor(b: bytes | bytearray) -> torch.Tensor:
        if isinstance(b, bytearray):
            return torch.frombuffer(b, dtype=torch.uint8)
        if len(b) == 0:
            return torch.empty(0, dtype=torch.uint8)
        # immutable bytes: copy into a tensor of its own
        return torch.frombuffer(bytearray(b), dtype=torch.uint8)


class FileStream:
    """An in-memory file (e.g. an encoded JPEG) viewed as numpy, torch, bytes or an image."""

    def __init__(self, buffer: BytesIO):
        self._buffer = buffer

    def to_numpy(self) -> NDArray[np.uint8]:
        return np.frombuffer(self._buffer.getvalue(), dtype=np.uint8)

    def to_tensor(self) -> torch.Tensor:
        return torch.frombuffer(bytearray(self._buffer.getvalue()), dtype=torch.uint8)

    def to_buffer(self) -> bytes:
        return self._buffer.getvalue()

    def to_image(self) -> PILImage:
        """The buffer opened as a Pillow image (convert the color space yourself)."""
        return Image.open(self._buffer)
