"""An auto-annotation function for ``action: auto_annotate`` that needs no model download: OpenCV's
Haar cascade face detector, whose cascade files ship inside ``opencv-python-headless`` (below 5).

Install the extra, put this directory on the worker's ``PYTHONPATH`` and name the module in a rule::

    pip install 'cvat-hooks[faces]'
    PYTHONPATH=examples/functions cvat-hooks worker

    - action: auto_annotate
      function: haar_faces
      function_parameters: {scale_factor: 1.1, min_neighbors: 5, min_size: 24}

It boxes faces with the label ``face`` (rectangles); the task needs a label of that name (or use
``allow_unmatched_labels``). A cascade gives no confidence, so ``conf_threshold`` is not used.
It follows cvat-sdk's detection-function interface (``spec``, ``detect``), so ``cvat-cli task
auto-annotate --function-module haar_faces`` runs it too.
"""

from __future__ import annotations

from typing import Any

import cv2
import cvat_sdk.auto_annotation as cvataa
import numpy as np
import PIL.Image

LABEL = "face"
CASCADE = "haarcascade_frontalface_default.xml"
"""The frontal face cascade in ``cv2.data.haarcascades``."""

spec = cvataa.DetectionFunctionSpec(labels=[cvataa.label_spec(LABEL, 0, type="rectangle")])


class HaarFaces:
    """The detector with its ``detectMultiScale`` settings; the cascade is loaded once."""

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5, min_size: int = 24) -> None:
        if scale_factor <= 1.0:
            raise ValueError("scale_factor must be above 1")
        self.spec = spec
        self.scale_factor = float(scale_factor)
        self.min_neighbors = int(min_neighbors)
        self.min_size = int(min_size)
        self.cascade = cv2.CascadeClassifier(cv2.data.haarcascades + CASCADE)
        if self.cascade.empty():
            raise RuntimeError(f"OpenCV could not load {CASCADE} from {cv2.data.haarcascades}")

    def detect(self, context: Any, image: PIL.Image.Image) -> list[Any]:
        gray = cv2.equalizeHist(np.asarray(image.convert("L")))
        found = self.cascade.detectMultiScale(gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
                                              minSize=(self.min_size, self.min_size))
        return [cvataa.rectangle(0, [float(x), float(y), float(x + w), float(y + h)]) for x, y, w, h in found]


def create(scale_factor: float = 1.1, min_neighbors: int = 5, min_size: int = 24) -> HaarFaces:
    """What ``function_parameters`` (or ``cvat-cli -p``) are passed to."""
    return HaarFaces(scale_factor, min_neighbors, min_size)
