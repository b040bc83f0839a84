"""The contact sheet: one row per prompt, one column per setting, each image with the words OCR read under it
(green: an expected word, red: any other), so that a person can see what the scores count. PIL only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

CELL = 256  # pixels a side for each image
LINES = 6  # lines of words under an image, at most
FONTS = ("/System/Library/Fonts/Hiragino Sans GB.ttc", "/System/Library/Fonts/STHeiti Light.ttc",  # macOS
         "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",  # Debian's fonts-noto-cjk
         "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")  # no CJK; the last resort before PIL's own
GOOD, BAD, INK, PAPER, EDGE = (20, 120, 40), (190, 30, 30), (30, 30, 30), (255, 255, 255), (200, 200, 200)


@dataclass(frozen=True)
class Cell:
    image: Path  # opened when drawn: a sheet of many images holds one file open at a time
    read: list[str]  # the words read
    expected: frozenset  # the words that should be there


def font(size: int = 14):
    """A font that draws Chinese where one is installed, else PIL's own."""
    for path in FONTS:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    return ImageFont.load_default(size)


def wrap(draw: ImageDraw.ImageDraw, words: list[str], width: int, face) -> list[list[str]]:
    """``words`` in lines of at most ``width`` pixels (a longer word has a line of its own)."""
    lines, line = [], []
    for word in words:
        if line and draw.textlength(" ".join(line + [word]), font=face) > width:
            lines.append(line)
            line = []
        line.append(word)
    return lines + ([line] if line else [])


def contact_sheet(columns: list[str], rows: list[tuple[str, list[Cell]]]) -> Image.Image:
    """``columns``: the settings' labels; ``rows``: (the prompt's label, one cell per setting)."""
    face, pad = font(), 6
    line_h = int(face.size * 1.3) if hasattr(face, "size") else 16
    head = pad + 2 * line_h
    row_h = CELL + pad * 2 + LINES * line_h
    sheet = Image.new("RGB", ((len(columns) + 1) * (CELL + pad) + pad, head + len(rows) * row_h), PAPER)
    draw = ImageDraw.Draw(sheet)
    for c, label in enumerate(columns, 1):
        for k, line in enumerate(wrap(draw, label.split(), CELL, face)[:2]):
            draw.text((pad + c * (CELL + pad), pad + k * line_h), " ".join(line), font=face, fill=INK)
    for r, (label, cells) in enumerate(rows):
        top = head + r * row_h
        for k, line in enumerate(wrap(draw, label.split(), CELL, face)[:(row_h - pad) // line_h]):
            draw.text((pad, top + k * line_h), " ".join(line), font=face, fill=INK)
        for c, cell in enumerate(cells, 1):
            _draw_cell(sheet, draw, cell, pad + c * (CELL + pad), top, face, line_h)
    return sheet


def _draw_cell(sheet, draw, cell: Cell, left: int, top: int, face, line_h: int):
    with Image.open(cell.image) as image:
        thumb = ImageOps.contain(image.convert("RGB"), (CELL, CELL))
    x, y = left + (CELL - thumb.width) // 2, top
    sheet.paste(thumb, (x, y))
    draw.rectangle((x - 1, y - 1, x + thumb.width, y + thumb.height), outline=EDGE)
    lines = wrap(draw, cell.read or ["(nothing read)"], CELL, face)
    for k, line in enumerate(lines[:LINES]):
        x = left
        for word in line:
            colour = GOOD if word in cell.expected else BAD if cell.read else INK
            draw.text((x, top + CELL + 6 + k * line_h), word, font=face, fill=colour)
            x += draw.textlength(word + " ", font=face)
