"""A small chainable image pipeline (Pillow underneath): crop, resize, channel binning, JPEG."""

from __future__ import annotations

import logging
from enum import Enum
from io import BytesIO
from pathlib import Path
from typing import Literal, TypeAlias

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image
from PIL.Image import Image as PILImage

from mblm.data.utils.bytes import FileStream

# Pillow logs plugin discovery at DEBUG level, which floods any root logger set to DEBUG.
logging.getLogger("PIL").setLevel(logging.WARNING)


class ColorSpace(str, Enum):
    """Pillow image modes this pipeline supports."""

    RGB = "RGB"
    GRAY = "L"


BinMode = Literal["lower", "upper", "mean"]
# weights of (lower edge, upper edge) giving the value of a bin
_BIN_EDGE_WEIGHTS: dict[str, tuple[float, float]] = {
    "lower": (1.0, 0.0),
    "upper": (0.0, 1.0),
    "mean": (0.5, 0.5),
}

ImagePipelineInput: TypeAlias = str | Path | PILImage | NDArray[np.uint8] | torch.Tensor


class ImagePipeline:
    """Loads an image (file path, Pillow image, numpy (H, W, C) / (H, W) array or torch
    (C, H, W) / (H, W) tensor, uint8) into ``color_space`` and edits it in place; every edit
    returns self."""

    MAX_NUM_CHANNELS = 256  # values per channel of an 8-bit image

    def __init__(self, image: ImagePipelineInput, color_space: ColorSpace):
        self._cs = color_space
        if isinstance(image, (str, Path)):
            image = Image.open(image)
        elif isinstance(image, (np.ndarray, torch.Tensor)):
            image = self._from_array(image)
        self._image: PILImage = image.convert(color_space.value)

    def _from_array(self, image: NDArray[np.uint8] | torch.Tensor) -> PILImage:
        if isinstance(image, torch.Tensor):
            if self._cs == ColorSpace.RGB:
                image = image.permute(1, 2, 0)
            image = image.numpy()
        if image.dtype != np.uint8:
            raise ValueError(f"Can only process uint8 images, received {image.dtype} tensor")
        return Image.fromarray(image)

    def grayscale(self) -> ImagePipeline:
        if self._cs != ColorSpace.GRAY:
            self._image = self._image.convert(ColorSpace.GRAY.value)
        return self

    def resize(self, new_w_h: tuple[int, int]) -> ImagePipeline:
        """Resizes to (width, height) pixels (Lanczos)."""
        self._image = self._image.resize(new_w_h, resample=Image.Resampling.LANCZOS)
        return self

    def crop(self, factor_perc_h_w: tuple[float, float]) -> ImagePipeline:
        """Cuts ``factor * size`` pixels (at most half the size) from both sides of each axis;
        factors given as (height, width) fractions."""
        width, height = self._image.size
        factor_h, factor_w = factor_perc_h_w
        cut_w = int(min(width * factor_w, width / 2))
        cut_h = int(min(height * factor_h, height / 2))
        self._image = self._image.crop((cut_w, cut_h, width - cut_w, height - cut_h))
        return self

    def downsample_channels(
        self, max_num_channel_values: int, bin_mode: BinMode = "mean"
    ) -> ImagePipeline:
        """Quantises every channel value into ``max_num_channel_values`` equal-width bins over
        [0, 255]; a value becomes its bin's lower edge, upper edge or midpoint (``bin_mode``).
        No-op when the bins would not reduce the 256 values."""
        if max_num_channel_values + 1 >= self.MAX_NUM_CHANNELS:
            return self
        if max_num_channel_values < 1:
            raise ValueError(
                f"Min number of bins must be positive, received {max_num_channel_values}"
            )
        edges = np.linspace(0, self.MAX_NUM_CHANNELS - 1, max_num_channel_values + 1)
        w_lower, w_upper = _BIN_EDGE_WEIGHTS[bin_mode]
        bin_values = w_lower * edges[:-1] + w_upper * edges[1:]
        bin_index = np.digitize(self.to_numpy(), edges[:-1]) - 1
        self._image = Image.fromarray(bin_values[bin_index].astype(np.uint8))
        return self

    def to_numpy(self) -> NDArray[np.uint8]:
        """(H, W, C), or (H, W) for grayscale."""
        return np.array(self._image, dtype=np.uint8)

    def to_tensor(self) -> torch.Tensor:
        """(C, H, W), or (H, W) for grayscale."""
        array = torch.from_numpy(self.to_numpy())
        return array.permute(2, 0, 1) if self._cs == ColorSpace.RGB else array

    def to_image(self) -> PILImage:
        return self._image

    def to_jpeg_buffer(self, quality: int = 95, keep_rgb: bool = False) -> FileStream:
        """JPEG-encodes the image (quality 0..95; ``keep_rgb`` stores RGB instead of YCbCr)."""
        if not 0 <= quality <= 95:
            raise ValueError(f"Invalid argument for quality: {quality}")
        buffer = BytesIO()
        self._image.save(buffer, "JPEG", quality=quality, keep_rgb=keep_rgb)
        return FileStream(buffer)
