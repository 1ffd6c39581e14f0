"""A detection function that draws one ``car`` box per frame from the image's own size.

Deterministic and model-free, so a test can compute what CVAT must hold afterwards: on a W x H
frame the box is ``[1, 2, W - 1, H - 1]`` (it depends on the image, so it proves the frame was
downloaded and decoded). ``create(margin=...)`` moves the box's far corner in by ``margin`` pixels,
for the tests of ``function_parameters`` (1 by default).
"""

from __future__ import annotations

from typing import Any

import cvat_sdk.auto_annotation as cvataa  # type: ignore[import-untyped]
import PIL.Image

LABEL = "car"

spec = cvataa.DetectionFunctionSpec(labels=[cvataa.label_spec(LABEL, 0, type="rectangle")])


def box(width: int, height: int, margin: float = 1.0) -> list[float]:
    """The box drawn on a ``width`` x ``height`` frame."""
    return [1.0, 2.0, float(width) - margin, float(height) - margin]


class CornerBoxes:
    """The function with a chosen margin."""

    def __init__(self, margin: float) -> None:
        self.margin = margin
        self.spec = spec

    def detect(self, context: Any, image: PIL.Image.Image) -> list[Any]:
        return [cvataa.rectangle(0, box(image.width, image.height, self.margin))]


def create(margin: float = 1.0) -> CornerBoxes:
    """What ``function_parameters`` are passed to."""
    return CornerBoxes(float(margin))


FIXED = CornerBoxes(3.0)
"""A ready function object (``tests.functions.corner_boxes:FIXED``): it has no ``create``."""
