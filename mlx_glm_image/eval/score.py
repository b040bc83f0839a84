"""The scores, each defined here and nowhere else: text accuracy as CVTG-2K defines it, and closeness (PSNR, SSIM).

Text accuracy (CVTG-2K, TextCrafter arXiv:2503.23461; its evaluation script ``unified_metrics_eval.py``): the
expected words are the prompt's quoted text, lower-cased and split on white space; the words read are every line
the OCR engine read, lower-cased and split the same way (none read: one empty word). An expected word is correct
when it is one of the words read (exactly); word accuracy is the correct words over the expected words of the
whole set (a word the prompt quotes twice counts twice). Its similarity is 1 - Levenshtein(word, best) / (the
longer length + 1e-5), ``best`` being the word read that difflib.get_close_matches ranks first; NED is the mean
similarity over every expected word of the set (so it is a similarity: 1 is a perfect reading).

Chinese has no spaces: each CJK ideograph is a word of its own, as LongText-Bench scores Chinese per character
(X-Omni's textbench/summary_scores.py), and full-width punctuation separates words without being one. English
words are split exactly as CVTG-2K splits them.

Closeness compares an image with the reference setting's image of the same prompt and seed: PSNR over the RGB
values (peak 255; a setting's PSNR is that of its images' mean squared error), and SSIM (Wang et al. 2004) on
the luminance Y = 0.299 R + 0.587 G + 0.114 B with the paper's 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
K2 = 0.03, L = 255, averaged over the window positions that lie inside the image (scikit-image's
``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)``).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field

import numpy as np

CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs: the unified ones, extension A, compatibility
FULL_WIDTH_PUNCTUATION = "\u3000-\u303f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65"
_WORD = re.compile(f"[{CJK}]|[^\\s{CJK}{FULL_WIDTH_PUNCTUATION}]+")
LANGUAGES = ("en", "zh")


def words(text: str) -> list[str]:
    """The words of ``text`` as the scores count them: lower-cased, split on white space, each CJK ideograph one."""
    return _WORD.findall(text.lower())


def language(word: str) -> str:
    """"zh" for a CJK ideograph, "en" for any other word."""
    return "zh" if len(word) == 1 and re.match(f"[{CJK}]", word) else "en"


def expected_words(prompt: str) -> list[str]:
    """The words the image should show: those of the prompt's quoted strings, as the pipeline finds them."""
    from ..pipeline.glyphs import get_glyph_texts

    return [w for text in get_glyph_texts(prompt)[0] for w in words(text)]


def read_words(lines: list[str], expected: list[str]) -> list[str]:
    """The words of the lines an engine read. A word read that is exactly several expected words run together is
    split into them: the Chinese recognizer rapidocr ships often drops the space between Latin words
    ("OPENDAILY"); the split never changes a letter, so a misread word stays misread."""
    vocabulary = set(expected)
    return [part for line in lines for word in words(line) for part in _split(word, vocabulary)]


def _split(word: str, vocabulary: set[str]) -> list[str]:
    """``word`` as a run of vocabulary words (the fewest), else as it is."""
    best: list[list[str] | None] = [[]] + [None] * len(word)  # best[i]: word[:i] as vocabulary words
    for end in range(1, len(word) + 1):
        for start in range(end):
            piece = word[start:end]
            if best[start] is not None and piece in vocabulary and (
                    best[end] is None or len(best[start]) + 1 < len(best[end])):
                best[end] = best[start] + [piece]
    return best[-1] if best[-1] else [word]


def levenshtein(a: str, b: str) -> int:
    """Insertions, deletions and substitutions that make ``a`` into ``b``."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def similarity(word: str, read: list[str]) -> float:
    """CVTG-2K's per-word score: 1 - normalized edit distance to the word read that difflib ranks closest."""
    best = difflib.get_close_matches(word, read, n=1, cutoff=0)
    if not best:
        return 0.0
    return 1 - levenshtein(word, best[0]) / (max(len(word), len(best[0])) + 1e-5)


@dataclass
class TextScore:
    """Expected words, those read correctly and their similarities, summed over images (per language or all)."""

    words: int = 0
    correct: int = 0
    similarities: list[float] = field(default_factory=list)

    def add(self, other: "TextScore") -> "TextScore":
        return TextScore(self.words + other.words, self.correct + other.correct,
                         self.similarities + other.similarities)

    @property
    def word_accuracy(self) -> float | None:
        return self.correct / self.words if self.words else None

    @property
    def ned(self) -> float | None:
        return float(np.mean(self.similarities)) if self.similarities else None


def text_score(expected: list[str], read: list[str]) -> dict[str, TextScore]:
    """One image's text score by language ("en", "zh") and in all ("all"), CVTG-2K's way."""
    read = read or [""]
    scores = {key: TextScore() for key in (*LANGUAGES, "all")}
    for word in expected:
        one = TextScore(1, int(word in read), [similarity(word, read)])
        for key in (language(word), "all"):
            scores[key] = scores[key].add(one)
    return scores


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error of two uint8 images, over every pixel and channel."""
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def psnr_from_mse(error: float) -> float:
    """Peak signal-to-noise ratio in dB for a mean squared error of 0-255 values (inf for 0)."""
    return math.inf if error == 0 else float(10 * np.log10(255.0**2 / error))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB (inf when equal)."""
    return psnr_from_mse(mse(a, b))


def luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an (H, W, 3) image, as float64 on the 0-255 scale."""
    return rgb[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> float:
    """SSIM (Wang et al. 2004) of two (H, W, 3) uint8 images, on their luminance (see the module's docstring)."""
    x, y = luminance(a), luminance(b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    blur = _gaussian_blur(sigma)
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    r = int(3.5 * sigma + 0.5)  # the window's radius (scipy's gaussian_filter with truncate=3.5)
    if s.shape[0] <= 2 * r or s.shape[1] <= 2 * r:
        raise ValueError(f"SSIM needs images larger than {2 * r + 1}x{2 * r + 1} pixels, got {a.shape[1]}x{a.shape[0]}")
    return float(s[r:-r, r:-r].mean())


def _gaussian_blur(sigma: float):
    """A separable Gaussian filter as scipy.ndimage.gaussian_filter applies it (edges mirrored, "reflect")."""
    r = int(3.5 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    taps /= taps.sum()

    def along(image: np.ndarray, axis: int) -> np.ndarray:
        padded = np.pad(image, [(r, r) if a == axis else (0, 0) for a in range(2)], mode="symmetric")
        n = image.shape[axis]
        return sum(w * np.take(padded, np.arange(k, k + n), axis=axis) for k, w in enumerate(taps))

    return lambda image: along(along(image, 0), 1)
