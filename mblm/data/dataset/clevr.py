"""CLEVR (https://cs.stanford.edu/people/jcjohns/clevr/): questions about rendered scenes.

The dataset directory has the published layout (``CLEVR_v1.0``; scenes and .txt files are not
read)::

    <data_dir>/
        images/{train,val,test}/CLEVR_<split>_<6 digits>.png
        questions/CLEVR_{train,val,test}_questions.json   ({"info": ..., "questions": [...]})

A sample is one question as bytes: ``question ‖ image ‖ question ‖ answer``, each part wrapped in
optional start/end-of-modality tokens, right-padded to ``seq_len``, with a loss mask that weights
the four parts by ``qiqa_loss_mask``. The public test split has no answers, so it cannot be used
for testing.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypedDict, overload

import torch
import torch.nn.functional as F  # noqa: N812
from pydantic import BaseModel, ConfigDict, Field, field_validator
from typing_extensions import Unpack

from mblm.data.dataset._files import DatasetFileError, require_dir
from mblm.data.datasets import DistributedDataset, DistributedDatasetConfig
from mblm.data.types import BatchWithLossMask, ModelMode
from mblm.data.utils import (
    Bytes,
    ColorSpace,
    ImagePipeline,
    Tokenizer,
    TokenizerOptions,
    shift_remap_tensor,
    target_loss_mask,
)

if TYPE_CHECKING:
    from mblm.train.mblm import TrainEntryConfig

CLEVR_LAYOUT = (
    "Expected the published CLEVR v1.0 layout: <data_dir>/questions/CLEVR_<split>_questions.json "
    "and <data_dir>/images/<split>/*.png for split train, val or test."
)

_SPLITS = {ModelMode.TRAIN: "train", ModelMode.VALID: "val", ModelMode.TEST: "test"}


class ClevrFunction(TypedDict):
    function: str
    inputs: list[int]
    value_inputs: list[str]


class ClevrQuestion(TypedDict):
    question: str
    answer: str
    image_filename: str
    question_family_index: int
    program: list[ClevrFunction]


class ClevrModelGeneration(BaseModel):
    """One record of a generation experiment on CLEVR."""

    id_model: str
    sample_idx: int
    question: str
    question_type: str
    answer_gen: list[int]
    answer_truth: list[int]
    ce: float
    timestamp: str


class ClevrOptionalArgs(BaseModel):
    """``io.dataset_args`` of a CLEVR training config."""

    model_config = ConfigDict(extra="forbid")

    target_mode: Literal["qiqa", "a"]
    qiqa_loss_mask: tuple[float, float, float, float]
    answer_categorical: bool = False
    resize_to_h: int | None = None
    resize_to_w: int | None = None
    crop_h_perc: float | None = None
    crop_w_perc: float | None = None
    downsample_channels: int | None = None
    shift_channels_start: int | None = None
    eom_token_id: int | None = None
    som_text_token_id: int | None = None
    som_image_token_id: int | None = None
    enable_jpeg_stream_with_quality: int | None = Field(
        default=None,
        description="None: the image is its flattened (C, H, W) pixels. An integer 1..95: the "
        "processed image is JPEG-encoded with this quality and its byte stream is used (0 "
        "behaves like None).",
    )
    jpeg_in_rgb_color_space: bool = Field(
        default=True,
        description="Encode the JPEG in RGB instead of YCbCr (only with a JPEG quality).",
    )

    @field_validator("enable_jpeg_stream_with_quality")
    @classmethod
    def check_jpeg_quality(cls, quality: int | None) -> int | None:
        if quality is not None and not 0 <= quality <= 95:
            raise ValueError(f"JPEG quality must be between 0 and 95, got {quality}")
        return quality


class Clevr(DistributedDataset[BatchWithLossMask]):
    """Non-sequential dataset over the questions of one CLEVR split (see the module docstring).
    ``self.entries`` holds the raw questions, ``self.images_root`` the split's image folder."""

    ANSWER_CLASS_MAP: dict[str, str] = {
        **{str(i): str(i) for i in range(10)},
        "10": "A",
        "blue": "B",
        "brown": "C",
        "cube": "D",
        "cyan": "E",
        "cylinder": "F",
        "gray": "G",
        "green": "H",
        "large": "I",
        "metal": "J",
        "no": "K",
        "purple": "L",
        "red": "M",
        "rubber": "N",
        "small": "O",
        "sphere": "P",
        "yellow": "Q",
        "yes": "R",
    }

    # the function of a question's last program step -> its question family
    QUESTION_TYPES: dict[str, str] = {
        "exist": "exists",
        "count": "count",
        "equal_integer": "compare_integer",
        "less_than": "compare_integer",
        "greater_than": "compare_integer",
        "query_color": "query_attribute",
        "query_material": "query_attribute",
        "query_size": "query_attribute",
        "query_shape": "query_attribute",
        "equal_size": "compare_attribute",
        "equal_material": "compare_attribute",
        "equal_shape": "compare_attribute",
        "equal_color": "compare_attribute",
    }

    IMAGE_SHAPE_C_W_H = 3, 480, 320
    MAX_QUESTION_LEN_BYTES = 205
    MAX_ANSWER_LEN_BYTESN = 8
    NUM_ITEMS_TRAIN = 699_989
    NUM_ITEMS_VALID = 149_991

    # the PNGs are RGBA; the alpha channel is dropped
    image_color_space = ColorSpace.RGB

    def __init__(
        self,
        data_dir: str | Path,
        mode: ModelMode,
        pad_token_id: int,
        optional_args: ClevrOptionalArgs,
        **config: Unpack[DistributedDatasetConfig],
    ):
        root = require_dir(Path(data_dir), "Clevr", CLEVR_LAYOUT)
        split = _SPLITS[mode]
        self.mode = mode
        self.args = optional_args
        self.tokenize = Tokenizer(
            TokenizerOptions(
                pad_token_id=pad_token_id,
                eom_token_id=optional_args.eom_token_id,
                som_text_token_id=optional_args.som_text_token_id,
                som_image_token_id=optional_args.som_image_token_id,
            )
        ).pipeline
        self.entries: list[ClevrQuestion] = _read_questions(
            root / "questions" / f"CLEVR_{split}_questions.json"
        )
        self.images_root = require_dir(root / "images" / split, "Clevr", CLEVR_LAYOUT)
        super().__init__(data_size=len(self.entries), is_sequential=False, **config)

    @staticmethod
    def from_train_entry_config(
        config: TrainEntryConfig,
        mode: ModelMode,
        worker_id: int,
        num_workers: int,
    ) -> DistributedDataset[BatchWithLossMask]:
        return Clevr(
            data_dir=config.io.dataset_dir,
            mode=mode,
            pad_token_id=config.params.pad_token_id,
            optional_args=ClevrOptionalArgs.model_validate(config.io.dataset_args or {}),
            seq_len=config.params.input_seq_len,
            worker_id=worker_id,
            num_workers=num_workers,
        )

    @staticmethod
    def supports_test_mode() -> bool:
        return False

    def _open_image(self, file_name: str) -> ImagePipeline:
        path = self.images_root / file_name
        try:
            return ImagePipeline(path, self.image_color_space)
        except FileNotFoundError as err:
            raise DatasetFileError(f"Clevr: image {path} does not exist. {CLEVR_LAYOUT}") from err
        except OSError as err:
            raise DatasetFileError(f"Clevr: cannot read image {path}: {err}") from err

    def process_and_flatten_img(self, image: ImagePipeline) -> torch.Tensor:
        """Crop, resize, optional channel binning (and value remapping), then either the JPEG
        byte stream or the flattened (C, H, W) pixels, as a 1-D uint8 tensor."""
        args = self.args
        if args.crop_h_perc and args.crop_w_perc:
            image.crop((args.crop_h_perc, args.crop_w_perc))
        if args.resize_to_w and args.resize_to_h:
            image.resize((args.resize_to_w, args.resize_to_h))
        if args.downsample_channels:
            image.downsample_channels(args.downsample_channels)
            if args.shift_channels_start:
                shifted, _, _ = shift_remap_tensor(
                    image.to_tensor(), range_start=args.shift_channels_start
                )
                image = ImagePipeline(shifted, self.image_color_space)
        if args.enable_jpeg_stream_with_quality:
            stream = image.to_jpeg_buffer(
                args.enable_jpeg_stream_with_quality, args.jpeg_in_rgb_color_space
            )
            return stream.to_tensor()
        return image.to_tensor().flatten()

    def get_sample_raw(self, from_idx: int) -> ClevrQuestion:
        """The raw question record at ``from_idx``."""
        if self.mode == ModelMode.TEST:
            raise ValueError("Clevr dataset does not support testing!")
        return self.entries[from_idx]

    def iter_images(
        self, shuffle: bool = False, max_items: int | None = None
    ) -> Generator[torch.Tensor, None, None]:
        """Every image of the split once, unprocessed, as a (C, H, W) tensor."""
        names = sorted(os.listdir(self.images_root))
        if shuffle:
            random.shuffle(names)
        for name in names[:max_items]:
            yield self._open_image(name).to_tensor()

    @overload
    def iter(
        self, *, shuffle: bool = ..., max_items: int | None = ..., raw: Literal[True]
    ) -> Generator[tuple[int, ClevrQuestion], None, None]: ...
    @overload
    def iter(
        self, shuffle: bool = ..., max_items: int | None = ..., raw: Literal[False] = ...
    ) -> Generator[tuple[int, tuple[str, str, ImagePipeline]], None, None]: ...
    def iter(
        self, shuffle: bool = False, max_items: int | None = None, raw: bool = False
    ) -> Generator[tuple[int, tuple[str, str, ImagePipeline] | ClevrQuestion], None, None]:
        """``(index, raw record)`` or ``(index, (question, answer, image))`` of every question,
        unprocessed."""
        order = list(range(len(self.entries)))
        if shuffle:
            random.shuffle(order)
        for i in order[:max_items]:
            record = self.get_sample_raw(i)
            if raw:
                yield i, record
            else:
                image = self._open_image(record["image_filename"])
                yield i, (record["question"], record["answer"], image)

    def get_sample_with_parts(
        self, from_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
        """``(q_i_q_a, loss_mask, (question, image, answer, padding length))``: the padded
        sequence, its loss mask (float weights, 0 on padding) and the tokenized parts."""
        record = self.get_sample_raw(from_idx)
        answer_str = record["answer"]
        if self.args.answer_categorical:
            answer_str = self.ANSWER_CLASS_MAP[answer_str]

        image_bytes = self.process_and_flatten_img(self._open_image(record["image_filename"]))
        question = (
            self.tokenize(Bytes.str_to_tensor(record["question"]))
            .with_som_text()
            .with_eom()
            .to_long_tensor()
        )
        image = self.tokenize(image_bytes).with_som_image().with_eom().to_long_tensor()
        answer = (
            self.tokenize(Bytes.str_to_tensor(answer_str))
            .with_som_text()
            .with_eom()
            .to_long_tensor()
        )

        parts = [question, image, question, answer]
        sequence = torch.cat(parts)
        loss_mask = target_loss_mask(zip(parts, self.args.qiqa_loss_mask, strict=True))
        unpadded = sequence.numel()
        if unpadded > self.seq_len:
            raise ValueError(
                f"Clevr sample {from_idx} has {unpadded} tokens, more than input_seq_len "
                f"{self.seq_len} (shrink the image with resize_to_w/h or JPEG, or raise "
                "input_seq_len)"
            )
        sequence = self.tokenize(sequence).pad_right_to(self.seq_len).to_long_tensor()
        loss_mask = F.pad(loss_mask, (0, self.seq_len - unpadded), value=0.0)
        return sequence, loss_mask, (question, image, answer, self.seq_len - unpadded)

    def get_sample(self, from_idx: int) -> BatchWithLossMask:
        sequence, loss_mask, _ = self.get_sample_with_parts(from_idx)
        return sequence, loss_mask


def _read_questions(path: Path) -> list[ClevrQuestion]:
    if not path.is_file():
        raise DatasetFileError(f"Clevr: question file {path} does not exist. {CLEVR_LAYOUT}")
    try:
        with path.open(encoding="utf8") as f:
            content = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"Clevr: {path} is not valid JSON: {err}") from err
    except OSError as err:
        raise DatasetFileError(f"Clevr: cannot read {path}: {err}") from err
    if not isinstance(content, dict) or not isinstance(content.get("questions"), list):
        raise ValueError(f'Clevr: {path} has no "questions" list. {CLEVR_LAYOUT}')
    if not content["questions"]:
        raise ValueError(f"Clevr: {path} holds no questions")
    return content["questions"]
