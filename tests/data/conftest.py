"""Tiny fixtures in the published layouts of PG19 and CLEVR."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def make_pg19(root: Path, books: dict[str, dict[str, bytes]]) -> Path:
    """``books``: split -> {file name: content}; also writes metadata.csv like the release."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "metadata.csv").write_text("_id,short_book_title,publication_date,url\n")
    for split, files in books.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            (root / split / name).write_bytes(content)
    return root


@pytest.fixture
def pg19_dir(tmp_path: Path) -> Path:
    return make_pg19(
        tmp_path / "pg19",
        {
            # listed out of order on purpose: reading order is by name
            "train": {"200.txt": b"B" * 300, "100.txt": b"A" * 300, "300.txt": b"C" * 424},
            "validation": {"400.txt": bytes(range(256))},
            "test": {"500.txt": b"the end." * 40},
        },
    )


def make_clevr(root: Path, num_images: int = 2, size: tuple[int, int] = (12, 8)) -> Path:
    """CLEVR v1.0 layout with RGBA PNGs and question files for train/val/test."""
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        questions = []
        for i in range(num_images):
            name = f"CLEVR_{split}_{i:06d}.png"
            pixels = rng.integers(0, 256, size=(size[1], size[0], 4), dtype=np.uint8)
            Image.fromarray(pixels, "RGBA").save(root / "images" / split / name)
            for q, a in (("Is there a cube?", "yes"), ("How many spheres are there?", "3")):
                entry = {
                    "question_index": len(questions),
                    "image_index": i,
                    "image_filename": name,
                    "question": q,
                    "split": split,
                }
                if split != "test":
                    entry.update(
                        answer=a,
                        question_family_index=0,
                        program=[{"function": "scene", "inputs": [], "value_inputs": []}],
                    )
                questions.append(entry)
        (root / "questions").mkdir(parents=True, exist_ok=True)
        (root / "questions" / f"CLEVR_{split}_questions.json").write_text(
            json.dumps({"info": {"split": split, "version": "1.0"}, "questions": questions})
        )
    (root / "scenes").mkdir(exist_ok=True)
    return root


@pytest.fixture
def clevr_dir(tmp_path: Path) -> Path:
    return make_clevr(tmp_path / "CLEVR_v1.0")
