"""The built-in mini-VOC: a small detection dataset in the exact VOCdevkit + Fast R-CNN formats.

``make_minivoc(dir, seed, num_images)`` writes ``dir/VOCdevkit/VOC2007/{JPEGImages, Annotations,
ImageSets/Main/{trainval,test}.txt}`` and ``dir/selective_search_data/voc_2007_{trainval,test}.mat``,
so every reader code path is the real one (``get_imdb("voc_2007_trainval", dir)``).

The problem is built so that mining matters: six VOC classes drawn as distinct shapes with their
own colours and textures, on cluttered backgrounds with object-like distractors (class shapes
with the wrong texture, class textures in the wrong shape), objects cut by the border
(truncated) and small or half-hidden ones (difficult). Proposals imitate selective search's IoU
profile: boxes jittered around objects at several strengths (some >= 0.5, some in [0.1, 0.5)),
boxes on distractors and object parts (hard negatives) and many random boxes (easy background),
300-500 per image. Everything is drawn from one ``np.random.RandomState(seed)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from readonly_ohem.datasets.proposals import save_proposals_mat

# class -> (shape, RGB colour, texture, typical aspect w/h)
CLASSES = {
    "aeroplane": ("cross", (150, 165, 200), "solid", 1.6),
    "bird": ("bird", (210, 120, 40), "dots", 1.0),
    "bottle": ("bottle", (40, 150, 60), "stripes_v", 0.42),
    "car": ("car", (200, 40, 40), "solid", 1.9),
    "cat": ("cat", (220, 190, 90), "stripes_d", 1.0),
    "tvmonitor": ("tv", (60, 60, 70), "stripes_h", 1.3),
}
DISTRACTOR_SHAPES = ("ellipse", "rect", "triangle", "diamond")
TEXTURES = ("solid", "dots", "stripes_v", "stripes_h", "stripes_d", "checker")
DEFAULT_IMAGES = 100  # 60 trainval + 40 test
TRAINVAL_FRACTION = 0.6


def _mask(shape: str, w: int, h: int) -> Image.Image:
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    W, H = w - 1, h - 1
    if shape == "cross":  # fuselage, wings, tail
        d.rectangle([0, 0.38 * H, W, 0.62 * H], fill=255)
        d.polygon([(0.35 * W, 0), (0.55 * W, 0), (0.5 * W, H), (0.35 * W, H)], fill=255)
        d.rectangle([0.9 * W, 0.15 * H, W, 0.62 * H], fill=255)
    elif shape == "bird":
        d.polygon([(0, 0.9 * H), (0.75 * W, 0.25 * H), (0.8 * W, H)], fill=255)
        d.ellipse([0.62 * W, 0, W, 0.42 * H], fill=255)
    elif shape == "bottle":
        d.rectangle([0, 0.35 * H, W, H], fill=255)
        d.rectangle([0.3 * W, 0, 0.7 * W, 0.38 * H], fill=255)
    elif shape == "car":
        d.rectangle([0, 0.3 * H, W, 0.8 * H], fill=255)
        d.rectangle([0.25 * W, 0, 0.75 * W, 0.35 * H], fill=255)
        for cx in (0.22 * W, 0.78 * W):
            d.ellipse([cx - 0.13 * W, 0.6 * H, cx + 0.13 * W, H], fill=255)
    elif shape == "cat":
        d.ellipse([0, 0.22 * H, W, H], fill=255)
        d.polygon([(0.1 * W, 0.45 * H), (0.2 * W, 0), (0.4 * W, 0.3 * H)], fill=255)
        d.polygon([(0.6 * W, 0.3 * H), (0.8 * W, 0), (0.9 * W, 0.45 * H)], fill=255)
    elif shape in ("tv", "rect"):
        d.rectangle([0, 0, W, H], fill=255)
    elif shape == "ellipse":
        d.ellipse([0, 0, W, H], fill=255)
    elif shape == "triangle":
        d.polygon([(0, H), (W / 2, 0), (W, H)], fill=255)
    elif shape == "diamond":
        d.polygon([(W / 2, 0), (W, H / 2), (W / 2, H), (0, H / 2)], fill=255)
    return m


def _texture(kind: str, colour, w: int, h: int, rng) -> np.ndarray:
    c = np.array(colour, dtype=np.float32) + rng.uniform(-20, 20, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    period = rng.randint(5, 10)
    if kind == "solid":
        on = np.zeros((h, w), bool)
    elif kind == "dots":
        on = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (period / 3.5) ** 2
    elif kind == "stripes_v":
        on = (xx // (period // 2 + 1)) % 2 == 0
    elif kind == "stripes_h":
        on = (yy // (period // 2 + 1)) % 2 == 0
    elif kind == "stripes_d":
        on = ((xx + yy) // (period // 2 + 1)) % 2 == 0
    else:  # checker
        on = ((xx // period) + (yy // period)) % 2 == 0
    img = np.broadcast_to(c, (h, w, 3)).copy()
    img[on] = img[on] * 0.45 + 20
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _paint(canvas: Image.Image, shape: str, colour, texture: str, box, rng) -> None:
    """Draw a textured shape into box (x1, y1, x2, y2) (may extend beyond the canvas)."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1 + 1, y2 - y1 + 1
    mask = _mask(shape, w, h)
    tex = Image.fromarray(_texture(texture, colour, w, h, rng))
    if shape == "tv":  # dark frame, textured screen
        frame = Image.new("RGB", (w, h), tuple(int(v) for v in rng.randint(10, 50, 3)))
        inner = Image.new("L", (w, h), 0)
        bw = max(2, int(0.12 * min(w, h)))
        ImageDraw.Draw(inner).rectangle([bw, bw, w - 1 - bw, h - 1 - bw], fill=255)
        frame.paste(Image.fromarray(_texture("stripes_h", (90, 160, 230), w, h, rng)), (0, 0), inner)
        tex = frame
    canvas.paste(tex, (x1, y1), mask)
    if shape == "car":  # black wheels
        d = ImageDraw.Draw(canvas)
        for cx in (0.22, 0.78):
            cxp, r = x1 + cx * (w - 1), 0.1 * (w - 1)
            d.ellipse([cxp - r, y1 + 0.64 * (h - 1), cxp + r, y2], fill=(15, 15, 15))


def _background(w: int, h: int, rng) -> Image.Image:
    base = rng.randint(60, 200, 3).astype(np.float32)
    grad = rng.uniform(-50, 50, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    t = (xx / w * rng.uniform(-1, 1) + yy / h * rng.uniform(-1, 1))[..., None]
    img = base + grad * t + rng.normal(0, 12, (h, w, 3))
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(canvas)
    for _ in range(rng.randint(8, 20)):  # clutter: lines and small blobs
        col = tuple(int(v) for v in rng.randint(0, 255, 3))
        x, y = rng.randint(0, w), rng.randint(0, h)
        if rng.rand() < 0.5:
            d.line([x, y, x + rng.randint(-80, 80), y + rng.randint(-80, 80)], fill=col, width=int(rng.randint(1, 4)))
        else:
            r = rng.randint(3, 12)
            d.ellipse([x - r, y - r, x + r, y + r], fill=col)
    return canvas


def _rand_box(w, h, size, aspect, rng, allow_out=False):
    bw = int(np.clip(size * np.sqrt(aspect), 8, 2 * w))
    bh = int(np.clip(size / np.sqrt(aspect), 8, 2 * h))
    lo_x, lo_y = (-bw // 2, -bh // 2) if allow_out else (0, 0)
    hi_x, hi_y = (w - bw // 2, h - bh // 2) if allow_out else (max(1, w - bw), max(1, h - bh))
    x1, y1 = rng.randint(lo_x, hi_x), rng.randint(lo_y, hi_y)
    return (int(x1), int(y1), int(x1 + bw - 1), int(y1 + bh - 1))


def _clip(box, w, h):
    x1, y1, x2, y2 = box
    return (max(0, x1), max(0, y1), min(w - 1, x2), min(h - 1, y2))


def make_image(rng, index: int):
    """One image: (PIL image, objects [{name, box (0-based), difficult, truncated}], distractor boxes)."""
    w, h = int(rng.randint(200, 321)), int(rng.randint(200, 321))
    canvas = _background(w, h, rng)
    names = list(CLASSES)
    objects, distractors = [], []
    n_items = rng.randint(2, 6)
    order = ["obj"] * rng.randint(1, 4) + ["dis"] * n_items
    rng.shuffle(order)
    for kind in order:
        if kind == "dis":
            if rng.rand() < 0.5:  # a class shape with a foreign texture / colour
                shape = CLASSES[names[rng.randint(len(names))]][0]
                shape = "rect" if shape == "tv" else shape
            else:
                shape = DISTRACTOR_SHAPES[rng.randint(len(DISTRACTOR_SHAPES))]
            colour = rng.randint(0, 255, 3)
            tex = TEXTURES[rng.randint(len(TEXTURES))]
            box = _rand_box(w, h, rng.uniform(30, 110), rng.uniform(0.5, 2.0), rng)
            _paint(canvas, shape, colour, tex, box, rng)
            distractors.append(_clip(box, w, h))
            continue
        name = names[rng.randint(len(names))]
        shape, colour, tex, aspect = CLASSES[name]
        small = rng.rand() < 0.12
        size = rng.uniform(14, 22) if small else rng.uniform(45, 150)
        box = _rand_box(w, h, size, aspect * rng.uniform(0.85, 1.2), rng, allow_out=rng.rand() < 0.25)
        _paint(canvas, shape, colour, tex, box, rng)
        clipped = _clip(box, w, h)
        if clipped[2] - clipped[0] < 6 or clipped[3] - clipped[1] < 6:
            continue
        truncated = clipped != box
        vis = (clipped[2] - clipped[0] + 1) * (clipped[3] - clipped[1] + 1) / ((box[2] - box[0] + 1) * (box[3] - box[1] + 1))
        objects.append(dict(name=name, box=clipped, truncated=truncated, difficult=small or vis < 0.35))
    return canvas, objects, distractors


def _jitter(box, strength, w, h, rng, n):
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1 + 1, y2 - y1 + 1
    cx, cy = x1 + bw / 2, y1 + bh / 2
    cx = cx + rng.normal(0, strength, n) * bw
    cy = cy + rng.normal(0, strength, n) * bh
    nw = bw * np.exp(rng.normal(0, strength * 1.5, n))
    nh = bh * np.exp(rng.normal(0, strength * 1.5, n))
    return np.stack([cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2], 1)


def make_proposals(objects, distractors, w, h, rng) -> np.ndarray:
    """(K, 4) float64 0-based integer boxes, K in [300, 500], selective-search-like IoU profile."""
    target = int(rng.randint(300, 501))
    parts = []
    for o in objects:
        for strength, n in ((0.04, 4), (0.1, 7), (0.25, 12), (0.5, 12)):
            parts.append(_jitter(o["box"], strength, w, h, rng, n))
        x1, y1, x2, y2 = o["box"]  # halves and quarters of the object: partial views
        mx, my = (x1 + x2) // 2, (y1 + y2) // 2
        parts.append(np.array([[x1, y1, mx, y2], [mx, y1, x2, y2], [x1, y1, x2, my], [x1, my, x2, y2],
                               [x1, y1, mx, my], [mx, my, x2, y2]], dtype=np.float64))
    for d in distractors:
        for strength, n in ((0.05, 8), (0.2, 10)):
            parts.append(_jitter(d, strength, w, h, rng, n))
    n_fixed = sum(p.shape[0] for p in parts)
    n_rand = max(50, target - n_fixed)
    size = np.exp(rng.uniform(np.log(12), np.log(max(w, h)), (n_rand, 2)))
    xy = rng.uniform(0, 1, (n_rand, 2)) * np.array([w, h])
    parts.append(np.concatenate([xy - size / 2, xy + size / 2], 1))
    boxes = np.round(np.concatenate(parts))
    boxes[:, (0, 2)] = np.clip(boxes[:, (0, 2)], 0, w - 1)
    boxes[:, (1, 3)] = np.clip(boxes[:, (1, 3)], 0, h - 1)
    boxes = boxes[(boxes[:, 2] - boxes[:, 0] >= 4) & (boxes[:, 3] - boxes[:, 1] >= 4)]
    perm = rng.permutation(boxes.shape[0])  # selective search's order is not by quality
    return boxes[perm][:500]


def _xml(image_id: str, w: int, h: int, objects) -> str:
    lines = ["<annotation>", "\t<folder>VOC2007</folder>", f"\t<filename>{image_id}.jpg</filename>",
             "\t<source><database>readonly-ohem mini-VOC</database></source>",
             f"\t<size><width>{w}</width><height>{h}</height><depth>3</depth></size>",
             "\t<segmented>0</segmented>"]
    for o in objects:
        x1, y1, x2, y2 = o["box"]
        lines += ["\t<object>", f"\t\t<name>{o['name']}</name>", "\t\t<pose>Unspecified</pose>",
                  f"\t\t<truncated>{int(o['truncated'])}</truncated>",
                  f"\t\t<difficult>{int(o['difficult'])}</difficult>",
                  f"\t\t<bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin>"
                  f"<xmax>{x2 + 1}</xmax><ymax>{y2 + 1}</ymax></bndbox>", "\t</object>"]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def make_minivoc(dir, seed: int = 0, num_images: int = DEFAULT_IMAGES, verbose: bool = True) -> Path:
    """Write the mini-VOC under ``dir`` (trainval = 60% of ``num_images``, test the rest); returns dir."""
    if num_images < 2:
        raise ValueError("num_images must be at least 2 (one trainval and one test image)")
    root = Path(dir)
    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    n_train = min(num_images - 1, max(1, int(round(TRAINVAL_FRACTION * num_images))))
    splits = {"trainval": [], "test": []}
    props = {"trainval": [], "test": []}
    for k in range(num_images):
        split = "trainval" if k < n_train else "test"
        image_id = f"{k + 1:06d}"
        while True:  # every image has at least one non-difficult object
            img, objects, distractors = make_image(rng, k)
            if any(not o["difficult"] for o in objects):
                break
        img.save(voc / "JPEGImages" / f"{image_id}.jpg", quality=92)
        (voc / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, img.width, img.height, objects))
        splits[split].append(image_id)
        props[split].append(make_proposals(objects, distractors, img.width, img.height, rng))
        if verbose and ((k + 1) % 20 == 0 or k + 1 == num_images):
            print(f"mini-VOC: {k + 1}/{num_images} images", flush=True)
    for split, ids in splits.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        save_proposals_mat(root / "selective_search_data" / f"voc_2007_{split}.mat", props[split])
    if verbose:
        print(f"mini-VOC written to {root} ({len(splits['trainval'])} trainval, {len(splits['test'])} test, "
              f"seed {seed})")
    return root
