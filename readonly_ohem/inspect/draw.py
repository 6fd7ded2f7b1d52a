"""The picture of one selection (Pillow only): which RoIs OHEM kept on one image, and why.

Kept RoIs are drawn in colour by their loss (colour bar on the right), foreground ones thicker
and tagged with their class and loss; RoIs that NMS suppressed are dashed (with an x when they
were harder than the easiest kept RoI); the rest of the scored RoIs are faint. A title states
the iteration, the counts and the loss range; the side panel has the colour bar, the legend and
the kept counts by class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from readonly_ohem.detection.vis import load_font

# low loss -> high loss: cyan, green, yellow, orange, red, magenta (bright on the dimmed photo)
_ANCHORS = np.array([(60, 200, 255), (90, 240, 120), (250, 240, 60), (255, 150, 30),
                     (240, 40, 40), (255, 60, 220)], dtype=np.float64)
PANEL_W = 300
BG_PANEL = (250, 250, 250)
FAINT = (255, 255, 255, 34)
SUPPRESSED = (225, 225, 225, 120)
MAX_FG_TAGS, MAX_BG_TAGS = 12, 3


def loss_colors(values, lo: float, hi: float) -> np.ndarray:
    """(N,) losses -> (N, 3) uint8 colours on the loss colour map, linear on [lo, hi] (clipped)."""
    v = np.asarray(values, dtype=np.float64)
    t = np.clip((v - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.full(v.shape, 0.5)
    x = t * (len(_ANCHORS) - 1)
    i = np.minimum(np.floor(x).astype(np.int64), len(_ANCHORS) - 2)
    f = (x - i)[:, None]
    return np.round(_ANCHORS[i] * (1 - f) + _ANCHORS[i + 1] * f).astype(np.uint8)


def _dashed_line(draw, p, q, fill, width, dash, gap):
    (x0, y0), (x1, y1) = p, q
    length = float(np.hypot(x1 - x0, y1 - y0))
    if length == 0:
        return
    dx, dy = (x1 - x0) / length, (y1 - y0) / length
    for s in np.arange(0.0, length, dash + gap):
        e = min(s + dash, length)
        draw.line((x0 + dx * s, y0 + dy * s, x0 + dx * e, y0 + dy * e), fill=fill, width=width)


def dashed_rectangle(draw, box, fill, width: int = 1, dash: int = 6, gap: int = 4) -> None:
    x1, y1, x2, y2 = box
    for p, q in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))):
        _dashed_line(draw, p, q, fill, width, dash, gap)


def _display_scale(w: int, h: int) -> float:
    """Small images are enlarged (up to 3x) so tags stay legible; large ones shrunk to ~1000 px."""
    return float(np.clip(900.0 / max(w, h, 1), 0.5, 3.0))


def figure_size(width: int, height: int) -> tuple[int, int]:
    """The PNG's (width, height) for an image of ``width`` x ``height`` pixels."""
    s = _display_scale(width, height)
    w, h = int(round(width * s)), int(round(height * s))
    return w + PANEL_W, max(h, 720) + _title_height()


def _title_height() -> int:
    return 64


def _load_photo(meta: dict, image=None) -> tuple[Image.Image, str | None]:
    """The original image (RGB) or a grey canvas when its file is gone (and a note saying so)."""
    if image is not None:
        return image.convert("RGB"), None
    path = meta.get("image_path")
    w, h = meta.get("width"), meta.get("height")
    if path and Path(path).is_file():
        with Image.open(path) as im:
            return im.convert("RGB"), None
    if not (w and h):
        return Image.new("RGB", (640, 480), (90, 90, 90)), f"image file not found: {path}"
    return Image.new("RGB", (int(w), int(h)), (90, 90, 90)), f"image file not found: {path}"


def _tag(draw, xy, text, font, color, placed, size):
    """A "class loss" tag above the box (inside at the top edge); skipped if it would touch a
    tag already placed (crowded objects keep their hardest RoIs' tags). Returns whether drawn."""
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    tw, th = r - l + 8, b - t + 4
    x, y = xy
    y = y - th if y - th >= 0 else y
    x = min(max(x, 0), max(size[0] - tw, 0))
    box = (x, y, x + tw, y + th)
    for p in placed:
        ix = max(0, min(box[2], p[2]) - max(box[0], p[0]))
        iy = max(0, min(box[3], p[3]) - max(box[1], p[1]))
        if ix * iy > 0:
            return False
    placed.append(box)
    draw.rectangle(box, fill=(0, 0, 0, 200))
    draw.rectangle((x, y, x + 4, y + th), fill=tuple(color) + (255,))
    draw.text((x + 6 - l, y + 2 - t), text, font=font, fill=(255, 255, 255, 255))
    return True


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}")


def render_selection(meta: dict, arrays: dict, classes, out=None, image=None, title=None,
                     notes=()) -> Image.Image:
    """Draw one (iteration, pass, image) selection; save a PNG at ``out`` if given.

    meta: a log index line (``ImageSelection.meta``); arrays: its per-RoI arrays (boxes in the
    original image). ``title`` replaces the first title line; ``notes`` go under the legend.
    Returns the RGB picture, of size ``figure_size(width, height)``.
    """
    photo, missing = _load_photo(meta, image)
    W, H = photo.size
    s = _display_scale(W, H)
    dw, dh = int(round(W * s)), int(round(H * s))
    photo = photo.resize((dw, dh), Image.LANCZOS)
    grey = photo.convert("L").convert("RGB")
    photo = Image.blend(photo, grey, 0.4).point(lambda v: int(v * 0.75))  # dimmed, less saturated

    boxes = np.asarray(arrays["boxes"], dtype=np.float64) * s
    labels = np.asarray(arrays["labels"], dtype=np.int64)
    loss = np.asarray(arrays["loss_cls"], np.float64) + np.asarray(arrays["loss_bbox"], np.float64)
    kept = np.asarray(arrays["kept"], bool)
    supp = np.asarray(arrays["suppressed"], bool)
    harder = np.asarray(arrays.get("harder_than_kept", np.zeros_like(supp)), bool)
    lo = float(loss[kept].min()) if kept.any() else (float(loss.min()) if loss.size else 0.0)
    hi = float(loss.max()) if loss.size else 1.0
    colors = loss_colors(loss, lo, hi)

    layer = Image.new("RGBA", (dw, dh), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    faint = ~kept & ~supp
    for b in boxes[faint]:
        d.rectangle(tuple(b), outline=FAINT, width=1)
    for i in np.nonzero(supp & ~harder)[0]:
        dashed_rectangle(d, boxes[i], SUPPRESSED, 1)
    order = np.argsort(loss, kind="stable")  # easy first: the hardest end up on top
    for i in order[harder[order]]:
        c = tuple(int(v) for v in colors[i]) + (255,)
        dashed_rectangle(d, boxes[i], c, 2, dash=8, gap=5)
        cx, cy = (boxes[i, 0] + boxes[i, 2]) / 2, (boxes[i, 1] + boxes[i, 3]) / 2
        d.line((cx - 6, cy - 6, cx + 6, cy + 6), fill=c, width=3)
        d.line((cx - 6, cy + 6, cx + 6, cy - 6), fill=c, width=3)
    kept_order = order[kept[order]]
    for i in kept_order:
        c = tuple(int(v) for v in colors[i]) + (255,)
        w = 3 if labels[i] > 0 else 2
        x1, y1, x2, y2 = boxes[i]
        d.rectangle((x1 - 1, y1 - 1, x2 + 1, y2 + 1), outline=(0, 0, 0, 255), width=w + 2)
        d.rectangle((x1, y1, x2, y2), outline=c, width=w)
    # tags, hardest first: kept foreground RoIs, then a few kept background ones, never overlapping
    font = load_font(13)
    placed: list = []
    hard_first = kept_order[::-1]
    for fg, limit in ((True, MAX_FG_TAGS), (False, MAX_BG_TAGS)):
        n = 0
        for i in hard_first[(labels[hard_first] > 0) == fg]:
            if n >= limit:
                break
            name = _class_name(classes, labels[i])
            n += _tag(d, (boxes[i, 0], boxes[i, 1]), f"{name} {loss[i]:.2f}", font, colors[i], placed,
                      (dw, dh))
    photo = Image.alpha_composite(photo.convert("RGBA"), layer).convert("RGB")

    fw, fh = figure_size(W, H)
    fig = Image.new("RGB", (fw, fh), BG_PANEL)
    th = _title_height()
    fig.paste(photo, (0, th))
    draw = ImageDraw.Draw(fig)
    _title(draw, meta, loss, kept, labels, supp, harder, fw, title)
    notes = list(notes) + ([missing] if missing else [])
    hardest = [f"{_class_name(classes, labels[i])} {loss[i]:.2f} = cls {arrays['loss_cls'][i]:.2f}"
               f" + bbox {arrays['loss_bbox'][i]:.2f}" for i in kept_order[::-1][:5]]
    settings = (f"policy {meta.get('policy', 'topk')}, BATCH_SIZE {meta.get('batch_size', '-')}, "
                + (f"NMS IoU > {meta.get('nms_thresh', 0.7):g}" if meta.get("use_nms", True) else "NMS off"))
    _panel(draw, fig, dw, th, lo, hi, classes, labels, kept, hardest, settings, notes)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.save(out, format="PNG")
    return fig


def _class_name(classes, k: int) -> str:
    if k == 0:
        return "bg"
    return classes[k] if classes is not None and 0 <= k < len(classes) else f"class{k}"


def _title(draw, meta, loss, kept, labels, supp, harder, fw, title):
    it, p = meta.get("iter"), meta.get("pass", 0)
    flip = " (flipped)" if meta.get("flipped") else ""
    if title is None:
        title = (f"OHEM selection  -  iteration {it}, pass {p}  -  image {meta.get('image_id')}{flip}"
                 f"  -  scale {meta.get('scale', 1.0):.3f}")
    nk, n = int(kept.sum()), int(loss.size)
    nkf = int((kept & (labels > 0)).sum())
    lk = loss[kept]
    nms = (f"NMS suppressed {int(supp.sum())} ({int(harder.sum())} harder than the easiest kept)"
           if meta.get("use_nms", True) else "NMS off")
    line2 = (f"kept {nk} of {n} RoIs ({nkf} fg, {nk - nkf} bg)  -  {nms}  -  loss of kept "
             f"{_fmt(lk.min() if lk.size else None)}..{_fmt(lk.max() if lk.size else None)}, "
             f"of all {_fmt(loss.min() if n else None)}..{_fmt(loss.max() if n else None)}")
    if meta.get("pass_num_kept") is not None and meta.get("pass_num_rois") not in (None, n):
        line2 += f"  (pass: {meta['pass_num_kept']} of {meta['pass_num_rois']})"
    draw.rectangle((0, 0, fw, _title_height()), fill=(32, 32, 36))
    draw.text((10, 8), title, font=load_font(18), fill=(255, 255, 255))
    draw.text((10, 36), line2, font=load_font(14), fill=(220, 220, 220))


def _panel(draw, fig, x0, y0, lo, hi, classes, labels, kept, hardest, settings, notes):
    """Colour bar, legend, kept counts by class, notes: in the right-hand panel."""
    font, small = load_font(14), load_font(12)
    x = x0 + 16
    y = y0 + 12
    draw.text((x, y), "per-RoI loss (cls + bbox)", font=font, fill=(0, 0, 0))
    y += 24
    bar_h, bar_w = 180, 22
    ramp = loss_colors(np.linspace(hi, lo, bar_h), lo, hi)
    fig.paste(Image.fromarray(np.repeat(ramp[:, None, :], bar_w, axis=1), "RGB"), (x, y))
    draw.rectangle((x - 1, y - 1, x + bar_w, y + bar_h), outline=(0, 0, 0))
    for k in range(5):
        v = hi - (hi - lo) * k / 4
        ty = y + round((bar_h - 1) * k / 4)
        draw.line((x + bar_w, ty, x + bar_w + 5, ty), fill=(0, 0, 0))
        draw.text((x + bar_w + 9, ty - 7), f"{v:.3g}", font=small, fill=(0, 0, 0))
    draw.text((x + bar_w + 60, y + 2), "hardest", font=small, fill=(90, 90, 90))
    draw.text((x + bar_w + 60, y + bar_h - 14), "easiest kept", font=small, fill=(90, 90, 90))
    y += bar_h + 18

    swatch = loss_colors([lo + 0.75 * (hi - lo)], lo, hi)[0]
    c = tuple(int(v) for v in swatch)
    draw.rectangle((x0 + 6, y - 4, x0 + PANEL_W - 6, y + 5 * 24 + 2), fill=(60, 60, 64))
    items = [("kept, foreground (class tag)", "solid3"), ("kept, background", "solid2"),
             ("NMS-suppressed", "dash"), ("suppressed, harder than kept", "dashx"),
             ("scored, not kept", "faint")]
    for text, style in items:
        bx = (x, y + 2, x + 34, y + 16)
        if style.startswith("solid"):
            draw.rectangle(bx, outline=c, width=int(style[-1]))
        elif style == "dash":
            dashed_rectangle(draw, bx, (210, 210, 210), 1, dash=5, gap=3)
        elif style == "dashx":
            dashed_rectangle(draw, bx, c, 2, dash=5, gap=3)
            draw.line((x + 12, y + 4, x + 22, y + 14), fill=c, width=2)
            draw.line((x + 12, y + 14, x + 22, y + 4), fill=c, width=2)
        else:
            draw.rectangle(bx, outline=(140, 140, 140), width=1)
        draw.text((x + 44, y + 1), text, font=small, fill=(255, 255, 255))
        y += 24
    y += 14

    draw.text((x, y), "kept / scored, by class", font=font, fill=(0, 0, 0))
    y += 22
    present = np.unique(labels)
    rows = sorted(present, key=lambda k: (-(kept & (labels == k)).sum(), k))
    for k in rows[:10]:
        name = "background" if k == 0 else _class_name(classes, int(k))
        draw.text((x, y), f"{name}", font=small, fill=(0, 0, 0))
        draw.text((x + 150, y), f"{int((kept & (labels == k)).sum())} / {int((labels == k).sum())}",
                  font=small, fill=(0, 0, 0))
        y += 17
    if len(rows) > 10:
        draw.text((x, y), f"... {len(rows) - 10} more classes", font=small, fill=(90, 90, 90))
        y += 17
    y += 10
    draw.text((x, y), "hardest kept", font=font, fill=(0, 0, 0))
    y += 22
    for line in hardest:
        draw.text((x, y), line, font=small, fill=(0, 0, 0))
        y += 17
    y += 10
    draw.text((x, y), settings, font=small, fill=(90, 90, 90))
    y += 24
    for note in notes:
        for line in _wrap(note, 38):
            draw.text((x, y), line, font=small, fill=(150, 30, 30))
            y += 16


def _wrap(text: str, width: int) -> list[str]:
    words, lines, cur = str(text).split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return lines + ([cur] if cur else [])
