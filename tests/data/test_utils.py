import numpy as np
import pytest
import torch

from mblm.data.utils import (
    Bytes,
    ColorSpace,
    ImagePipeline,
    Tokenizer,
    TokenizerOptions,
    shift_remap_tensor,
    target_loss_mask,
)


def test_bytes_roundtrips():
    t = Bytes.str_to_tensor("héllo")
    assert t.dtype == torch.uint8 and Bytes.tensor_to_str(t) == "héllo"
    assert Bytes.bytes_to_tensor(b"ab").tolist() == [97, 98]
    assert Bytes.bytes_to_tensor(b"").numel() == 0
    assert Bytes.byte_list_to_str_safe([0xFF], default="?") == "?"
    assert Bytes.byte_list_to_str([104, 105]) == "hi"


def test_tokenizer_pipeline():
    pipe = Tokenizer(
        TokenizerOptions(
            pad_token_id=10, eom_token_id=11, som_text_token_id=13, som_image_token_id=None
        )
    ).pipeline
    out = pipe(torch.arange(3)).with_eom().with_som_text().with_som_image().pad_right_to(8)
    assert out.to_long_tensor().tolist() == [13, 0, 1, 2, 11, 10, 10, 10]
    with pytest.raises(ValueError, match="larger than desired padded size 2"):
        pipe(torch.arange(3)).pad_right_to(2)
    assert pipe(torch.arange(3)).pad_right_to(2, strict=False).to_long_tensor().tolist() == [0, 1]
    with pytest.raises(ValueError, match="Can only process 1D tensors, input is 2D"):
        pipe(torch.zeros(2, 2))


def test_misc():
    mask = target_loss_mask([(torch.zeros(2), 0.5), (torch.zeros(3), 1.0)])
    assert mask.tolist() == [0.5, 0.5, 1, 1, 1]
    t = torch.tensor([[7, 3], [3, 9]], dtype=torch.uint8)
    remapped, values, inverse = shift_remap_tensor(t, 20)
    assert remapped.tolist() == [[21, 20], [20, 22]] and remapped.dtype == torch.uint8
    assert torch.equal(values[inverse].reshape(t.shape), t)


def test_image_pipeline():
    rgb = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3
    pipe = ImagePipeline(rgb, ColorSpace.RGB)
    assert pipe.to_tensor().shape == (3, 4, 6)
    assert ImagePipeline(pipe.to_tensor(), ColorSpace.RGB).to_numpy().tolist() == rgb.tolist()
    assert pipe.crop((0.25, 0.2)).to_numpy().shape == (2, 4, 3)
    binned = ImagePipeline(rgb, ColorSpace.RGB).downsample_channels(2, "lower").to_numpy()
    assert set(np.unique(binned).tolist()) <= {0, 127}
    upper = ImagePipeline(rgb, ColorSpace.RGB).downsample_channels(2, "upper").to_numpy()
    assert set(np.unique(upper).tolist()) <= {127, 255}
    with pytest.raises(ValueError, match="Min number of bins must be positive"):
        ImagePipeline(rgb, ColorSpace.RGB).downsample_channels(0)
    with pytest.raises(ValueError, match="Can only process uint8 images"):
        ImagePipeline(rgb.astype(np.float32), ColorSpace.RGB)
    with pytest.raises(ValueError, match="Invalid argument for quality: 96"):
        ImagePipeline(rgb, ColorSpace.RGB).to_jpeg_buffer(96)
    assert ImagePipeline(rgb, ColorSpace.RGB).grayscale().to_numpy().shape == (4, 6)
    assert ImagePipeline(rgb, ColorSpace.RGB).resize((3, 2)).to_tensor().shape == (3, 2, 3)
