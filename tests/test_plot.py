"""Tests for dpo/plot.py: the PNG encoder/decoder, the rasterizer and the training-curve layout."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from dpo import plot
from dpo.plot import (
    BACKGROUND, CANVAS_HEIGHT, CANVAS_WIDTH, EVAL_COLOR, FRAME_COLOR, GLYPHS, GRID_COLOR, HEADER_HEIGHT, PANELS,
    TEXT_COLOR, TRAIN_COLOR, PlotInputError, PNGError, draw_polyline, format_tick, panel_axes, plot_training_curves,
    read_png, render_training_curves, write_png,
)

PALETTE = {BACKGROUND, FRAME_COLOR, GRID_COLOR, TEXT_COLOR, TRAIN_COLOR, EVAL_COLOR}


def _chunks(data: bytes) -> list[tuple[bytes, bytes, int]]:
    """(type, body, stored CRC) of every chunk, parsed independently of dpo.plot."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        out.append((kind, body, crc))
        pos += 12 + length
    assert pos == len(data), "trailing bytes after the last chunk"
    return out


def _mask(image: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    return np.all(image == np.array(color, dtype=np.uint8), axis=-1)


def _records(n_steps: int = 40, eval_every: int = 10) -> list[dict]:
    records = []
    for step in range(1, n_steps + 1):
        records.append({"step": step, "split": "train", "loss": 0.7 * math.exp(-step / 20),
                        "rewards/accuracies": 0.5 + 0.4 * step / n_steps, "rewards/margins": step / 10})
        if step % eval_every == 0:
            records.append({"step": step, "split": "eval", "loss": 0.8 * math.exp(-step / 30),
                            "rewards/accuracies": 0.5 + 0.3 * step / n_steps, "rewards/margins": step / 12})
    return records


# ----------------------------------------------------------------------------- PNG


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 13, 3), (64, 33, 3)])
def test_png_round_trip_random_pixels(tmp_path: Path, shape):
    rgb = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path / "img.png"
    write_png(path, rgb)
    back = read_png(path)
    assert back.dtype == np.uint8 and back.shape == shape
    np.testing.assert_array_equal(back, rgb)


def test_png_signature_header_and_every_crc(tmp_path: Path):
    rgb = np.random.default_rng(1).integers(0, 256, size=(5, 9, 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    write_png(path, rgb)
    chunks = _chunks(path.read_bytes())
    kinds = [kind for kind, _, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and set(kinds[1:-1]) == {b"IDAT"}
    for kind, body, crc in chunks:
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, kind
    width, height, depth, color_type, compression, filter_method, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (width, height) == (9, 5)
    assert (depth, color_type, compression, filter_method, interlace) == (8, 2, 0, 0, 0)
    # decode the pixel data here, without read_png: every row is filter byte 0 followed by RGB triples
    raw = zlib.decompress(b"".join(body for kind, body, _ in chunks if kind == b"IDAT"))
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(5, 1 + 9 * 3)
    assert not rows[:, 0].any()
    np.testing.assert_array_equal(rows[:, 1:].reshape(5, 9, 3), rgb)


def test_read_png_rejects_corrupted_crc(tmp_path: Path):
    path = tmp_path / "img.png"
    write_png(path, np.zeros((4, 4, 3), dtype=np.uint8))
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # inside the IDAT body: its CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(PNGError, match="CRC mismatch in chunk IDAT"):
        read_png(path)
    path.write_bytes(b"GIF89a" + bytes(data[6:]))
    with pytest.raises(PNGError, match="signature"):
        read_png(path)


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), dtype=np.float32), np.zeros((4, 4), dtype=np.uint8),
                                 np.zeros((4, 4, 4), dtype=np.uint8), np.zeros((0, 4, 3), dtype=np.uint8)])
def test_write_png_rejects_bad_arrays_and_keeps_existing_file(tmp_path: Path, bad):
    path = tmp_path / "img.png"
    good = np.full((2, 3, 3), 7, dtype=np.uint8)
    write_png(path, good)
    with pytest.raises(ValueError, match="write_png expects"):
        write_png(path, bad)
    np.testing.assert_array_equal(read_png(path), good)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]  # no temporary file left behind


# ----------------------------------------------------------------------------- rasterizer and font


def test_horizontal_and_vertical_lines_are_exactly_two_pixels_thick():
    image = np.zeros((30, 30, 3), dtype=np.uint8)
    draw_polyline(image, np.array([5, 20]), np.array([10, 10]), (255, 0, 0), (0, 0, 29, 29))
    painted = np.argwhere(_mask(image, (255, 0, 0)))
    assert set(map(tuple, painted)) == {(r, c) for r in (10, 11) for c in range(5, 22)}
    image[:] = 0
    draw_polyline(image, np.array([3, 3]), np.array([2, 12]), (255, 0, 0), (0, 0, 29, 29))
    assert set(map(tuple, np.argwhere(_mask(image, (255, 0, 0))))) == {(r, c) for r in range(2, 14) for c in (3, 4)}


def test_diagonal_segment_has_no_gaps_and_stays_in_clip_box():
    image = np.zeros((50, 50, 3), dtype=np.uint8)
    clip = (10, 10, 40, 40)
    draw_polyline(image, np.array([0, 49, 12]), np.array([3, 30, 49]), (0, 255, 0), clip)
    painted = _mask(image, (0, 255, 0))
    rows, cols = np.nonzero(painted)
    assert rows.min() >= 10 and rows.max() <= 40 and cols.min() >= 10 and cols.max() <= 40
    # brute force: every point of the ideal first segment inside the clip box is within 1 px of a painted pixel
    for t in np.linspace(0, 1, 400):
        x, y = 0 + 49 * t, 3 + 27 * t
        if 11 <= x <= 39 and 11 <= y <= 39:
            assert painted[int(round(y)) - 1:int(round(y)) + 2, int(round(x)) - 1:int(round(x)) + 2].any(), (x, y)


def test_glyphs_cover_every_label_the_module_draws():
    labels = [title for _, title, _ in PANELS] + ["NO DATA", "STEP", "TRAIN", "EVAL", "...", "?"]
    labels += [format_tick(v) for v in (0.0, -0.0, 1.0, 0.6931, -1.234e-5, 3.5e7, 12345.678, -2.5, 1e-300, 0.1 + 0.2)]
    labels += [format_tick(v, integer=True) for v in (0, 7, 1200, -1)]
    for label in labels:
        missing = sorted(set(label.upper()) - set(GLYPHS))
        assert not missing, f"no glyph for {missing} in {label!r}"
    digits_and_signs = set("0123456789.-+E")
    assert digits_and_signs <= set(GLYPHS)


def test_glyph_bitmaps_are_well_formed_and_distinct():
    seen: dict[bytes, str] = {}
    for char, glyph in GLYPHS.items():
        assert glyph.shape == (7, 5) and glyph.dtype == bool, char
        assert glyph.any() == (char != " "), char
        key = glyph.tobytes()
        assert key not in seen, f"{char!r} and {seen.get(key)!r} share a bitmap"
        seen[key] = char


def test_format_tick():
    assert format_tick(0.69314718) == "0.6931"
    assert format_tick(-0.0) == "0"
    assert format_tick(1.5e-5) == "1.5E-05"
    assert format_tick(200.0, integer=True) == "200"
    assert format_tick(2.5, integer=True) == "2.5"


# ----------------------------------------------------------------------------- the training-curve figure


def test_known_series_draws_train_line_and_eval_markers_where_expected():
    records = _records()
    image = render_training_curves(records)
    assert image.shape == (CANVAS_HEIGHT, CANVAS_WIDTH, 3) and image.dtype == np.uint8
    loss_axes = panel_axes(records)[0]
    left, top, right, bottom = loss_axes.frame
    assert right < CANVAS_WIDTH // 3 and top >= HEADER_HEIGHT
    train = _mask(image, TRAIN_COLOR)
    evals = _mask(image, EVAL_COLOR)
    assert train[top:bottom, left:right].sum() > 100
    assert evals[top:bottom, left:right].sum() > 20

    # expected pixel of every eval point, from the linear map written out here (not via Axes.to_pixel)
    plot_left, plot_top, plot_right, plot_bottom = loss_axes.plot_area
    losses = [r["loss"] for r in records]
    lo, hi = min(losses), max(losses)
    for record in (r for r in records if r["split"] == "eval"):
        col = plot_left + (record["step"] - 1) / (40 - 1) * (plot_right - plot_left)
        row = plot_bottom - (record["loss"] - lo) / (hi - lo) * (plot_bottom - plot_top)
        assert evals[round(row), round(col)], record
    # the first and last train points pin the corners of the plot area (loss is decreasing, steps 1..40)
    assert train[plot_top, plot_left] and train[plot_bottom, plot_right]


def test_rising_accuracy_ends_higher_on_the_image_than_it_starts():
    records = [{"step": s, "split": "train", "rewards/accuracies": 0.2 + 0.015 * s} for s in range(0, 50)]
    train = _mask(render_training_curves(records), TRAIN_COLOR)
    panel = train[HEADER_HEIGHT:, CANVAS_WIDTH // 3:2 * CANVAS_WIDTH // 3]  # accuracy panel, below the legend
    cols = np.nonzero(panel.any(axis=0))[0]
    first_rows = np.nonzero(panel[:, cols.min()])[0]
    last_rows = np.nonzero(panel[:, cols.max()])[0]
    assert last_rows.mean() < first_rows.mean() - 100


def test_accuracy_axis_is_fixed_to_zero_one():
    records = [{"step": s, "split": "train", "rewards/accuracies": 0.5} for s in range(10)]
    records += [{"step": 10, "split": "eval", "rewards/accuracies": 1.0}]
    image = render_training_curves(records)
    axes = panel_axes(records)[1]
    assert axes.y_range == (0.0, 1.0)
    _, plot_top, _, plot_bottom = axes.plot_area
    train_rows = np.nonzero(_mask(image, TRAIN_COLOR)[axes.frame[1]:axes.frame[3], axes.frame[0]:axes.frame[2]])[0]
    middle = (plot_top + plot_bottom) / 2 - axes.frame[1]
    assert abs(np.median(train_rows) - middle) <= 1.5
    eval_col, eval_row = axes.to_pixel(np.array([10]), np.array([1.0]))
    assert eval_row[0] == plot_top and _mask(image, EVAL_COLOR)[eval_row[0], eval_col[0]]


def test_constant_and_single_point_series_are_visible_mid_panel():
    constant = [{"step": s, "split": "train", "loss": 0.25} for s in range(5)]
    single = [{"step": 3, "split": "train", "rewards/margins": -2.0}]
    records = constant + single
    image = render_training_curves(records)
    train = _mask(image, TRAIN_COLOR)
    loss_axes, _, margin_axes = panel_axes(records)
    lo, hi = loss_axes.y_range
    assert lo < 0.25 < hi and math.isclose((lo + hi) / 2, 0.25)
    for axes in (loss_axes, margin_axes):
        left, top, right, bottom = axes.frame
        rows, _ = np.nonzero(train[top:bottom, left:right])
        assert rows.size > 0
        assert abs(rows.mean() + top - (axes.plot_area[1] + axes.plot_area[3]) / 2) <= 2


def test_empty_records_write_valid_png_with_no_data(tmp_path: Path):
    path = plot_training_curves([], tmp_path / "curves.png")
    assert path == tmp_path / "curves.png"
    image = read_png(path)
    assert image.shape == (CANVAS_HEIGHT, CANVAS_WIDTH, 3)
    for kind, body, crc in _chunks(path.read_bytes()):
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc
    below_header = image[HEADER_HEIGHT:]
    assert not _mask(below_header, TRAIN_COLOR).any() and not _mask(below_header, EVAL_COLOR).any()
    expected = np.full((20, 120, 3), 255, dtype=np.uint8)
    plot.draw_text(expected, "NO DATA", 0, 0, TEXT_COLOR)
    expected_text = _mask(expected, TEXT_COLOR)
    for axes in panel_axes([]):
        assert axes.x_range is None and axes.y_range is None
        left, top, right, bottom = axes.frame
        text = _mask(image[top + 1:bottom, left + 1:right], TEXT_COLOR)
        rows, cols = np.nonzero(text)
        crop = text[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        r, c = np.nonzero(expected_text)
        np.testing.assert_array_equal(crop, expected_text[r.min():r.max() + 1, c.min():c.max() + 1])


def test_none_nan_inf_and_huge_values_are_skipped_without_stray_pixels():
    records = _records(20, 5)
    records[3]["loss"] = None
    records[4]["loss"] = float("nan")
    records[5]["rewards/margins"] = float("inf")
    del records[6]["rewards/accuracies"]
    records.append({"step": 21, "split": "eval", "loss": None, "rewards/margins": float("-inf")})
    records.append({"step": 22, "split": "train", "rewards/margins": 1.7e308})
    records.append({"step": 23, "split": "train", "rewards/margins": -1.7e308})
    image = render_training_curves(records, title="nan run: lr=5e-7 (beta 0.1)")
    packed = np.unique(image.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1]))
    assert {(int(v) >> 16, (int(v) >> 8) & 255, int(v) & 255) for v in packed} <= PALETTE
    data = _mask(image, TRAIN_COLOR) | _mask(image, EVAL_COLOR)
    inside = np.zeros_like(data)
    inside[:HEADER_HEIGHT] = True  # legend swatches
    for axes in panel_axes(records):
        left, top, right, bottom = axes.frame
        inside[top + 1:bottom, left + 1:right] = True
        assert axes.y_range is not None and all(math.isfinite(v) for v in axes.y_range)
    assert not (data & ~inside).any()
    assert data[HEADER_HEIGHT:].sum() > 100


def test_title_is_drawn_in_the_header_only_when_given():
    records = _records(10, 5)
    left_header = slice(0, HEADER_HEIGHT), slice(0, CANVAS_WIDTH // 2)
    assert not _mask(render_training_curves(records)[left_header], TEXT_COLOR).any()
    assert _mask(render_training_curves(records, title="phi-2-dpo")[left_header], TEXT_COLOR).sum() > 50


def test_plot_file_matches_rendered_image(tmp_path: Path):
    records = _records()
    path = plot_training_curves(records, str(tmp_path / "sub" / "training_curves.png"), title="run")
    assert isinstance(path, Path)
    np.testing.assert_array_equal(read_png(path), render_training_curves(records, title="run"))
    assert sorted(p.name for p in path.parent.iterdir()) == ["training_curves.png"]


@pytest.mark.parametrize("records, message", [
    ([{"split": "train", "loss": 0.5}], "metrics record 0: field 'step' must be an integer, got None"),
    ([{"step": 1, "loss": 0.5}, {"step": 1.5, "loss": 0.5}], "metrics record 1: field 'step'"),
    ([{"step": 1, "split": "eval", "rewards/margins": "big"}], "metrics record 0: field 'rewards/margins'"),
    (["not a dict"], "metrics record 0: expected a JSON object"),
])
def test_bad_records_raise_clear_errors(tmp_path: Path, records, message):
    with pytest.raises(PlotInputError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        plot_training_curves(records, tmp_path / "x.png")
    assert isinstance(info.value, ValueError)
    assert not (tmp_path / "x.png").exists()
