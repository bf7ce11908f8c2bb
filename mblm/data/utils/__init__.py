"""Helpers to turn text, images and special tokens into byte tensors."""

from .bytes import Bytes, FileStream
from .image import BinMode, ColorSpace, ImagePipeline
from .misc import shift_remap_tensor, target_loss_mask
from .tokenizer import Tokenizer, TokenizerOptions

__all__ = [
    "Bytes",
    "FileStream",
    "ImagePipeline",
    "ColorSpace",
    "BinMode",
    "Tokenizer",
    "TokenizerOptions",
    "target_loss_mask",
    "shift_remap_tensor",
]
