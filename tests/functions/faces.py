"""A face drawn in grey levels (oval, brows, eyes, nose, mouth) that OpenCV's frontal-face Haar
cascade finds, so the shipped example function (examples/functions/haar_faces.py) is tested on a
face without a photograph in the repository; and that example, importable as
``tests.functions.faces`` by a worker whose working directory is the repository."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import PIL.Image

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "functions" / "haar_faces.py"
FACE_BOX = (60, 40, 180, 200)
"""Where the drawn face is (x1, y1, x2, y2) in the 240 x 240 image."""


def drawn_face() -> PIL.Image.Image:
    """A 240 x 240 RGB image of one drawn face on a light background."""
    import cv2
    import numpy as np

    img = np.full((240, 240), 200, np.uint8)
    cv2.ellipse(img, (120, 120), (60, 80), 0, 0, 360, 170, -1)
    cv2.rectangle(img, (80, 78), (110, 84), 60, -1)
    cv2.rectangle(img, (130, 78), (160, 84), 60, -1)
    cv2.ellipse(img, (95, 98), (12, 7), 0, 0, 360, 40, -1)
    cv2.ellipse(img, (145, 98), (12, 7), 0, 0, 360, 40, -1)
    cv2.rectangle(img, (115, 105), (125, 140), 150, -1)
    cv2.ellipse(img, (120, 160), (25, 8), 0, 0, 360, 70, -1)
    return PIL.Image.fromarray(cv2.GaussianBlur(img, (7, 7), 0)).convert("RGB")


def _example() -> Any:
    loaded = importlib.util.spec_from_file_location("haar_faces", EXAMPLE)
    assert loaded is not None and loaded.loader is not None
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


def create(**parameters: Any) -> Any:
    """The example's detector (``function_parameters`` as the example takes them)."""
    return _example().create(**parameters)
