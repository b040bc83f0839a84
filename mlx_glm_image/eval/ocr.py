"""The OCR engines that read the words back: rapidocr (PP-OCRv4's ONNX models, shipped in its wheel; any OS) and
Apple's Vision (through ocrmac; a Mac). Scores depend on the engine, so the report names it."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Callable

ENGINES = ("auto", "rapidocr", "vision")
INSTALL = {"rapidocr": "pip install rapidocr-onnxruntime (or the eval extra: pip install -e \".[eval]\")",
           "vision": "pip install ocrmac (on a Mac; the eval extra installs it there)"}


@dataclass(frozen=True)
class Engine:
    """An engine ready to read: ``read(image)`` returns the lines of text it finds in a PIL image."""

    name: str  # with its version, for the report
    read: Callable


def engine(choice: str = "auto") -> Engine:
    """The engine asked for ("auto": Vision on a Mac where ocrmac imports, else rapidocr); a ValueError says what
    to install when it is missing."""
    if choice == "auto":
        choice = "vision" if sys.platform == "darwin" and _importable("ocrmac") else "rapidocr"
    if choice not in INSTALL:
        raise ValueError(f"--ocr must be one of {', '.join(ENGINES)}, got {choice!r}")
    if not _importable({"rapidocr": "rapidocr_onnxruntime", "vision": "ocrmac"}[choice]):
        raise ValueError(f"the OCR engine {choice} is not installed: {INSTALL[choice]}")
    return _rapidocr() if choice == "rapidocr" else _vision()


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _rapidocr() -> Engine:
    from rapidocr_onnxruntime import RapidOCR

    reader = RapidOCR()

    def read(image) -> list[str]:
        found, _ = reader(image.convert("RGB"))  # a PIL image: rapidocr turns it to BGR itself
        return [text for _, text, _ in found or []]

    return Engine(f"rapidocr {metadata.version('rapidocr-onnxruntime')} (PP-OCRv4)", read)


def _vision() -> Engine:  # not testable off a Mac: kept to the one call
    from ocrmac import ocrmac

    def read(image) -> list[str]:
        return ocrmac.text_from_image(image.convert("RGB"), recognition_level="accurate",
                                      language_preference=["zh-Hans", "en-US"], detail=False)

    return Engine(f"Apple Vision (ocrmac {metadata.version('ocrmac')})", read)
