import pytest
import torch
from pydantic import ValidationError

from mblm.data.dataset._files import DatasetFileError
from mblm.data.dataset.clevr import Clevr, ClevrOptionalArgs
from mblm.data.types import ModelMode


def args(**kw):
    return ClevrOptionalArgs(
        target_mode="qiqa",
        qiqa_loss_mask=(0.0, 0.5, 0.0, 1.0),
        eom_token_id=257,
        som_text_token_id=258,
        som_image_token_id=259,
        **kw,
    )


def clevr(root, mode=ModelMode.TRAIN, seq_len=400, **kw):
    return Clevr(
        root,
        mode,
        pad_token_id=256,
        optional_args=args(**kw),
        seq_len=seq_len,
        worker_id=0,
        num_workers=1,
    )


def test_sample_layout_pixels(clevr_dir):
    ds = clevr(clevr_dir)
    assert len(ds) == 4
    seq, mask, (q, img, a, pad) = ds.get_sample_with_parts(1)
    question = b"How many spheres are there?"
    assert q.tolist() == [258, *question, 257]
    assert img.numel() == 3 * 8 * 12 + 2 and img[0] == 259 and img[-1] == 257  # RGB, alpha dropped
    assert a.tolist() == [258, ord("3"), 257]
    n = 2 * q.numel() + img.numel() + a.numel()
    assert seq.shape == mask.shape == (400,) and pad == 400 - n
    assert torch.equal(seq[:n], torch.cat([q, img, q, a])) and seq[n:].eq(256).all()
    # fractional weights survive (the original cast them to long, dropping 0.5 to 0)
    assert mask.dtype == torch.float32
    assert mask[q.numel() : q.numel() + img.numel()].eq(0.5).all()
    assert mask[n - a.numel() : n].eq(1).all() and mask[n:].eq(0).all()
    assert torch.equal(ds.get_sample(1)[0], seq)


def test_processing_options(clevr_dir):
    ds = clevr(
        clevr_dir,
        resize_to_w=6,
        resize_to_h=4,
        crop_h_perc=0.25,
        crop_w_perc=0.25,
        downsample_channels=4,
        shift_channels_start=10,
        answer_categorical=True,
    )
    _, _, (_, img, a, _) = ds.get_sample_with_parts(0)
    pixels = img[1:-1]
    assert pixels.numel() == 3 * 4 * 6 and pixels.ge(10).all() and pixels.lt(14).all()
    assert a.tolist() == [258, ord("R"), 257]  # "yes" -> "R"
    jpeg = clevr(clevr_dir, seq_len=2000, enable_jpeg_stream_with_quality=50)
    _, _, (_, img, _, _) = jpeg.get_sample_with_parts(0)
    assert img[1:3].tolist() == [0xFF, 0xD8]  # JPEG start-of-image marker


def test_validation_split_and_no_test(clevr_dir):
    assert (
        clevr(clevr_dir, ModelMode.VALID)
        .get_sample_raw(0)["image_filename"]
        .startswith("CLEVR_val")
    )
    with pytest.raises(ValueError, match="does not support testing"):
        clevr(clevr_dir, ModelMode.TEST).get_sample(0)
    assert not Clevr.supports_test_mode()
    assert sum(1 for _ in clevr(clevr_dir).iter_images()) == 2
    assert next(clevr(clevr_dir).iter(raw=True))[1]["answer"] == "yes"


def test_errors(clevr_dir, tmp_path):
    with pytest.raises(DatasetFileError, match="does not exist.*CLEVR v1.0 layout"):
        clevr(tmp_path / "none")
    (clevr_dir / "questions" / "CLEVR_val_questions.json").unlink()
    with pytest.raises(DatasetFileError, match="CLEVR_val_questions.json does not exist"):
        clevr(clevr_dir, ModelMode.VALID)
    (clevr_dir / "questions" / "CLEVR_val_questions.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        clevr(clevr_dir, ModelMode.VALID)
    (clevr_dir / "questions" / "CLEVR_val_questions.json").write_text('{"info": {}}')
    with pytest.raises(ValueError, match='no "questions" list'):
        clevr(clevr_dir, ModelMode.VALID)
    (clevr_dir / "images" / "train" / "CLEVR_train_000000.png").unlink()
    with pytest.raises(DatasetFileError, match="CLEVR_train_000000.png does not exist"):
        clevr(clevr_dir).get_sample(0)
    with pytest.raises(ValueError, match="more than input_seq_len"):
        clevr(clevr_dir, seq_len=50).get_sample(2)
    with pytest.raises(ValidationError, match="JPEG quality"):
        args(enable_jpeg_stream_with_quality=96)
    with pytest.raises(ValidationError, match="extra"):
        args(unknown=1)
