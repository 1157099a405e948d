"""Render one synthetic H&E slide (level 0 at 0.5 µm/px) whose look is decided by hidden variables.

Colour follows Beer-Lambert: RGB = 255 * exp(-(glass + tissue * (H * h_od + E * e_od))), with a haematoxylin
density H (nuclei, purple) and an eosin density E (stroma and cytoplasm, pink), each slide with its own stain
strengths so colour alone is a nuisance, not a cue.

Hidden variables and where they show (so later stages must *learn* them):
- label: "benign" has no tumour; "ductal" adds cohesive nests of large, dark, round nuclei; "lobular" adds
  single-file chains of medium, dark nuclei. Tumour lives only in a few regions (union of discs within tissue,
  10-35 % of it), so the slide label is a multiple-instance problem.
- grade 1-3: shown everywhere in the stroma: fine ordered collagen fibres (1) to coarse disordered myxoid stroma
  with dense lymphocytic infiltrate (3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LABELS = ("benign", "ductal", "lobular")
GRADES = (1, 2, 3)
MASK_DS = 8  # masks kept at 1/8 of level 0 (4 µm/px): enough to place structures and pick ROI tiles
_PAD = 32  # canvas margin so nucleus stamps never need clipping
H_OD = np.array([0.95, 1.15, 0.42], np.float32)  # haematoxylin optical density per unit (R, G, B)
E_OD = np.array([0.06, 0.62, 0.26], np.float32)  # eosin
_GLASS_OD = np.array([0.035, 0.04, 0.035], np.float32)

# Stroma per grade: fibre period (px), fibre contrast, fibre warp (radians: disorder), myxoid patchiness,
# lymphocytes per 10,000 px² of tissue.
_GRADE_STROMA = {
    1: dict(period=8.0, contrast=0.8, warp=2.0, myxoid=0.0, lymph=0.1),
    2: dict(period=13.0, contrast=0.45, warp=7.0, myxoid=0.3, lymph=1.5),
    3: dict(period=20.0, contrast=0.12, warp=16.0, myxoid=0.6, lymph=5.0),
}
# Nucleus kinds: radius range (px), elongation, contour irregularity, density, vesicular rim, nucleolus.
_NUCLEI = {
    "lymph": dict(r=(3.2, 4.2), elong=1.0, irreg=0.03, dens=1.5, rim=0.0, nucleolus=False),
    "fibro": dict(r=(2.2, 2.8), elong=2.8, irreg=0.05, dens=0.9, rim=0.0, nucleolus=False),
    "epi": dict(r=(4.0, 5.0), elong=1.25, irreg=0.04, dens=0.85, rim=0.0, nucleolus=False),
    "ductal": dict(r=(7.5, 11.0), elong=1.2, irreg=0.09, dens=1.3, rim=0.3, nucleolus=True),
    "lobular": dict(r=(5.5, 7.0), elong=1.1, irreg=0.04, dens=1.15, rim=0.0, nucleolus=False),
}


@dataclass
class Rendered:
    """A rendered slide: level-0 RGB and the masks/geometry that define its hidden regions."""

    rgb: np.ndarray  # (height, width, 3) uint8, level 0
    tissue: np.ndarray  # (height/MASK_DS, width/MASK_DS) float32 tissue fraction per mask cell
    tumour: np.ndarray  # same shape, tumour fraction per mask cell
    discs: list[list[int]]  # tumour region = union of these [x, y, r] discs (level 0) within tissue
    stain: dict[str, float]
    tissue_fraction: float
    tumour_fraction: float  # of the tissue


class Noise:
    """Band-limited noise (about N(0, 1)) varying over `cell` px: a coarse random grid smoothed by a cubic
    B-spline. Separable, so any block of rows costs one small matrix product (no full-size temporaries)."""

    def __init__(self, rng: np.random.Generator, h: int, w: int, cell: int, grid: np.ndarray | None = None):
        """`grid`: smooth this (h // cell + 4, w // cell + 4) grid instead; pixel x then sits at grid x/cell + 1."""
        gh, gw = h // cell + 4, w // cell + 4
        g = rng.standard_normal((gh, gw)).astype(np.float32) * np.float32(2.086) if grid is None else grid
        sy, sx = (0.0, 0.0) if grid is not None else rng.uniform(0, 1, 2)
        self.rows = _bspline_matrix(h, g.shape[0], cell, sy)
        self.g_cols = g @ _bspline_matrix(w, g.shape[1], cell, sx).T

    def block(self, r0: int, r1: int) -> np.ndarray:
        return self.rows[r0:r1] @ self.g_cols

    def full(self) -> np.ndarray:
        return self.rows @ self.g_cols


def _bspline_matrix(n_out: int, n_in: int, cell: float, shift: float) -> np.ndarray:
    """(n_out, n_in) weights of cubic B-spline interpolation of a grid with knots every `cell` px."""
    x = np.arange(n_out, dtype=np.float64) / cell + shift
    i = np.floor(x).astype(int)
    f = (x - i).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    for k, wk in enumerate(((1 - f) ** 3 / 6, (3 * f**3 - 6 * f**2 + 4) / 6,
                            (-3 * f**3 + 3 * f**2 + 3 * f + 1) / 6, f**3 / 6)):
        np.add.at(m, (np.arange(n_out), np.clip(i + k, 0, n_in - 1)), wk)
    return m


def smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """A full (h, w) array of `Noise` (for small grids such as the mask grid)."""
    return Noise(rng, h, w, cell).full()


def _stamps(rng: np.random.Generator, kind: str, n: int = 24) -> list[np.ndarray]:
    """A bank of nucleus stamps (haematoxylin density): irregular ellipses with chromatin texture."""
    p = _NUCLEI[kind]
    out = []
    for _ in range(n):
        r0 = rng.uniform(*p["r"])
        half = int(np.ceil(r0 * p["elong"] * 1.35)) + 1
        yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
        t = rng.uniform(0, np.pi)
        u, v = xx * np.cos(t) + yy * np.sin(t), -xx * np.sin(t) + yy * np.cos(t)
        d = np.sqrt((u / p["elong"]) ** 2 + v ** 2)
        theta = np.arctan2(v, u)
        rad = r0 * (1 + sum(rng.normal(0, p["irreg"]) * np.cos(k * theta + rng.uniform(0, 6.3))
                            for k in (2, 3, 5)))
        edge = np.clip((rad - d) / 1.3 + 0.5, 0, 1)
        tex = 0.8 + 0.2 * rng.random(d.shape, dtype=np.float32)
        body = p["dens"] * tex * (1 - p["rim"] + p["rim"] * np.clip(d / rad, 0, 1) ** 2)
        if p["nucleolus"]:
            cy, cx = rng.normal(0, r0 * 0.25, 2)
            body = body + 0.9 * np.clip(1.8 - np.hypot(xx - cx, yy - cy), 0, 1)
        out.append((body * edge).astype(np.float32))
    return out


def _paste(canvas: np.ndarray, stamps: list[np.ndarray], xs: np.ndarray, ys: np.ndarray,
           rng: np.random.Generator) -> None:
    """Add stamps (chosen at random from the bank) centred at level-0 (x, y) onto the padded canvas."""
    ks = rng.integers(0, len(stamps), len(xs))
    gain = rng.uniform(0.75, 1.1, len(xs)).astype(np.float32)
    for x, y, k, f in zip((xs + _PAD).astype(int), (ys + _PAD).astype(int), ks, gain):
        st = stamps[k]
        h = st.shape[0] // 2
        canvas[y - h:y + h + 1, x - h:x + h + 1] += st * f


def _inside(mask: np.ndarray, xs: np.ndarray, ys: np.ndarray, thr: float = 0.5) -> np.ndarray:
    """Which level-0 points fall on mask cells with value >= thr."""
    my = np.minimum((ys // MASK_DS).astype(int), mask.shape[0] - 1)
    mx = np.minimum((xs // MASK_DS).astype(int), mask.shape[1] - 1)
    return mask[my, mx] >= thr


def _disc_mask(discs: list[list[int]], h: int, w: int) -> np.ndarray:
    """Union of level-0 discs rasterised on the mask grid (cell centres)."""
    yy = (np.arange(h, dtype=np.float32)[:, None] + 0.5) * MASK_DS
    xx = (np.arange(w, dtype=np.float32)[None, :] + 0.5) * MASK_DS
    m = np.zeros((h, w), bool)
    for x, y, r in discs:
        m |= (xx - x) ** 2 + (yy - y) ** 2 <= r * r
    return m


def _tissue_grid(rng: np.random.Generator, hp: int, wp: int, fraction: float) -> np.ndarray:
    """Irregular tissue islands on the (hp/16 + 4, wp/16 + 4) grid that `Noise` smooths onto the padded canvas:
    a few elliptical bumps plus noise, zero at the quantile leaving `fraction` on tissue, and pushed well below
    zero within a margin of the slide's edges (glass all round)."""
    h, w = hp // 16 + 4, wp // 16 + 4
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    f = np.zeros((h, w), np.float32)
    for _ in range(rng.integers(2, 6)):
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        sy, sx = rng.uniform(0.08, 0.25) * h, rng.uniform(0.08, 0.25) * w
        f += np.exp(-(((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2) / 2)
    f += 0.3 * smooth_noise(rng, h, w, 12) + 0.12 * smooth_noise(rng, h, w, 3)
    py, px = (yy - 1) * 16, (xx - 1) * 16  # canvas pixel of each grid node
    edge = np.minimum.reduce([py - _PAD, px - _PAD, hp - _PAD - py, wp - _PAD - px])
    border = np.clip(edge / (0.2 * min(hp, wp) + 24), 0, 1)
    f -= 3.0 * (1 - border) ** 2
    f[edge < 0.03 * min(hp, wp) + 16] = -10
    inside = edge > 0
    return (f - np.quantile(f[inside], 1 - fraction)).astype(np.float32)


def _tumour_discs(rng: np.random.Generator, tissue: np.ndarray, target: float) -> list[list[int]]:
    """1-3 tumour regions, each a cluster of discs centred on tissue, scaled to cover ~`target` of the tissue."""
    ys, xs = np.nonzero(tissue >= 0.9)
    if len(xs) == 0:
        return []
    base = []
    for _ in range(rng.integers(1, 4)):
        i = rng.integers(len(xs))
        cx, cy = (xs[i] + 0.5) * MASK_DS, (ys[i] + 0.5) * MASK_DS
        for _ in range(rng.integers(2, 6)):
            base.append([cx + rng.normal(0, 110), cy + rng.normal(0, 110), rng.uniform(0.6, 1.0)])
    on = tissue >= 0.5
    scale = 150.0
    for _ in range(4):  # fixed-point iterations on the radius scale to hit the target coverage
        discs = [[int(x), int(y), int(r * scale)] for x, y, r in base]
        cover = (_disc_mask(discs, *tissue.shape) & on).sum() / max(on.sum(), 1)
        scale *= float(np.clip(np.sqrt(target / max(cover, 1e-3)), 0.5, 2.0))
    return [[int(x), int(y), int(r * scale)] for x, y, r in base]


_ROWS = 64  # row block for the full-resolution passes (keeps temporaries in cache)


def render_slide(rng: np.random.Generator, label: str, grade: int, width: int, height: int) -> Rendered:
    """Draw one slide. `width`, `height` must be multiples of 16 (level 0 px at 0.5 µm/px)."""
    if label not in LABELS or grade not in GRADES or width % 16 or height % 16:
        raise ValueError(f"render_slide: bad label/grade/size {label!r}, {grade!r}, {width}x{height}")
    hp, wp = height + 2 * _PAD, width + 2 * _PAD
    mh, mw = height // MASK_DS, width // MASK_DS
    stain = dict(h=float(rng.uniform(0.6, 1.4)), e=float(rng.uniform(0.55, 1.45)),
                 h_blue=float(rng.uniform(-0.1, 0.1)), e_red=float(rng.uniform(-0.05, 0.05)))
    g = _GRADE_STROMA[grade]

    # tissue alpha (soft edges) and stroma eosin density: wavy collagen fibres whose size, order and
    # contrast are set by the grade; computed block by block from separable noise fields
    tissue_field = Noise(rng, hp, wp, 16, grid=_tissue_grid(rng, hp, wp, float(rng.uniform(0.3, 0.5))))
    warp, tex, myx = Noise(rng, hp, wp, 96), Noise(rng, hp, wp, 20), Noise(rng, hp, wp, 160)
    t0 = float(rng.uniform(0, np.pi))
    k = 2 * np.pi / g["period"]
    ramp_x = (np.arange(wp, dtype=np.float32) * np.float32(np.cos(t0) * k))[None, :]
    ramp_y = (np.arange(hp, dtype=np.float32) * np.float32(np.sin(t0) * k))[:, None]
    alpha = np.empty((hp, wp), np.float32)
    E = np.empty((hp, wp), np.float32)
    c = np.float32(g["contrast"] / 2)
    for r0 in range(0, hp, _ROWS):
        r1 = min(r0 + _ROWS, hp)
        t = tex.block(r0, r1)
        a = tissue_field.block(r0, r1)
        a += 0.06 * t
        np.clip(a * 30 + 0.5, 0, 1, out=alpha[r0:r1])
        ph = warp.block(r0, r1)
        ph *= np.float32(g["warp"])
        ph += ramp_x
        ph += ramp_y[r0:r1]
        e = np.sin(ph, out=ph)
        e *= c
        e += 1 - c
        e *= 0.85 + 0.1 * t
        if g["myxoid"]:
            e *= 1 - np.float32(g["myxoid"]) * np.clip(myx.block(r0, r1), 0, 1)
        E[r0:r1] = e
    alpha[:_PAD] = alpha[-_PAD:] = alpha[:, :_PAD] = alpha[:, -_PAD:] = 0
    tissue = alpha[_PAD:-_PAD, _PAD:-_PAD].reshape(mh, MASK_DS, mw, MASK_DS).mean(axis=(1, 3))
    H = np.full((hp, wp), 0.04 + 0.1 * g["myxoid"], np.float32)  # faint basophilic ground substance

    # tumour regions and normal ducts
    discs = _tumour_discs(rng, tissue, float(rng.uniform(0.1, 0.35))) if label != "benign" else []
    tum = (_disc_mask(discs, mh, mw).astype(np.float32) * tissue) if discs else np.zeros_like(tissue)
    normal = np.where(tum > 0, 0, tissue)
    _ducts(rng, H, E, normal)
    _aggregates(rng, H, normal)
    if label == "ductal":
        _ductal(rng, H, E, tum)
    elif label == "lobular":
        _lobular(rng, H, tum, t0)

    # stromal cells everywhere on tissue: fibroblasts and (grade-dependent, clustered) lymphocytes
    cluster = np.clip(0.55 + 0.25 * smooth_noise(rng, mh, mw, 16), 0.2, 1)  # mild patchiness
    for kind, per_px in (("fibro", 1.6e-4), ("lymph", g["lymph"] * 1e-4)):
        n = int(height * width * per_px * 2)
        xs, ys = rng.uniform(0, width, n), rng.uniform(0, height, n)
        keep = _inside(tissue, xs, ys, 0.6)
        p = cluster[(ys // MASK_DS).astype(int), (xs // MASK_DS).astype(int)] if kind == "lymph" else 0.5
        keep &= rng.random(n) < p
        _paste(H, _stamps(rng, kind), xs[keep], ys[keep], rng)

    inner = (slice(_PAD, -_PAD), slice(_PAD, -_PAD))
    rgb = _compose(H[inner], E[inner], alpha[inner], stain)
    on = tissue >= 0.5
    return Rendered(rgb=rgb, tissue=tissue, tumour=tum, discs=discs, stain=stain,
                    tissue_fraction=float(on.mean()),
                    tumour_fraction=float(((tum >= 0.5) & on).sum() / max(on.sum(), 1)))


def _window(c: np.ndarray, x: float, y: float, r: float):
    """Slice of the padded canvas around level-0 (x, y) and the distances of its pixels from that point."""
    x0, y0 = int(x - r) + _PAD, int(y - r) + _PAD
    x1, y1 = int(x + r) + 1 + _PAD, int(y + r) + 1 + _PAD
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, c.shape[1]), min(y1, c.shape[0])
    yy = np.arange(y0, y1, dtype=np.float32)[:, None] - _PAD - y
    xx = np.arange(x0, x1, dtype=np.float32)[None, :] - _PAD - x
    return (slice(y0, y1), slice(x0, x1)), np.sqrt(xx * xx + yy * yy)


def _free_spots(rng, mask, n, radius, spacing, thr=0.95):
    """Up to n non-overlapping level-0 discs (x, y, r) lying on the mask (vectorised rejection sampling)."""
    ys, xs = np.nonzero(mask >= thr)
    if len(xs) == 0:
        return []
    m = n * 8
    i = rng.integers(len(xs), size=m)
    x, y = (xs[i] + rng.random(m)) * MASK_DS, (ys[i] + rng.random(m)) * MASK_DS
    r = rng.uniform(*radius, m)
    ok = np.ones(m, bool)
    for dx, dy in ((-1, 0), (1, 0), (0, -1), (0, 1), (0.7, 0.7), (-0.7, -0.7), (0.7, -0.7), (-0.7, 0.7)):
        px, py = x + dx * r, y + dy * r
        inside = (px >= 0) & (py >= 0) & (px < mask.shape[1] * MASK_DS) & (py < mask.shape[0] * MASK_DS)
        ok &= inside & _inside(mask, px, py, thr)
    pts = np.zeros((0, 3))
    for cand in np.stack([x, y, r], 1)[ok]:
        if ((pts[:, 0] - cand[0]) ** 2 + (pts[:, 1] - cand[1]) ** 2 > (pts[:, 2] + cand[2] + spacing) ** 2).all():
            pts = np.vstack([pts, cand])
            if len(pts) == n:
                break
    return [tuple(p) for p in pts]


def _ducts(rng, H, E, normal):
    """Normal ducts: a white lumen lined by a ring of small epithelial nuclei and flat myoepithelial cells."""
    epi, myo = _stamps(rng, "epi"), _stamps(rng, "fibro")
    n = int(normal.sum() * MASK_DS**2 / 120_000) + 1
    for x, y, rl in _free_spots(rng, normal, n, (12, 30), 40):
        win, d = _window(H, x, y, rl + 16)
        E[win] = np.where(d < rl, 0.06, np.where(d < rl + 11, 0.45 + 0.3 * E[win], E[win]))
        H[win] = np.where(d < rl, 0.0, np.where(d < rl + 11, H[win] + 0.06, H[win]))
        for ring, bank, gap in ((rl + 5.5, epi, 9.5), (rl + 12.5, myo, 12.0)):
            a = np.arange(0, 2 * np.pi, gap / ring) + rng.uniform(0, 1)
            _paste(H, bank, x + ring * np.cos(a) + rng.normal(0, 0.7, a.size),
                   y + ring * np.sin(a) + rng.normal(0, 0.7, a.size), rng)


def _aggregates(rng, H, normal):
    """Benign lymphoid aggregates: dense clusters of small dark lymphocytes, as purple as tumour at a glance
    (a distractor for the label, and not graded)."""
    bank = _stamps(rng, "lymph")
    n = int(normal.sum() * MASK_DS**2 / 400_000) + 1
    for x, y, r in _free_spots(rng, normal, n, (25, 55), 30):
        m = int(r * r * 0.06)
        a, d = rng.uniform(0, 2 * np.pi, m), r * np.sqrt(rng.random(m))
        _paste(H, bank, x + d * np.cos(a), y + d * np.sin(a), rng)


def _ductal(rng, H, E, tum):
    """Invasive ductal pattern: cohesive nests of large, dark, pleomorphic nuclei in purple-pink cytoplasm."""
    bank = _stamps(rng, "ductal", 32)
    n = int(tum.sum() * MASK_DS**2 / 6000) + 1
    for x, y, r in _free_spots(rng, tum, n, (28, 70), 10, thr=0.5):
        win, d = _window(H, x, y, r + 2)
        inner = np.clip(r - d, 0, 1)
        E[win] = E[win] * (1 - inner) + inner * 0.42
        H[win] += inner * 0.14
        step = 21.0
        gy, gx = np.mgrid[-r:r:step * 0.87, -r:r:step]
        gx = gx + (np.arange(gx.shape[0])[:, None] % 2) * step / 2
        keep = gx**2 + gy**2 < (r - 6) ** 2
        xs, ys = x + gx[keep] + rng.normal(0, 2.5, keep.sum()), y + gy[keep] + rng.normal(0, 2.5, keep.sum())
        _paste(H, bank, xs, ys, rng)


def _lobular(rng, H, tum, t0):
    """Invasive lobular pattern: discohesive single-file chains of medium, dark, round nuclei."""
    bank = _stamps(rng, "lobular", 24)
    ys, xs = np.nonzero(tum >= 0.5)
    if len(xs) == 0:
        return
    n_chains = int(len(xs) * MASK_DS**2 / 4500)
    i = rng.integers(len(xs), size=n_chains)
    sx, sy = (xs[i] + rng.random(n_chains)) * MASK_DS, (ys[i] + rng.random(n_chains)) * MASK_DS
    theta = t0 + rng.normal(0, 0.35, n_chains)
    k = np.arange(12)[None, :]
    bend = rng.normal(0, 0.05, (n_chains, 1)) * k
    cx = sx[:, None] + 14.0 * k * np.cos(theta[:, None] + bend)
    cy = sy[:, None] + 14.0 * k * np.sin(theta[:, None] + bend)
    length = rng.integers(4, 12, (n_chains, 1))
    keep = (k < length).ravel()
    cx, cy = cx.ravel()[keep], cy.ravel()[keep]
    keep = (cx >= 0) & (cy >= 0) & (cx < tum.shape[1] * MASK_DS) & (cy < tum.shape[0] * MASK_DS)
    cx, cy = cx[keep], cy[keep]
    keep = _inside(tum, cx, cy, 0.5)
    _paste(H, bank, cx[keep] + rng.normal(0, 1.2, keep.sum()), cy[keep] + rng.normal(0, 1.2, keep.sum()), rng)


def _compose(H: np.ndarray, E: np.ndarray, alpha: np.ndarray, stain: dict[str, float]) -> np.ndarray:
    """Beer-Lambert mixing of the stain densities into uint8 RGB, with the slide's own stain strengths."""
    h_od = H_OD * stain["h"] + np.array([0, 0, stain["h_blue"]], np.float32)
    e_od = E_OD * stain["e"] + np.array([stain["e_red"], 0, 0], np.float32)
    log_white = np.float32(np.log(255.0)) - _GLASS_OD
    out = np.empty(H.shape + (3,), np.uint8)
    for r0 in range(0, H.shape[0], _ROWS):
        a = alpha[r0:r0 + _ROWS]
        h = np.minimum(H[r0:r0 + _ROWS], 2.2)
        h *= a
        e = E[r0:r0 + _ROWS] * a
        for ch in range(3):
            od = h * -h_od[ch]
            od -= e * e_od[ch]
            od += log_white[ch]
            out[r0:r0 + _ROWS, :, ch] = np.exp(od, out=od)
    return out
