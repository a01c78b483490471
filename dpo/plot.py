"""Training curves as a PNG, drawn with numpy alone: a 5x7 bitmap font, a 2-px line rasterizer and a PNG encoder.

Three panels side by side (loss, reward accuracy, reward margin against optimizer step), train as a line and eval as
markers joined by a line. No plotting library is needed, so the curves are written at the end of every run.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np

CANVAS_WIDTH, CANVAS_HEIGHT = 1200, 400
HEADER_HEIGHT = 36          # overall title (left) and legend (right)
TEXT_SCALE = 2              # every glyph pixel is drawn as a 2x2 block
PLOT_INSET = 8              # gap between the frame and the first/last data pixel, so extremes stay visible
GRID_LEVELS = 5             # horizontal grid lines, evenly spaced from the axis minimum to its maximum
LINE_THICKNESS = 2
MARKER_RADIUS = 4

BACKGROUND = (255, 255, 255)
FRAME_COLOR = (60, 60, 60)
GRID_COLOR = (225, 225, 225)
TEXT_COLOR = (30, 30, 30)
TRAIN_COLOR = (31, 119, 180)
EVAL_COLOR = (230, 85, 13)

# (metric key in metrics.jsonl, panel title, fixed y range or None for the data's range)
PANELS: tuple[tuple[str, str, tuple[float, float] | None], ...] = (
    ("loss", "LOSS", None),
    ("rewards/accuracies", "REWARD ACCURACY", (0.0, 1.0)),
    ("rewards/margins", "REWARD MARGIN", None),
)

# 5x7 glyphs: seven rows top to bottom, each row two hex digits whose low five bits are the pixels (bit 4 = left).
_GLYPH_ROWS = """
0 0e11131519110e  1 040c040404040e  2 0e11010204081f  3 1f02040201110e  4 02060a121f0202
5 1f101e0101110e  6 0608101e11110e  7 1f010204080808  8 0e11110e11110e  9 0e11110f01020c
A 0e1111111f1111  B 1e11111e11111e  C 0e11101010110e  D 1c12111111121c  E 1f10101e10101f
F 1f10101e101010  G 0e11101711110f  H 1111111f111111  I 0e04040404040e  J 0702020202120c
K 11121418141211  L 1010101010101f  M 111b1515111111  N 11111915131111  O 0e11111111110e
P 1e11111e101010  Q 0e11111115120d  R 1e11111e141211  S 0f10100e01011e  T 1f040404040404
U 1111111111110e  V 11111111110a04  W 1111111515150a  X 11110a040a1111  Y 1111110a040404
Z 1f01020408101f  . 00000000000c0c  - 0000001f000000  + 0004041f040400  / 00010204081000
: 000c0c000c0c00  % 18190204081303  ( 02040808080402  ) 08040202020408  _ 0000000000001f
= 00001f001f0000  , 000000000c0408  ? 0e110102040004  ' 0c040800000000  ! 04040404040004
# 0a0a1f0a1f0a0a  [ 0e08080808080e  ] 0e02020202020e  < 02040810080402  > 08040201020408
* 0004150e150400
"""


def _parse_glyphs(table: str) -> dict[str, np.ndarray]:
    """Character -> bool[7, 5] bitmap, from `table`'s "char hexrows" pairs."""
    glyphs = {" ": np.zeros((7, 5), dtype=bool)}
    tokens = table.split()
    for char, hex_rows in zip(tokens[0::2], tokens[1::2]):
        rows = [int(hex_rows[k:k + 2], 16) for k in range(0, 14, 2)]
        glyphs[char] = np.array([[(row >> (4 - col)) & 1 for col in range(5)] for row in rows], dtype=bool)
    return glyphs


GLYPHS: dict[str, np.ndarray] = _parse_glyphs(_GLYPH_ROWS)
GLYPH_HEIGHT, GLYPH_WIDTH = 7, 5
GLYPH_ADVANCE = GLYPH_WIDTH + 1  # one blank column between characters

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class PNGError(ValueError):
    """A PNG that this module cannot read (bad signature, CRC, or a layout write_png never produces)."""


class PlotInputError(ValueError):
    """A metrics record that cannot be plotted (not a dict, missing/non-integer step, non-numeric metric)."""


# ----------------------------------------------------------------------------- PNG encoding


def _chunk(kind: bytes, data: bytes) -> bytes:
    """length (4 bytes, big endian) + type + data + CRC-32 over type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes for a uint8 [H, W, 3] image: 8-bit RGB, no interlace, filter type 0 on every row."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        desc = f"{rgb.dtype} array of shape {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"write_png expects a uint8 array of shape [H, W, 3], got {desc}")
    height, width = rgb.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"write_png expects a non-empty image, got shape {rgb.shape}")
    # bit depth 8, colour type 2 (truecolour), compression 0, filter method 0, interlace 0
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    scanlines = np.zeros((height, 1 + 3 * width), dtype=np.uint8)  # leading 0 = filter type "None"
    scanlines[:, 1:] = np.ascontiguousarray(rgb).reshape(height, 3 * width)
    return (PNG_SIGNATURE + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6)) + _chunk(b"IEND", b""))


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write a uint8 [H, W, 3] image as an 8-bit RGB PNG (atomically)."""
    _write_atomically(Path(path), encode_png(rgb))


def read_png(path: str | Path) -> np.ndarray:
    """Read an 8-bit RGB, non-interlaced PNG whose rows all use filter type 0 (what write_png writes)."""
    path = Path(path)
    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise PNGError(f"{path}: not a PNG file (bad signature)")
    pos, header, idat = len(PNG_SIGNATURE), None, bytearray()
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise PNGError(f"{path}: CRC mismatch in chunk {kind.decode('latin-1')} at byte {pos}")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None:
        raise PNGError(f"{path}: missing IHDR chunk")
    width, height, bit_depth, color_type, _, _, interlace = header
    if (bit_depth, color_type, interlace) != (8, 2, 0):
        raise PNGError(f"{path}: only 8-bit RGB non-interlaced PNGs are supported, got bit depth {bit_depth}, "
                       f"colour type {color_type}, interlace {interlace}")
    raw = np.frombuffer(zlib.decompress(bytes(idat)), dtype=np.uint8)
    if raw.size != height * (1 + 3 * width):
        raise PNGError(f"{path}: image data has {raw.size} bytes, expected {height * (1 + 3 * width)}")
    scanlines = raw.reshape(height, 1 + 3 * width)
    if scanlines[:, 0].any():
        raise PNGError(f"{path}: only filter type 0 is supported, found {sorted(set(scanlines[:, 0].tolist()))}")
    return scanlines[:, 1:].reshape(height, width, 3).copy()


# ----------------------------------------------------------------------------- rasterizing


def text_width(text: str, scale: int = TEXT_SCALE) -> int:
    return max(0, len(text) * GLYPH_ADVANCE - 1) * scale


def draw_text(image: np.ndarray, text: str, left: int, top: int, color: tuple[int, int, int],
              scale: int = TEXT_SCALE) -> None:
    """Stamp `text` (upper-cased; characters without a glyph drawn as '?') with its top-left corner at (left, top)."""
    height, width = image.shape[:2]
    for index, char in enumerate(text.upper()):
        glyph = GLYPHS.get(char, GLYPHS["?"])
        rows, cols = np.nonzero(glyph)
        x0 = left + index * GLYPH_ADVANCE * scale
        for dy in range(scale):
            for dx in range(scale):
                ys, xs = top + rows * scale + dy, x0 + cols * scale + dx
                keep = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
                image[ys[keep], xs[keep]] = color


def fill_rect(image: np.ndarray, left: int, top: int, right: int, bottom: int, color: tuple[int, int, int]) -> None:
    """Fill the inclusive pixel rectangle [left, right] x [top, bottom]."""
    image[max(top, 0):max(bottom + 1, 0), max(left, 0):max(right + 1, 0)] = color


def draw_polyline(image: np.ndarray, cols: np.ndarray, rows: np.ndarray, color: tuple[int, int, int],
                  clip: tuple[int, int, int, int], thickness: int = LINE_THICKNESS) -> None:
    """Join consecutive points with `thickness`-px segments, clipped to the inclusive box (left, top, right, bottom).

    Each segment is sampled at max(|dx|, |dy|) + 1 evenly spaced points (one per pixel along its major axis,
    so there are no gaps), and a thickness x thickness square is stamped at each.
    """
    left, top, right, bottom = clip
    cols, rows = np.asarray(cols, dtype=np.int64), np.asarray(rows, dtype=np.int64)
    if cols.size == 0:
        return
    if cols.size == 1:  # a lone point becomes one zero-length segment
        cols, rows = np.repeat(cols, 2), np.repeat(rows, 2)
    x0, y0, x1, y1 = cols[:-1], rows[:-1], cols[1:], rows[1:]
    samples = np.maximum(np.abs(x1 - x0), np.abs(y1 - y0)) + 1
    segment = np.repeat(np.arange(samples.size), samples)
    first_sample = np.cumsum(samples) - samples
    t = (np.arange(samples.sum()) - first_sample[segment]) / np.maximum(samples - 1, 1)[segment]
    xs = np.rint(x0[segment] + t * (x1 - x0)[segment]).astype(np.int64)
    ys = np.rint(y0[segment] + t * (y1 - y0)[segment]).astype(np.int64)
    offset = (thickness - 1) // 2  # centre the brush on the sample: offsets -offset .. thickness-1-offset
    for dy in range(thickness):
        for dx in range(thickness):
            px, py = xs + dx - offset, ys + dy - offset
            keep = (px >= left) & (px <= right) & (py >= top) & (py <= bottom)
            image[py[keep], px[keep]] = color


def draw_markers(image: np.ndarray, cols: np.ndarray, rows: np.ndarray, color: tuple[int, int, int],
                 clip: tuple[int, int, int, int], radius: int = MARKER_RADIUS) -> None:
    """Filled discs (x^2 + y^2 <= radius^2 + radius, which rounds nicely at small radii), clipped to the box."""
    left, top, right, bottom = clip
    offsets = [(dx, dy) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
               if dx * dx + dy * dy <= radius * radius + radius]
    for dx, dy in offsets:
        px, py = cols.astype(np.int64) + dx, rows.astype(np.int64) + dy
        keep = (px >= left) & (px <= right) & (py >= top) & (py <= bottom)
        image[py[keep], px[keep]] = color


# ----------------------------------------------------------------------------- data and layout


@dataclass(frozen=True)
class Series:
    """Finite (step, value) points of one metric on one split, sorted by step."""
    steps: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)


def _as_step(record: dict[str, Any], index: int) -> int:
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, Real) or not math.isfinite(step) or step != int(step):
        raise PlotInputError(f"metrics record {index}: field 'step' must be an integer, got {step!r}")
    return int(step)


def _as_value(record: dict[str, Any], key: str, index: int) -> float | None:
    """The metric as a float, or None when it is missing, None, NaN or infinite (such points are skipped)."""
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise PlotInputError(f"metrics record {index}: field {key!r} must be a number or null, got {value!r}")
    value = float(value)
    return value if math.isfinite(value) else None


def collect_series(records: list[dict[str, Any]], key: str) -> dict[str, Series]:
    """{"train": Series, "eval": Series} for metric `key`. Records with split "eval" are eval, all others train."""
    points: dict[str, list[tuple[int, float]]] = {"train": [], "eval": []}
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise PlotInputError(f"metrics record {index}: expected a JSON object, got {type(record).__name__}")
        value = _as_value(record, key, index)
        if value is None:
            continue
        points["eval" if record.get("split") == "eval" else "train"].append((_as_step(record, index), value))
    out = {}
    for split, pairs in points.items():
        pairs.sort(key=lambda pair: pair[0])
        out[split] = Series(np.array([p[0] for p in pairs], dtype=np.float64),
                            np.array([p[1] for p in pairs], dtype=np.float64))
    return out


def _padded_range(low: float, high: float, pad_if_flat: float | None = None) -> tuple[float, float]:
    """(low, high), widened around the value when low == high so a flat series sits mid-panel."""
    if high > low:
        return low, high
    pad = pad_if_flat if pad_if_flat is not None else (0.1 * abs(low) if low != 0 else 1.0)
    return low - pad, high + pad


@dataclass(frozen=True)
class Axes:
    """One panel: its frame (inclusive pixel box) and the data ranges mapped onto the inset plot area."""
    frame: tuple[int, int, int, int]        # left, top, right, bottom
    x_range: tuple[float, float] | None     # None when the panel has no data
    y_range: tuple[float, float] | None

    @property
    def plot_area(self) -> tuple[int, int, int, int]:
        left, top, right, bottom = self.frame
        return left + PLOT_INSET, top + PLOT_INSET, right - PLOT_INSET, bottom - PLOT_INSET

    def to_pixel(self, steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cols, rows): col = left + (x - x_lo) / (x_hi - x_lo) * (right - left), row likewise with y upwards.

        Points outside the ranges are clamped onto the plot area edge. Both terms are halved before subtracting
        so that x_hi - x_lo cannot overflow to inf for huge finite values.
        """
        assert self.x_range is not None and self.y_range is not None, "panel has no data"
        left, top, right, bottom = self.plot_area

        def fraction(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
            v = np.asarray(v, dtype=np.float64)
            return np.clip((v / 2 - lo / 2) / (hi / 2 - lo / 2), 0.0, 1.0)

        cols = left + fraction(steps, *self.x_range) * (right - left)
        rows = bottom - fraction(values, *self.y_range) * (bottom - top)
        return np.rint(cols).astype(np.int64), np.rint(rows).astype(np.int64)


PANEL_WIDTH = CANVAS_WIDTH // len(PANELS)
FRAME_LEFT_MARGIN = 96       # room for a right-aligned y tick label of 8 characters at scale 2
FRAME_RIGHT_MARGIN = 16
FRAME_TOP = HEADER_HEIGHT + 28   # below the panel title
FRAME_BOTTOM = CANVAS_HEIGHT - 34  # above the x tick labels


def panel_axes(records: list[dict[str, Any]]) -> list[Axes]:
    """Layout and ranges of the three panels. The step range is shared: the span of all plotted points."""
    all_series = [collect_series(records, key) for key, _, _ in PANELS]
    steps = np.concatenate([s.steps for series in all_series for s in series.values()])
    x_range = _padded_range(float(steps.min()), float(steps.max()), pad_if_flat=1.0) if steps.size else None
    axes = []
    for index, ((_, _, fixed_range), series) in enumerate(zip(PANELS, all_series)):
        values = np.concatenate([s.values for s in series.values()])
        if not values.size:
            y_range = None
        elif fixed_range is not None:
            y_range = fixed_range
        else:
            y_range = _padded_range(float(values.min()), float(values.max()))
        x0 = index * PANEL_WIDTH
        frame = (x0 + FRAME_LEFT_MARGIN, FRAME_TOP, x0 + PANEL_WIDTH - FRAME_RIGHT_MARGIN, FRAME_BOTTOM)
        axes.append(Axes(frame, x_range if y_range is not None else None, y_range))
    return axes


def format_tick(value: float, integer: bool = False) -> str:
    """Short tick label: integers as such, other values with 4 significant digits ('0.6931', '1.5E-05')."""
    if integer and value == int(value):
        return str(int(value))
    text = f"{value:.4g}".upper()
    return "0" if text == "-0" else text


# ----------------------------------------------------------------------------- drawing


def _draw_label(image: np.ndarray, text: str, anchor_x: int, top: int, align: str, max_width: int) -> None:
    """Draw text aligned 'left', 'right' or 'center' on anchor_x; drop to scale 1 when it would be too wide."""
    scale = TEXT_SCALE if text_width(text, TEXT_SCALE) <= max_width else 1
    width = text_width(text, scale)
    left = {"left": anchor_x, "right": anchor_x - width + 1, "center": anchor_x - width // 2}[align]
    vertical_shift = 0 if scale == TEXT_SCALE else (GLYPH_HEIGHT * (TEXT_SCALE - scale)) // 2
    draw_text(image, text, left, top + vertical_shift, TEXT_COLOR, scale)


def _draw_frame(image: np.ndarray, frame: tuple[int, int, int, int]) -> None:
    left, top, right, bottom = frame
    for edge in ((left, top, right, top), (left, bottom, right, bottom), (left, top, left, bottom),
                 (right, top, right, bottom)):
        fill_rect(image, *edge, FRAME_COLOR)


def _draw_panel(image: np.ndarray, axes: Axes, title: str, series: dict[str, Series]) -> None:
    left, top, right, bottom = axes.frame
    glyph_px = GLYPH_HEIGHT * TEXT_SCALE
    _draw_label(image, title, (left + right) // 2, HEADER_HEIGHT + 4, "center", right - left)
    if axes.y_range is None or axes.x_range is None:
        _draw_frame(image, axes.frame)
        _draw_label(image, "NO DATA", (left + right) // 2, (top + bottom - glyph_px) // 2, "center", right - left)
        return

    plot_left, plot_top, plot_right, plot_bottom = axes.plot_area
    for level in range(GRID_LEVELS):
        row = round(plot_bottom - level * (plot_bottom - plot_top) / (GRID_LEVELS - 1))
        fill_rect(image, left + 1, row, right - 1, row, GRID_COLOR)
    _draw_frame(image, axes.frame)

    label_room = FRAME_LEFT_MARGIN - 10
    y_lo, y_hi = axes.y_range
    _draw_label(image, format_tick(y_hi), left - 6, plot_top - glyph_px // 2, "right", label_room)
    _draw_label(image, format_tick(y_lo), left - 6, plot_bottom - glyph_px // 2, "right", label_room)
    x_lo, x_hi = axes.x_range
    _draw_label(image, format_tick(x_lo, integer=True), plot_left, bottom + 8, "left", (right - left) // 3)
    _draw_label(image, format_tick(x_hi, integer=True), plot_right, bottom + 8, "right", (right - left) // 3)
    _draw_label(image, "STEP", (left + right) // 2, bottom + 8, "center", right - left)

    inner = (left + 1, top + 1, right - 1, bottom - 1)
    train, evals = series["train"], series["eval"]
    if len(train):
        cols, rows = axes.to_pixel(train.steps, train.values)
        draw_polyline(image, cols, rows, TRAIN_COLOR, inner)
        if len(train) == 1:  # a lone point has no segment to show it
            draw_markers(image, cols, rows, TRAIN_COLOR, inner, radius=2)
    if len(evals):
        cols, rows = axes.to_pixel(evals.steps, evals.values)
        draw_polyline(image, cols, rows, EVAL_COLOR, inner)
        draw_markers(image, cols, rows, EVAL_COLOR, inner)


def _draw_header(image: np.ndarray, title: str | None) -> None:
    glyph_px = GLYPH_HEIGHT * TEXT_SCALE
    top = (HEADER_HEIGHT - glyph_px) // 2 + 2
    # legend, right-aligned: a line swatch for train, a marker swatch for eval
    x = CANVAS_WIDTH - 16 - text_width("EVAL")
    draw_text(image, "EVAL", x, top, TEXT_COLOR)
    swatch_row = top + glyph_px // 2
    draw_polyline(image, np.array([x - 34, x - 10]), np.array([swatch_row] * 2), EVAL_COLOR, (0, 0, x, HEADER_HEIGHT))
    draw_markers(image, np.array([x - 22]), np.array([swatch_row]), EVAL_COLOR, (0, 0, x, HEADER_HEIGHT))
    x -= 34 + 24 + text_width("TRAIN")
    draw_text(image, "TRAIN", x, top, TEXT_COLOR)
    draw_polyline(image, np.array([x - 34, x - 10]), np.array([swatch_row] * 2), TRAIN_COLOR, (0, 0, x, HEADER_HEIGHT))
    legend_left = x - 34
    if title:
        max_chars = (legend_left - 16 - 24) // (GLYPH_ADVANCE * TEXT_SCALE)
        text = title if len(title) <= max_chars else title[:max(0, max_chars - 3)] + "..."
        draw_text(image, text, 16, top, TEXT_COLOR)


def render_training_curves(records: list[dict[str, Any]], *, title: str | None = None) -> np.ndarray:
    """The training-curve image as uint8 [CANVAS_HEIGHT, CANVAS_WIDTH, 3]."""
    image = np.empty((CANVAS_HEIGHT, CANVAS_WIDTH, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    _draw_header(image, title)
    for (key, panel_title, _), axes in zip(PANELS, panel_axes(records)):
        _draw_panel(image, axes, panel_title, collect_series(records, key))
    return image


def plot_training_curves(records: list[dict[str, Any]], path: str | Path, *, title: str | None = None) -> Path:
    """Render metrics.jsonl records (dicts with "step", "split" and metric keys) to a PNG at `path`; returns it."""
    path = Path(path)
    write_png(path, render_training_curves(records, title=title))
    return path
