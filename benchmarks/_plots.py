"""Small line charts and image grids as PNG with Pillow (a declared dependency of lfm_jax).

matplotlib is not a dependency of the project, so the study's figures are drawn here: axes with
ticks, one polyline per series with markers and optional error bars, an optional dashed series,
a legend, several panels side by side. Nothing here is specific to the study.

    panel = Panel(title="FD vs pruning ratio", xlabel="ratio", ylabel="FD",
                  series=[Series("random", [0, .5, .75], [4.1, 4.6, 5.2], yerr=[.1, .2, .3])])
    save_panels("docs/x.png", [panel])
"""

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


@dataclasses.dataclass
class Series:
  label: str
  x: Sequence[float]
  y: Sequence[float]
  yerr: Optional[Sequence[float]] = None
  dashed: bool = False
  color: Optional[tuple] = None
  annotations: Optional[Sequence[str]] = None  # a text beside each point


@dataclasses.dataclass
class Panel:
  title: str
  xlabel: str
  ylabel: str
  series: list
  hline: Optional[float] = None  # a dotted reference line (e.g. a goal)
  hline_label: str = ""
  vline: Optional[float] = None
  vline_label: str = ""


def _font(size: int = 11):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1
    return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, n: int = 5) -> tuple[list[float], int]:
  """Round tick values covering [lo, hi] and the decimals that tell them apart."""
  if not math.isfinite(lo) or not math.isfinite(hi):
    return [], 0
  if hi <= lo:
    hi = lo + (abs(lo) or 1.0) * 0.1
  raw = (hi - lo) / max(n, 1)
  mag = 10 ** math.floor(math.log10(raw))
  step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
  start = math.ceil(lo / step) * step
  ticks = []
  v = start
  while v <= hi + 1e-9 * step:
    ticks.append(round(v, 10))
    v += step
  decimals = max(0, -math.floor(math.log10(step) + 1e-9))
  if round(step * 10 ** decimals) % 10 == 5 and step < 1:  # 0.25, 0.025, ...
    decimals += 1
  return ticks, decimals


def _fmt(v: float, decimals: int) -> str:
  return f"{v:.{decimals}f}"


def _dashed_line(draw, p0, p1, color, width=1, dash=5):
  (x0, y0), (x1, y1) = p0, p1
  length = math.hypot(x1 - x0, y1 - y0)
  if length == 0:
    return
  steps = int(length // dash)
  for i in range(0, steps + 1, 2):
    a, b = i * dash / length, min((i + 1) * dash / length, 1.0)
    draw.line([(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
              fill=color, width=width)


def _draw_panel(draw, box, panel: Panel, font, small):
  left, top, right, bottom = box
  ml, mr, mt, mb = 52, 10, 34, 34
  x0, y0, x1, y1 = left + ml, top + mt, right - mr, bottom - mb
  xs = [float(v) for s in panel.series for v in s.x if v is not None and math.isfinite(v)]
  ys = []
  for s in panel.series:
    for i, v in enumerate(s.y):
      if v is None or not math.isfinite(v):
        continue
      e = float(s.yerr[i]) if s.yerr is not None and s.yerr[i] is not None else 0.0
      ys += [float(v) - e, float(v) + e]
  if panel.hline is not None:
    ys.append(float(panel.hline))
  if panel.vline is not None:
    xs.append(float(panel.vline))
  draw.text((left + ml, top + 4), panel.title, fill=(0, 0, 0), font=font)
  draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
  if not xs or not ys:
    draw.text((x0 + 8, y0 + 8), "no data", fill=(120, 120, 120), font=small)
    return
  xlo, xhi = min(xs), max(xs)
  ylo, yhi = min(ys), max(ys)
  xpad = (xhi - xlo) * 0.06 or 0.5
  ypad = (yhi - ylo) * 0.08 or (abs(ylo) * 0.1 or 0.5)
  xlo, xhi, ylo, yhi = xlo - xpad, xhi + xpad, ylo - ypad, yhi + ypad

  def px(x, y):
    return (x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0))

  xticks, xdec = _nice_ticks(xlo, xhi)
  yticks, ydec = _nice_ticks(ylo, yhi)
  for t in xticks:
    x, _ = px(t, ylo)
    draw.line([(x, y1), (x, y1 + 4)], fill=(0, 0, 0))
    label = _fmt(t, xdec)
    draw.text((x - 3 * len(label), y1 + 6), label, fill=(0, 0, 0), font=small)
  for t in yticks:
    _, y = px(xlo, t)
    draw.line([(x0 - 4, y), (x0, y)], fill=(0, 0, 0))
    draw.line([(x0 + 1, y), (x1 - 1, y)], fill=(235, 235, 235))
    label = _fmt(t, ydec)
    draw.text((x0 - 8 - 6 * len(label), y - 6), label, fill=(0, 0, 0), font=small)
  draw.text(((x0 + x1) / 2 - 3 * len(panel.xlabel), bottom - 16), panel.xlabel, fill=(0, 0, 0),
            font=small)
  if panel.ylabel:
    draw.text((x0, top + 20), panel.ylabel, fill=(90, 90, 90), font=small)
  if panel.hline is not None:
    a, b = px(xlo, panel.hline), px(xhi, panel.hline)
    _dashed_line(draw, a, b, (120, 120, 120), dash=3)
    if panel.hline_label:
      draw.text((x0 + 4, a[1] - 13), panel.hline_label, fill=(100, 100, 100), font=small)
  if panel.vline is not None:
    a, b = px(panel.vline, ylo), px(panel.vline, yhi)
    _dashed_line(draw, a, b, (120, 120, 120), dash=3)
    if panel.vline_label:
      draw.text((a[0] + 3, y0 + 3), panel.vline_label, fill=(100, 100, 100), font=small)
  legend_y = y0 + 4
  for k, s in enumerate(panel.series):
    color = s.color or PALETTE[k % len(PALETTE)]
    pts = [(px(float(x), float(y)), i) for i, (x, y) in enumerate(zip(s.x, s.y))
           if y is not None and math.isfinite(float(y))]
    for (p, _), (q, _) in zip(pts, pts[1:]):
      if s.dashed:
        _dashed_line(draw, p, q, color, width=2)
      else:
        draw.line([p, q], fill=color, width=2)
    for p, i in pts:
      if s.yerr is not None and s.yerr[i] is not None and float(s.yerr[i]) > 0:
        e = float(s.yerr[i])
        _, ya = px(float(s.x[i]), float(s.y[i]) - e)
        _, yb = px(float(s.x[i]), float(s.y[i]) + e)
        draw.line([(p[0], ya), (p[0], yb)], fill=color)
        draw.line([(p[0] - 3, ya), (p[0] + 3, ya)], fill=color)
        draw.line([(p[0] - 3, yb), (p[0] + 3, yb)], fill=color)
      draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=color)
      if s.annotations is not None and s.annotations[i]:
        draw.text((p[0] + 4, p[1] - 12), str(s.annotations[i]), fill=color, font=small)
    if s.label:
      lx = x1 - 150
      if s.dashed:
        _dashed_line(draw, (lx, legend_y + 6), (lx + 18, legend_y + 6), color, width=2)
      else:
        draw.line([(lx, legend_y + 6), (lx + 18, legend_y + 6)], fill=color, width=2)
      draw.text((lx + 22, legend_y), s.label, fill=(0, 0, 0), font=small)
      legend_y += 13


def save_panels(path, panels: Sequence[Panel], *, panel_size=(420, 300),
                columns: Optional[int] = None):
  """Draws panels in a grid (columns default: all in one row) and writes a palette PNG."""
  columns = columns or len(panels)
  rows = -(-len(panels) // columns)
  w, h = panel_size
  img = Image.new("RGB", (w * columns, h * rows), (255, 255, 255))
  draw = ImageDraw.Draw(img)
  font, small = _font(12), _font(10)
  for i, panel in enumerate(panels):
    r, c = divmod(i, columns)
    _draw_panel(draw, (c * w, r * h, (c + 1) * w, (r + 1) * h), panel, font, small)
  img.convert("P", palette=Image.ADAPTIVE, colors=64).save(path, format="PNG", optimize=True)
  return img.size


def save_image_rows(path, rows: Sequence[tuple[str, np.ndarray]], *, scale: int = 2,
                    pad: int = 2):
  """One row of images per (label, images (N, H, W, C) in [-1, 1]) with its label on the left:
  column i of every row is sample i (same-seed pairs line up vertically)."""
  font = _font(11)
  measure = ImageDraw.Draw(Image.new("L", (1, 1)))
  label_width = 8 + max(int(measure.textlength(label, font=font)) for label, _ in rows)
  n = max(len(x) for _, x in rows)
  h, w = rows[0][1].shape[1:3]
  hs, ws = h * scale, w * scale
  img = Image.new("L", (label_width + n * (ws + pad), len(rows) * (hs + pad) + pad), 255)
  draw = ImageDraw.Draw(img)
  for r, (label, images) in enumerate(rows):
    y = pad + r * (hs + pad)
    draw.text((4, y + hs / 2 - 6), label, fill=0, font=font)
    for i, x in enumerate(np.asarray(images, np.float32)):
      g = np.clip(np.round((x[..., 0] + 1.0) * 127.5), 0, 255).astype(np.uint8)
      tile = Image.fromarray(g).resize((ws, hs), Image.NEAREST)
      img.paste(tile, (label_width + i * (ws + pad), y))
  img.save(path, format="PNG", optimize=True)
  return img.size
