"""The 3-D thorax of the paired-view phantom and its analytic projection.

A study is one patient built from convex primitives in patient coordinates (cm; +x =
patient's left, +y = anterior, +z = cranial): ellipsoids and flat-capped elliptic
cylinders. Nothing is voxelised. Every detector pixel is one ray from the X-ray source,
and a ray meets a convex primitive in one interval [t0, t1] that a quadratic (and, for a
cylinder, a slab) gives in closed form. The line integral of attenuation is then a sum
of chord lengths times densities, with two pieces of interval arithmetic where plain
sums would be wrong:

* the body is the *union* of trunk, neck, shoulders, breasts and arms (overlaps must
  not count twice): sort the intervals by start, keep what extends past the running
  maximum end;
* a lung is its ellipsoid *minus* the diaphragm domes, heart, mediastinum and aorta:
  len(L) - len(union of L n carve_i); the intersection of convex sets along a ray is
  again one interval (max of starts, min of ends).

Findings live in the same 3-D coordinates (a nodule at a 3-D point, fluid in the
dependent lung, a bigger heart), so they show consistently in the frontal and the
lateral projection. Densities are in "tissue-equivalent" units (soft tissue = 1, lung
parenchyma = 0.25, bone cortex ~ 2, metal ~ 30) times MU_TISSUE per cm.

The per-pixel work is vectorised numpy: large shapes on their bounding box, hundreds of
small primitives (ribs, vertebrae, vessels, wires) flattened into one list of
(primitive, pixel) pairs and scattered with ``np.bincount``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

MU_TISSUE = 0.2  # 1/cm: water-like soft tissue at ~60 keV effective energy
LUNG = -0.75  # lung parenchyma is about a quarter as dense as soft tissue
FOV_CM = 43.0  # a 43 x 43 cm detector, as for real chest radiographs

FINDINGS = ("nodule", "mass", "effusion", "cardiomegaly", "consolidation", "pneumothorax", "devices")
DEFAULT_FINDING_RATES: dict[str, float] = {
    "nodule": 0.07,
    "mass": 0.03,
    "effusion": 0.20,
    "cardiomegaly": 0.18,
    "consolidation": 0.10,
    "pneumothorax": 0.05,
    "devices": 0.25,
}
# finding -> CheXpert labels it makes positive
FINDING_LABELS: dict[str, tuple[str, ...]] = {
    "nodule": ("Lung Lesion",),
    "mass": ("Lung Lesion", "Lung Opacity"),
    "effusion": ("Pleural Effusion",),
    "cardiomegaly": ("Cardiomegaly",),
    "consolidation": ("Consolidation", "Lung Opacity"),
    "pneumothorax": ("Pneumothorax",),
    "devices": ("Support Devices",),
    # the one-view findings (CROSS_VIEW_FINDINGS below)
    "retrocardiac_opacity": ("Atelectasis",),
    "posterior_effusion": ("Pleural Effusion",),
    "apical_pneumothorax": ("Pneumothorax",),
}
# Findings a reader sees in one view only (``fastssl phantom --findings cross-view``). The
# projection is analytic, so anything placed in 3-D shows in both projections; these are
# drawn only into the view where a radiologist sees them, standing for the obscuration
# that hides them in the other one:
#   retrocardiac_opacity: left-lower-lobe collapse behind the heart; on the frontal it
#     hides in the cardiac shadow, on the lateral it whitens the lower spine ("spine sign").
#   posterior_effusion: a small effusion in the posterior costophrenic recess, the
#     lowest point of the erect pleura; it blunts that recess on the lateral long before
#     (~200 mL) it reaches the lateral angle on the frontal.
#   apical_pneumothorax: a small apical pneumothorax; on the frontal the pleural line
#     shows over the apex, on the lateral the two apices overlap the shoulders and arms.
# Their draws come after the standard findings' (see draw_findings), so the standard
# phantom is the same, byte for byte, whether or not they exist.
CROSS_VIEW_FINDINGS = ("retrocardiac_opacity", "posterior_effusion", "apical_pneumothorax")
ALL_FINDINGS = FINDINGS + CROSS_VIEW_FINDINGS
BOTH_VIEWS = ("frontal", "lateral")
# finding -> the views it is drawn into
FINDING_VIEWS: dict[str, tuple[str, ...]] = {
    **{f: BOTH_VIEWS for f in FINDINGS},
    "retrocardiac_opacity": ("lateral",),
    "posterior_effusion": ("lateral",),
    "apical_pneumothorax": ("frontal",),
}
FINDING_SETS = ("standard", "cross-view")
# The prevalences of each finding set. cross-view replaces the two-view effusion and
# pneumothorax by their one-view forms, so that every label has one visibility.
FINDING_SET_RATES: dict[str, dict[str, float]] = {
    "standard": {**DEFAULT_FINDING_RATES, **{f: 0.0 for f in CROSS_VIEW_FINDINGS}},
    "cross-view": {**DEFAULT_FINDING_RATES, "effusion": 0.0, "pneumothorax": 0.0,
                   "retrocardiac_opacity": 0.15, "posterior_effusion": 0.20, "apical_pneumothorax": 0.10},
}


def label_visibility(finding_set: str = "standard") -> dict[str, str]:
    """CheXpert label -> "frontal" | "lateral" | "both": the views in which the findings
    that make the label positive are drawn, over the findings ``finding_set`` draws.

    "No Finding" is "both" (it is the absence of every other label); labels that no
    finding of the set makes positive are left out.
    """
    if finding_set not in FINDING_SETS:
        raise ValueError(f"--findings {finding_set!r}; expected one of {FINDING_SETS}")
    views: dict[str, set[str]] = {}
    for finding, rate in FINDING_SET_RATES[finding_set].items():
        if rate > 0:
            for label in FINDING_LABELS[finding]:
                views.setdefault(label, set()).update(FINDING_VIEWS[finding])
    out = {label: "both" if v == set(BOTH_VIEWS) else next(iter(v)) for label, v in sorted(views.items())}
    return dict(out, **{"No Finding": "both"})


FRONTAL_POSITIONS = ("PA", "AP")
LATERAL_POSITIONS = ("LATERAL", "LL")


# --------------------------------------------------------------------------- primitives
def _rot(ax: float = 0.0, ay: float = 0.0, az: float = 0.0) -> np.ndarray:
    """Rotation about x, then y, then z (radians)."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


class Prims:
    """A batch of convex primitives: {x : (x-c)^T A (x-c) <= 1 and |n.(x-c)| <= h}.

    Ellipsoids have a full-rank A and h = inf; cylinders a rank-2 A (the cross-section)
    and a finite slab along their axis n. ``ext`` is the half-size of the axis-aligned
    bounding box, used to find the pixels a primitive can touch.
    """

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, ...]] = []

    def ellipsoids(self, c, semi, rho, rot=None) -> "Prims":
        c = np.asarray(c, float).reshape(-1, 3)
        m = len(c)
        semi = np.broadcast_to(np.asarray(semi, float), (m, 3))
        r = np.broadcast_to(np.eye(3) if rot is None else np.asarray(rot, float), (m, 3, 3))
        a = np.einsum("mij,mj,mkj->mik", r, 1.0 / semi**2, r)
        ext = np.sqrt(np.einsum("mij,mj->mi", r**2, semi**2))
        n = np.tile([1.0, 0.0, 0.0], (m, 1))
        self._add(c, a, n, np.full(m, np.inf), rho, ext)
        return self

    def cylinders(self, p0, p1, ra, rb, rho, ref=(0.0, 0.0, 1.0), overlap: float = 0.0) -> "Prims":
        """Segments p0 -> p1 with elliptic cross-section: semi-axis ra along ``ref``
        (made perpendicular to the axis), rb along the third direction."""
        p0, p1 = np.asarray(p0, float).reshape(-1, 3), np.asarray(p1, float).reshape(-1, 3)
        m = len(p0)
        t = p1 - p0
        length = np.linalg.norm(t, axis=1)
        t = t / np.maximum(length, 1e-9)[:, None]
        ref = np.broadcast_to(np.asarray(ref, float), (m, 3))
        e1 = ref - np.sum(ref * t, axis=1, keepdims=True) * t
        bad = np.linalg.norm(e1, axis=1) < 1e-6  # ref parallel to the axis: any normal works
        e1[bad] = np.cross(t[bad], [0.3, 0.5, 0.81])
        e1 = _unit(e1)
        e2 = np.cross(t, e1)
        ra = np.broadcast_to(np.asarray(ra, float), (m,))
        rb = np.broadcast_to(np.asarray(rb, float), (m,))
        a = (e1[:, :, None] * e1[:, None, :]) / ra[:, None, None] ** 2 + (
            e2[:, :, None] * e2[:, None, :]
        ) / rb[:, None, None] ** 2
        h = length / 2 + overlap
        ext = np.abs(t) * h[:, None] + np.sqrt((ra[:, None] * e1) ** 2 + (rb[:, None] * e2) ** 2)
        self._add((p0 + p1) / 2, a, t, h, rho, ext)
        return self

    def tube(self, points, ra, rb, rho, ref=(0.0, 0.0, 1.0)) -> "Prims":
        """A polyline of cylinders; ``points`` (..., k, 3), ``ref`` per segment or one."""
        pts = np.asarray(points, float)
        p0 = pts[..., :-1, :].reshape(-1, 3)
        p1 = pts[..., 1:, :].reshape(-1, 3)
        ref = np.asarray(ref, float)
        if ref.ndim > 1:
            ref = ref.reshape(-1, 3)
        # a small overlap hides the wedge-shaped gaps at the bends
        return self.cylinders(p0, p1, np.ravel(ra) if np.ndim(ra) else ra,
                              np.ravel(rb) if np.ndim(rb) else rb, rho, ref, overlap=0.02)

    def _add(self, c, a, n, h, rho, ext) -> None:
        m = len(c)
        self.parts.append((c, a, n, h, np.broadcast_to(np.asarray(rho, float), (m,)).copy(), ext))

    def arrays(self) -> tuple[np.ndarray, ...]:
        if not self.parts:
            return tuple(np.zeros((0,) + s) for s in ((3,), (3, 3), (3,), (), (), (3,)))
        return tuple(np.concatenate([p[i] for p in self.parts]) for i in range(6))

    def __len__(self) -> int:
        return sum(len(p[0]) for p in self.parts)


def _one(prims: Prims) -> tuple[np.ndarray, ...]:
    c, a, n, h, rho, ext = prims.arrays()
    return c[0], a[0], n[0], h[0], rho[0], ext[0]


def _inside(points: np.ndarray, shape: tuple) -> np.ndarray:
    c, a, n, h = shape[:4]
    q = points - c
    inq = np.einsum("...i,ij,...j->...", q, a, q) <= 1.0
    if np.isfinite(h):
        inq &= np.abs(q @ n) <= h
    return inq


# --------------------------------------------------------------------------- geometry
@dataclass
class View:
    """One projection: source, detector and rays in patient coordinates."""

    S: np.ndarray  # (3,) source
    dx: np.ndarray  # (H, W) x of the source -> pixel centre vectors (t in [0, 1] spans them)
    dy: np.ndarray
    dz: np.ndarray
    L: np.ndarray  # (H, W) their lengths, cm per unit t
    O: np.ndarray  # detector centre
    eu: np.ndarray  # detector column direction
    ev: np.ndarray  # detector row-up direction
    en: np.ndarray  # detector normal
    pix: float  # detector pixel size, cm
    size: int

    def to_pixel(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, col) float coordinates where the rays through points ``x`` (..., 3) land."""
        rel = x - self.S
        lam = ((self.O - self.S) @ self.en) / np.where(np.abs(rel @ self.en) < 1e-9, 1e-9, rel @ self.en)
        p = self.S + lam[..., None] * rel - self.O
        col = (p @ self.eu) / self.pix + self.size / 2 - 0.5
        row = self.size / 2 - 0.5 - (p @ self.ev) / self.pix
        return row, col


def make_view(kind: str, position: str, size: int, rot: np.ndarray, shift: np.ndarray, zc: float) -> View:
    """Source/detector for a frontal (PA/AP) or left-lateral view; the patient is posed
    by ``x_world = rot @ x_patient + shift``, so rays are mapped back into patient space."""
    if kind == "frontal":
        # Display convention for both PA and AP: patient's right on the viewer's left.
        eu, ev = np.array([1.0, 0, 0]), np.array([0, 0, 1.0])
        if position == "AP":  # portable: short source distance, detector behind the back
            sid, det = 100.0, -14.0
            en = np.array([0, -1.0, 0])
        else:
            sid, det = 180.0, 17.0
            en = np.array([0, 1.0, 0])
        o = np.array([0.0, det, zc])
        s = o - en * sid
    else:
        # Left lateral: left side on the detector; anterior shown on the viewer's left.
        sid, det = 180.0, 21.0
        eu, ev, en = np.array([0, -1.0, 0]), np.array([0, 0, 1.0]), np.array([1.0, 0, 0])
        o = np.array([det, 0.0, zc])
        s = o - en * sid
    pix = FOV_CM / size
    u = (np.arange(size) + 0.5 - size / 2) * pix
    v = (size / 2 - np.arange(size) - 0.5) * pix
    pw = o + u[None, :, None] * eu + v[:, None, None] * ev
    rt = rot.T
    s_p = rt @ (s - shift)
    d = (pw - s) @ rot  # == rt @ (pw - s) per pixel
    return View(
        S=s_p, dx=np.ascontiguousarray(d[..., 0]), dy=np.ascontiguousarray(d[..., 1]),
        dz=np.ascontiguousarray(d[..., 2]), L=np.linalg.norm(d, axis=-1), O=rt @ (o - shift), eu=rt @ eu, ev=rt @ ev,
        en=rt @ en, pix=pix, size=size,
    )


def _terms(s: np.ndarray, c, a, n) -> tuple:
    """Per-primitive constants of the ray/primitive quadratic for source ``s``:
    the 6 distinct entries of A, A q, q.A.q - 1 and n.q, with q = s - c. Shapes (m,)."""
    c, a, n = np.asarray(c).reshape(-1, 3), np.asarray(a).reshape(-1, 3, 3), np.asarray(n).reshape(-1, 3)
    q = s - c
    qa = np.einsum("mi,mij->mj", q, a)
    a6 = (a[:, 0, 0], a[:, 1, 1], a[:, 2, 2], a[:, 0, 1], a[:, 0, 2], a[:, 1, 2])
    return a6, (qa[:, 0], qa[:, 1], qa[:, 2]), np.sum(q * qa, axis=1) - 1.0, np.sum(q * n, axis=1), (n[:, 0], n[:, 1], n[:, 2])


def _pick(terms: tuple, i) -> tuple:
    """The terms of primitive(s) ``i`` (an int: scalars; an index array: gathered)."""
    a6, qa, cc, nq, n = terms
    return tuple(x[i] for x in a6), tuple(x[i] for x in qa), cc[i], nq[i], tuple(x[i] for x in n)


def _chord(dx, dy, dz, terms: tuple, h) -> tuple[np.ndarray, np.ndarray]:
    """Interval [t0, t1] of the rays ``S + t d`` inside a primitive, empty as (0, 0).

    dx, dy, dz: ray vector components (any shape); ``terms`` from :func:`_pick` (scalars
    or arrays broadcasting with d); h: slab half-length (inf: no slab). Written on
    separate components because numpy reductions over a length-3 axis are slow.
    """
    (a00, a11, a22, a01, a02, a12), (qx, qy, qz), cc, nq, (nx, ny, nz) = terms
    adx = a00 * dx + a01 * dy + a02 * dz
    ady = a01 * dx + a11 * dy + a12 * dz
    adz = a02 * dx + a12 * dy + a22 * dz
    aa = np.maximum(adx * dx + ady * dy + adz * dz, 1e-18)  # ~0 only along a cylinder axis
    bb = dx * qx + dy * qy + dz * qz
    disc = bb * bb - aa * cc
    sq = np.sqrt(np.maximum(disc, 0.0))
    t0 = (-bb - sq) / aa
    t1 = (-bb + sq) / aa
    if np.any(np.isfinite(h)):
        nd = nx * dx + ny * dy + nz * dz
        hh = np.where(np.isfinite(h), h, 1e30)
        # A ray parallel to the caps gets nd = 1e-12: then the slab is all t (inside it)
        # or lies at |t| ~ 1e12, far from the quadric's finite interval (outside it).
        safe = np.where(np.abs(nd) < 1e-12, 1e-12, nd)
        s0, s1 = (-hh - nq) / safe, (hh - nq) / safe
        t0, t1 = np.maximum(t0, np.minimum(s0, s1)), np.minimum(t1, np.maximum(s0, s1))
    empty = (disc <= 0) | (t1 <= t0)
    return np.where(empty, 0.0, t0), np.where(empty, 0.0, t1)


def _bbox(view: View, c: np.ndarray, ext: np.ndarray) -> tuple[np.ndarray, ...]:
    """Pixel bounding boxes [r0, r1) x [c0, c1) of primitives (m,) on the detector:
    the pixels whose centres fall inside the projected corners of the 3-D box."""
    signs = np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)], float)
    corners = c[:, None, :] + signs[None] * ext[:, None, :]
    row, col = view.to_pixel(corners)
    n = view.size
    r0 = np.clip(np.ceil(row.min(1)), 0, n).astype(np.int64)
    r1 = np.clip(np.floor(row.max(1)) + 1, 0, n).astype(np.int64)
    c0 = np.clip(np.ceil(col.min(1)), 0, n).astype(np.int64)
    c1 = np.clip(np.floor(col.max(1)) + 1, 0, n).astype(np.int64)
    return r0, np.maximum(r1, r0), c0, np.maximum(c1, c0)


def project_additive(view: View, prims: Prims) -> np.ndarray:
    """Sum of density x chord length of many small primitives: (H, W)."""
    n = view.size
    if not len(prims):
        return np.zeros((n, n))
    c, a, nn, h, rho, ext = prims.arrays()
    r0, r1, c0, c1 = _bbox(view, c, ext)
    ww = c1 - c0
    cnt = (r1 - r0) * ww
    total = int(cnt.sum())
    if total == 0:
        return np.zeros((n, n))
    # One flat list of (primitive, pixel) pairs: no padding, no Python loop per primitive.
    idx = np.repeat(np.arange(len(c)), cnt)
    start = np.cumsum(cnt) - cnt
    local = np.arange(total) - np.repeat(start, cnt)
    w_i = ww[idx]
    rr = r0[idx] + local // w_i
    cc = c0[idx] + local % w_i
    flat = rr * n + cc
    t0, t1 = _chord(view.dx.ravel()[flat], view.dy.ravel()[flat], view.dz.ravel()[flat],
                    _pick(_terms(view.S, c, a, nn), idx), h[idx])
    out = np.bincount(flat, weights=rho[idx] * (t1 - t0) * view.L.ravel()[flat], minlength=n * n)
    return out.reshape(n, n)


def _union_len(t0: np.ndarray, t1: np.ndarray) -> np.ndarray:
    """Length (in t) of the union of k intervals per ray; t0, t1: (k, ...), empty = (0, 0).

    Where at most one interval is non-empty the union is the plain sum; only the rays
    that meet two or more are sorted by start (complex numbers carry the ends along),
    and each interval adds what extends past the running maximum end before it.
    """
    ln = t1 - t0
    out = ln.sum(0)
    many = np.count_nonzero(ln > 0, axis=0) >= 2
    if many.any():
        z = np.sort((t0[:, many] + 1j * t1[:, many]).T, axis=-1)
        s, e = z.real, z.imag
        run = np.maximum.accumulate(e, axis=1)
        prev = np.concatenate([np.full((len(s), 1), -np.inf), run[:, :-1]], axis=1)
        out[many] = np.maximum(e - np.maximum(s, prev), 0.0).sum(1)
    return out


def _region(view: View, shape: tuple) -> tuple[slice, slice] | None:
    r0, r1, c0, c1 = (int(v[0]) for v in _bbox(view, shape[0][None], shape[5][None]))
    if r1 <= r0 or c1 <= c0:
        return None
    return slice(r0, r1), slice(c0, c1)


def _carved(view: View, reg, base: list[tuple], carves: list[tuple]) -> np.ndarray:
    """Chord length (cm) of (intersection of ``base``) minus (union of ``carves``) on a region."""
    d = (view.dx[reg], view.dy[reg], view.dz[reg])
    lo = np.max([b[0] - b[5] for b in base], axis=0)
    hi = np.min([b[0] + b[5] for b in base], axis=0)
    # a carve whose 3-D box misses the base's cannot remove anything
    carves = [k for k in carves if np.all(k[0] + k[5] > lo) and np.all(k[0] - k[5] < hi)]
    shapes = base + carves
    terms = _terms(view.S, [x[0] for x in shapes], [x[1] for x in shapes], [x[2] for x in shapes])
    ints = [_chord(*d, _pick(terms, i), s[3]) for i, s in enumerate(shapes)]
    b0 = np.max([i[0] for i in ints[: len(base)]], axis=0)
    b1 = np.min([i[1] for i in ints[: len(base)]], axis=0)
    b1 = np.maximum(b1, b0)
    length = b1 - b0
    if carves:
        k0 = np.maximum(np.stack([x[0] for x in ints[len(base):]]), b0)
        k1 = np.minimum(np.stack([x[1] for x in ints[len(base):]]), b1)
        length = length - _union_len(k0, np.maximum(k1, k0))
    return length * view.L[reg]


# --------------------------------------------------------------------------- patient
def _anatomy(rng: np.random.Generator) -> dict:
    """Patient-level parameters: the same for every view (and study) of a patient."""
    size = rng.uniform(0.88, 1.12)
    return dict(
        sx=size * rng.uniform(0.95, 1.05),
        sy=size * rng.uniform(0.92, 1.08),
        sz=size * rng.uniform(0.95, 1.05),
        heart=rng.uniform(0.9, 1.08),  # heart size relative to the chest
        heart_rot=rng.uniform(-0.15, 0.15),
        rib_spacing=rng.uniform(2.25, 2.6),
        rib_drop=rng.uniform(4.5, 7.0),
        ribs=int(rng.integers(11, 13)),  # 11 or 12 visible pairs
        female=bool(rng.random() < 0.5),
        dome_r=rng.uniform(-1.0, 1.5),  # diaphragm height jitter
        dome_l=rng.uniform(-1.5, 1.0),
        gastric=bool(rng.random() < 0.7),
        vessel_seed=int(rng.integers(2**31)),
        lung_w=rng.uniform(0.95, 1.05),
    )


def draw_findings(rng: np.random.Generator, rates: Mapping[str, float] | None = None,
                  uncertain_fraction: float = 0.0) -> tuple[set[str], dict[str, float], dict]:
    """Which findings a study has, its CheXpert labels, and each finding's parameters.

    Always consumes the same number of draws whatever is present, so forcing a finding
    on or off (tests) leaves every other parameter unchanged.
    Returns (present, labels {name: 1.0 | -1.0}, params).
    """
    rates = {**FINDING_SET_RATES["standard"], **(rates or {})}
    u = rng.random(len(FINDINGS))
    present = {f for f, x in zip(FINDINGS, u) if x < rates[f]}
    unc = rng.random(len(FINDINGS))
    params = dict(
        nodule=dict(side=int(rng.integers(2)), cand=rng.random((32, 3)), radius=rng.uniform(0.55, 1.3)),
        mass=dict(side=int(rng.integers(2)), cand=rng.random((32, 3)), radius=rng.uniform(1.8, 3.0)),
        effusion=dict(sides=int(rng.choice(3, p=[0.45, 0.35, 0.2])), level=rng.uniform(0.18, 0.45, 2)),
        cardiomegaly=dict(scale=rng.uniform(1.3, 1.5), scale_z=rng.uniform(1.1, 1.25)),
        consolidation=dict(side=int(rng.integers(2)), cand=rng.random((32, 3)),
                           semi=rng.uniform(2.5, 4.5, 3), rot=rng.uniform(-0.6, 0.6, 3),
                           density=rng.uniform(0.45, 0.7)),
        pneumothorax=dict(side=int(rng.integers(2)), collapse=rng.uniform(0.68, 0.85)),
        devices=dict(kinds=rng.random(5), cvc_side=int(rng.integers(2)), cvc_jugular=bool(rng.random() < 0.5),
                     pacer_side=int(rng.random() < 0.2), ecg=rng.random((5, 2))),
    )
    # The one-view findings draw last (a fixed count), leaving every draw above unchanged.
    u_cross, unc_cross = rng.random(len(CROSS_VIEW_FINDINGS)), rng.random(len(CROSS_VIEW_FINDINGS))
    present |= {f for f, x in zip(CROSS_VIEW_FINDINGS, u_cross) if x < rates.get(f, 0.0)}
    params.update(
        retrocardiac_opacity=dict(offset=rng.random(3), semi=rng.uniform(2.2, 3.2, 3), density=rng.uniform(0.5, 0.7)),
        posterior_effusion=dict(sides=int(rng.choice(3, p=[0.45, 0.35, 0.2])), level=rng.random(2)),
        apical_pneumothorax=dict(side=int(rng.integers(2)), collapse=rng.uniform(0.86, 0.92)),
    )
    labels: dict[str, float] = {}
    for f, x in zip(FINDINGS + CROSS_VIEW_FINDINGS, np.r_[unc, unc_cross]):
        if f in present:
            for lab in FINDING_LABELS[f]:
                # "-1.0" = mentioned with uncertainty in the report; the finding is drawn anyway
                val = -1.0 if x < uncertain_fraction else 1.0
                labels[lab] = max(labels.get(lab, val), val)
    if not set(labels) - {"Support Devices"}:
        labels["No Finding"] = 1.0
    return present, labels, params


def _smooth_path(ctrl, n: int = 24) -> np.ndarray:
    """A smooth polyline through control points (resample, then a 5-tap moving average)."""
    ctrl = np.asarray(ctrl, float)
    seg = np.linalg.norm(np.diff(ctrl, axis=0), axis=1)
    s = np.concatenate([[0], np.cumsum(seg)])
    t = np.linspace(0, s[-1], n)
    p = np.stack([np.interp(t, s, ctrl[:, i]) for i in range(3)], axis=1)
    for _ in range(2):
        q = p.copy()
        q[2:-2] = (p[:-4] + p[1:-3] + p[2:-2] + p[3:-1] + p[4:]) / 5
        p = q
    return p


class Thorax:
    """All primitives of one patient (+ findings) and the recipe to project them."""

    def __init__(self, anat: dict, present: set[str], fparams: dict, kind: str) -> None:
        self.kind = kind
        sx, sy, sz = anat["sx"], anat["sy"], anat["sz"]
        self.sx, self.sy, self.sz = sx, sy, sz
        E = lambda c, s, rot=None: _one(Prims().ellipsoids(c, s, 0.0, rot))  # noqa: E731
        # ---- body outline (union) ----
        self.trunk = E([0, 0, -8 * sz], [16.0 * sx, 11.0 * sy, 34.0 * sz])
        body = [self.trunk, E([0, -1.0 * sy, 22 * sz], [6.0 * sx, 6.0 * sy, 10 * sz])]
        for s in (-1, 1):
            body.append(E([s * 13.0 * sx, -1.0 * sy, 13.0 * sz], [7.5 * sx, 6.0 * sy, 4.5 * sz]))
            if anat["female"]:
                body.append(E([s * 9.5 * sx, 6.5 * sy, -8 * sz], [6.0 * sx, 5.0 * sy, 5.5 * sz]))
            if kind == "frontal":  # arms hang at the sides in a frontal film
                body.append(E([s * 21.0 * sx, -1.0 * sy, -2 * sz], [4.2 * sx, 4.5 * sy, 22 * sz]))
            else:  # raised in a lateral film: soft tissue over the upper image
                body.append(E([s * 12.0 * sx, 4.0 * sy, 35 * sz], [4.5 * sx, 4.5 * sy, 13 * sz]))
        self.body = body
        # ---- carves out of the lungs ----
        dome_r = E([-5 * sx, 1.5 * sy, (-30 + anat["dome_r"]) * sz], [14 * sx, 14 * sy, 21 * sz])
        dome_l = E([6 * sx, 1.5 * sy, (-32 + anat["dome_l"]) * sz], [13.5 * sx, 14 * sy, 21 * sz])
        hs = anat["heart"]
        hsc = np.array([6.0, 4.8, 5.5]) * hs
        hc = np.array([0.9, 2.8, -6.5])
        if "cardiomegaly" in present:
            k = fparams["cardiomegaly"]
            hc = hc + np.array([1.6 * (k["scale"] - 1) * hsc[0], 0.5, -0.6])
            hsc = hsc * np.array([k["scale"], k["scale"] * 0.95, k["scale_z"]])
        self.heart = E(hc * [sx, sy, sz], hsc * [sx, sy, sz], _rot(0.25, -0.3 + anat["heart_rot"], 0.35))
        medi = E([0, -0.5 * sy, 3 * sz], [3.6 * sx, 10.0 * sy, 17 * sz])
        knob = E([2.8 * sx, -1.0 * sy, 7.0 * sz], [1.9 * sx, 1.9 * sy, 1.9 * sz])
        aorta = _one(Prims().cylinders([1.9 * sx, -4 * sy, 7 * sz], [1.0 * sx, -4.5 * sy, -16 * sz], 1.3 * sx, 1.3 * sy, 0.0))
        self.carves = [dome_r, dome_l, self.heart, medi, knob, aorta]
        # ---- lungs ----
        lw = anat["lung_w"]
        self.lungs = [E([s * 8.2 * sx, -0.5 * sy, -6 * sz], [7.2 * sx * lw, 9.5 * sy, 21 * sz]) for s in (-1, 1)]
        self.hila = np.array([[s * 4.6 * sx, 0.0, 0.5 * sz] for s in (-1, 1)])
        self.extra: list[tuple[float, list, list]] = []  # (density, base, carves) on a lung
        self.small = Prims()
        self._skeleton(anat)
        self._vessels(anat, present, fparams)
        self._soft_extras(anat)
        self._findings(present, fparams)

    # -- helpers
    def _lung_point(self, side: int, cand: np.ndarray, lobe: str | None = None) -> np.ndarray:
        """First candidate (uniform in [0,1]^3 mapped to the lung box) inside the lung."""
        c, _, _, _, _, ext = self.lungs[side]
        pts = c + (cand * 2 - 1) * ext * 0.9
        if lobe == "upper":
            pts[:, 2] = c[2] + cand[:, 2] * ext[2] * 0.85
        elif lobe == "lower":
            pts[:, 2] = c[2] - cand[:, 2] * ext[2] * 0.5
        ok = _inside(pts, self.lungs[side])
        for cv in self.carves:
            ok &= ~_inside(pts, cv)
        return pts[int(np.argmax(ok))] if ok.any() else self.hila[side] + [(-4, 4)[side], 0, -4]

    def _skeleton(self, anat: dict) -> None:
        sx, sy, sz = self.sx, self.sy, self.sz
        p = self.small
        # Spine: vertebral bodies with a cortical shell (outer dense, inner less dense),
        # pedicles, transverse and spinous processes.
        nv = 17
        zv = (21.0 - np.arange(nv) * 2.5) * sz
        rv = np.linspace(0.75, 1.1, nv)[:, None] * np.array([2.2 * sx, 1.7 * sy])
        yv = -5.2 * sy
        b0 = np.stack([np.zeros(nv), np.full(nv, yv), zv - 0.95 * sz], 1)
        b1 = b0 + [0, 0, 1.9 * sz]
        p.cylinders(b0, b1, rv[:, 0], rv[:, 1], 0.55, ref=(1, 0, 0))
        p.cylinders(b0 + [0, 0, 0.15], b1 - [0, 0, 0.15], rv[:, 0] - 0.3, rv[:, 1] - 0.3, -0.3, ref=(1, 0, 0))
        for s in (-1, 1):
            p.ellipsoids(np.stack([np.full(nv, s * 1.5 * sx), np.full(nv, yv - 2.0 * sy), zv + 0.3], 1),
                         [0.45, 0.9, 0.6], 0.9)
            p.ellipsoids(np.stack([np.full(nv, s * 3.0 * sx), np.full(nv, yv - 2.8 * sy), zv + 0.3], 1),
                         [1.4, 0.5, 0.5], 0.6, _rot(0, 0, s * 0.3))
        p.ellipsoids(np.stack([np.zeros(nv), np.full(nv, yv - 4.3 * sy), zv - 0.8], 1), [0.35, 1.6, 0.55], 0.7,
                     _rot(-0.5, 0, 0))
        # Ribs: each follows the cage ellipse from the spine round to the front,
        # descending anteriorly; flat bands with a dense cortex and a lighter marrow.
        nr = anat["ribs"]
        k = np.arange(nr)
        taper = np.array([0.45, 0.62, 0.75, 0.84, 0.9, 0.95, 0.98, 1, 1, 0.99, 0.97, 0.95])[:nr]
        ax = 15.3 * sx * taper
        ay = 9.6 * sy * (0.6 + 0.4 * taper)
        zk = (16.0 - k * anat["rib_spacing"]) * sz
        phi_end = np.where(k < 10, 2.35 - 0.05 * k, 1.7)
        drop = anat["rib_drop"] * np.minimum(1.0, 0.5 + k / 6) * sz
        npt = 16
        f = np.linspace(0, 1, npt)
        phi = 0.15 + f[None, :] * (phi_end[:, None] - 0.15)
        for s in (-1, 1):
            x = s * ax[:, None] * np.sin(phi)
            y = 0.5 - ay[:, None] * np.cos(phi)
            z = zk[:, None] + 1.2 * np.sin(np.minimum(phi, 1.6)) - drop[:, None] * (phi / phi_end[:, None]) ** 2
            pts = np.stack([x, y, z], -1)  # (nr, npt, 3)
            mid = (phi[:, :-1] + phi[:, 1:]) / 2
            normal = np.stack([s * np.sin(mid) / ax[:, None], -np.cos(mid) / ay[:, None], 0 * mid], -1)
            normal = _unit(normal)
            p.tube(pts, 0.3, 0.6 * sz, 1.3, ref=normal)  # ra along the outward normal
            p.tube(pts, 0.14, 0.42 * sz, -0.8, ref=normal)
            # costal cartilage to the sternum: faint
            phc = np.linspace(phi_end[:8], np.pi - 0.25, 5).T
            xc = s * ax[:8, None] * np.sin(phc)
            yc = 0.5 - ay[:8, None] * np.cos(phc)
            zc = (zk[:8, None] + 1.2 * np.sin(np.minimum(phc, 1.6)) - drop[:8, None]
                  + 2.0 * (phc - phi_end[:8, None]))
            p.tube(np.stack([xc, yc, zc], -1), 0.3, 0.5, 0.2)
            # clavicle: an S-shaped tube from the sternal notch to the acromion
            cl = _smooth_path([[s * 1.8, 8.0, 13.5], [s * 7, 7.0, 14.5], [s * 12, 3.5, 15.5], [s * 16, -1.0, 16.5]], 12)
            cl = cl * [sx, sy, sz]
            p.tube(cl, 0.7, 0.65, 1.4)
            p.tube(cl, 0.45, 0.4, -0.8)
            # scapula: a thin plate over the posterior chest wall
            p.ellipsoids([s * 11.5 * sx, -8.6 * sy, 6.5 * sz], [5.5, 0.45, 8.0], 1.0, _rot(0, 0, s * 0.55))
            # humeral head and shaft (the shaft hangs down in a frontal, goes up in a lateral)
            hh = np.array([s * 17.5 * sx, -1.0 * sy, 14.0 * sz])
            p.ellipsoids(hh, [2.5, 2.5, 2.5], 1.1)
            p.ellipsoids(hh, [2.1, 2.1, 2.1], -0.6)
            end = hh + ([s * 2.5, 0, -30] if self.kind == "frontal" else [-s * 4, 5, 22])
            p.cylinders(hh, end, 1.2, 1.2, 1.2, ref=(1, 0, 0))
            p.cylinders(hh, end, 0.8, 0.8, -0.7, ref=(1, 0, 0))
        # sternum: a flat dense strip on the anterior midline (seen edge-on in a lateral)
        st = np.array([[0, 9.3, 13.0], [0, 10.2, 4.0], [0, 10.4, -6.0]]) * [sx, sy, sz]
        p.tube(st, 0.7, 2.0, 0.9, ref=(0, 1, 0))

    def _vessels(self, anat: dict, present: set[str], fp: dict) -> None:
        """Lung markings: a random binary tree of tapering tubes from each hilum."""
        rng = np.random.default_rng(anat["vessel_seed"])
        for side, s in enumerate((-1, 1)):
            dirs = _unit(np.array([[0.25 * s, 0.1, 1.0], [0.7 * s, 0.5, 0.6], [1.0 * s, 0.2, 0.3], [1.0 * s, -0.6, 0.0],
                                   [0.8 * s, -0.3, -0.5], [0.6 * s, 0.5, -0.6], [0.35 * s, 0.1, -1.0]]))
            start = np.repeat(self.hila[side][None], len(dirs), 0)
            r, ln = 0.4, 3.3
            p0s, p1s, rs = [], [], []
            for g in range(5):
                dirs = _unit(dirs + rng.normal(0, 0.35, dirs.shape))
                end = start + dirs * ln * rng.uniform(0.7, 1.2, (len(dirs), 1)) * self.sz
                ok = _inside(end, self.lungs[side])
                for cv in self.carves:
                    ok &= ~_inside(end, cv)
                p0s.append(start[ok]), p1s.append(end[ok]), rs.append(np.full(ok.sum(), r))
                start = np.repeat(end[ok], 2, 0)
                dirs = np.repeat(dirs[ok], 2, 0) + rng.normal(0, 0.5, (2 * ok.sum(), 3))
                r, ln = r * 0.72, ln * 0.8
            p0, p1, rr = np.concatenate(p0s), np.concatenate(p1s), np.concatenate(rs)
            if "pneumothorax" in present and fp["pneumothorax"]["side"] == side:
                k, anchor = fp["pneumothorax"]["collapse"], self._ptx_anchor(side)
                p0, p1, rr = anchor + k * (p0 - anchor), anchor + k * (p1 - anchor), rr * k
            self.small.cylinders(p0, p1, rr, rr, 0.75, ref=(1, 0, 0), overlap=0.1)
            # hilar shadows: the pulmonary arteries
            self.small.ellipsoids(self.hila[side] + [s * 0.3, 0, 0], [1.3, 1.8, 2.4], 0.6)

    def _soft_extras(self, anat: dict) -> None:
        sx, sy, sz = self.sx, self.sy, self.sz
        p = self.small
        # trachea and main bronchi: air columns in the mediastinum
        car = np.array([0, -1.5 * sy, 5.0 * sz])
        p.cylinders([0, -1.0 * sy, 26 * sz], car, 0.85, 0.85, -0.95, ref=(1, 0, 0))
        for s in (-1, 1):
            p.cylinders(car, car + [s * 3.2 * sx, 0.3, -2.4 * sz], 0.6, 0.6, -0.7, ref=(1, 0, 0))
        if anat["gastric"]:  # gastric air bubble under the left hemidiaphragm
            p.ellipsoids([6.5 * sx, 2 * sy, -15.5 * sz], [3.5, 2.5, 1.6], -0.9)

    def _ptx_anchor(self, side: int) -> np.ndarray:
        c = self.lungs[side][0]
        return np.array([c[0] * 0.45, c[1], c[2] - 2.0])

    def _findings(self, present: set[str], fp: dict) -> None:
        sx, sy, sz = self.sx, self.sy, self.sz
        self.finding_info: dict[str, dict] = {}
        for name in ("nodule", "mass"):
            if name in present:
                k = fp[name]
                c = self._lung_point(k["side"], k["cand"])
                self.small.ellipsoids(c, [k["radius"]] * 3, 1.0 + LUNG)
                self.finding_info[name] = dict(center=c.tolist(), radius=k["radius"])
        if "consolidation" in present:
            k = fp["consolidation"]
            lobe = "lower" if k["cand"][0, 0] < 0.6 else "upper"
            c = self._lung_point(k["side"], k["cand"], lobe)
            shape = _one(Prims().ellipsoids(c, k["semi"], 0.0, _rot(*k["rot"])))
            self.extra.append((k["density"], [self.lungs[k["side"]], shape], self.carves))
            self.finding_info["consolidation"] = dict(center=c.tolist(), side=k["side"])
        if "effusion" in present:
            k = fp["effusion"]
            sides = {0: [0], 1: [1], 2: [0, 1]}[k["sides"]]
            for side in sides:
                lc, _, _, _, _, lext = self.lungs[side]
                s = (-1, 1)[side]
                base = -15.0 * sz
                top = base + k["level"][side] * (lc[2] + lext[2] - base)
                # fluid body: an ellipsoid centred laterally and posteriorly, so its top
                # surface (the meniscus) rises towards the chest wall and the back
                semi = np.array([13.0 * sx, 13.0 * sy, 14.0 * sz])
                fc = np.array([s * 15.0 * sx, -4.0 * sy, top - semi[2]])
                fluid = _one(Prims().ellipsoids(fc, semi, 0.0))
                self.extra.append((-LUNG, [self.lungs[side], fluid], self.carves))
            self.finding_info["effusion"] = dict(sides=sides)
        if "pneumothorax" in present:
            k = fp["pneumothorax"]
            side, col = k["side"], k["collapse"]
            lc, la, ln_, lh, _, lext = self.lungs[side]
            anchor = self._ptx_anchor(side)
            inner = (anchor + col * (lc - anchor), la / col**2, ln_, lh, 0.0, lext * col)
            # pleural space: pure air (lung parenchyma gone); the collapsed lung a bit denser
            self.extra.append((LUNG * 0.33, [self.lungs[side]], self.carves))
            self.extra.append((-LUNG * 0.33 + 0.12, [self.lungs[side], inner], self.carves))
            self.finding_info["pneumothorax"] = dict(side=side, collapse=col)
        if "cardiomegaly" in present:
            self.finding_info["cardiomegaly"] = dict(center=self.heart[0].tolist())
        if "devices" in present:
            self._devices(fp["devices"])
        self._one_view_findings(present, fp)

    def _one_view_findings(self, present: set[str], fp: dict) -> None:
        """The CROSS_VIEW_FINDINGS: their geometry in ``finding_info`` always, their
        densities only in the view(s) of FINDING_VIEWS."""
        sx, sy, sz = self.sx, self.sy, self.sz
        shown = lambda name: self.kind in FINDING_VIEWS[name]  # noqa: E731
        if "retrocardiac_opacity" in present:  # left lower lobe, behind the heart, beside the spine
            k = fp["retrocardiac_opacity"]
            c = np.array([(3.0 + 1.5 * k["offset"][0]) * sx, (-4.0 - 1.5 * k["offset"][1]) * sy,
                          (-10.0 + 2.5 * k["offset"][2]) * sz])
            shape = _one(Prims().ellipsoids(c, k["semi"] * [sx, sy, sz], 0.0))
            if shown("retrocardiac_opacity"):
                self.extra.append((k["density"], [self.lungs[1], shape], self.carves))
            self.finding_info["retrocardiac_opacity"] = dict(center=c.tolist())
        if "posterior_effusion" in present:  # fluid filling the lowest, posterior part of the lung
            k = fp["posterior_effusion"]
            sides = {0: [0], 1: [1], 2: [0, 1]}[k["sides"]]
            for side in sides:
                s = (-1, 1)[side]
                top = (-14.5 + 3.0 * k["level"][side]) * sz
                semi = np.array([9.0 * sx, 5.5 * sy, 6.0 * sz])
                fluid = _one(Prims().ellipsoids([s * 9.0 * sx, -9.0 * sy, top - semi[2]], semi, 0.0))
                if shown("posterior_effusion"):
                    self.extra.append((-LUNG, [self.lungs[side], fluid], self.carves))
            self.finding_info["posterior_effusion"] = dict(sides=sides)
        if "apical_pneumothorax" in present:  # the lung drops away from the apex
            k = fp["apical_pneumothorax"]
            side, col = k["side"], k["collapse"]
            lc, la, ln_, lh, _, lext = self.lungs[side]
            anchor = lc - [0.0, 0.0, 0.8 * lext[2]]
            inner = (anchor + col * (lc - anchor), la / col**2, ln_, lh, 0.0, lext * col)
            if shown("apical_pneumothorax"):
                # the pleural gap is air: the lung parenchyma outside the shrunken lung goes
                self.extra.append((LUNG * 0.5, [self.lungs[side]], self.carves))
                self.extra.append((-LUNG * 0.5, [self.lungs[side], inner], self.carves))
            self.finding_info["apical_pneumothorax"] = dict(side=side, collapse=col)

    def _devices(self, k: dict) -> None:
        sx, sy, sz = self.sx, self.sy, self.sz
        p = self.small
        u = k["kinds"]
        kinds = [n for n, x, r in zip(("ett", "cvc", "pacemaker", "ng", "ecg"), u, (0.4, 0.5, 0.25, 0.3, 0.4)) if x < r]
        if not kinds:
            kinds = ["cvc"]
        sc = np.array([sx, sy, sz])
        if "ett" in kinds:  # endotracheal tube: a radiopaque stripe ending above the carina
            pts = np.array([[0.5, -0.6, 30], [0.5, -0.9, 20], [0.5, -1.2, 9.5]]) * sc
            p.tube(_smooth_path(pts, 10), 0.07, 0.07, 25.0)
        if "cvc" in kinds:  # central line via the jugular or subclavian vein to the SVC
            s = (-1, 1)[k["cvc_side"]]
            entry = [[s * 3.5, 3.0, 24], [s * 3.2, 2.5, 15]] if k["cvc_jugular"] else [[s * 11, 6.0, 13.5], [s * 6, 4.0, 11.5]]
            pts = np.array(entry + [[s * 2.5 if s < 0 else 0.0, 2.0, 8], [-2.5, 2.2, 3.5], [-2.3, 2.5, 0.5]]) * sc
            p.tube(_smooth_path(pts, 24), 0.1, 0.1, 10.0)
        if "ng" in kinds:  # nasogastric tube down the oesophagus into the stomach
            pts = np.array([[0.4, -3.0, 30], [0.5, -3.2, 10], [1.5, -2.5, -8], [5.0, 1.0, -14], [8.0, 3.0, -17]]) * sc
            p.tube(_smooth_path(pts, 26), 0.18, 0.18, 5.0)
        if "pacemaker" in kinds:  # generator in the upper chest wall, leads to RA and RV
            s = (1, -1)[k["pacer_side"]]
            gen = np.array([s * 7.5, 8.2, 10.0]) * sc
            p.cylinders(gen - [0, 0.4, 0], gen + [0, 0.4, 0], 2.4, 2.0, 30.0, ref=(1, 0, 0))
            for tip in ([-2.3, 2.8, -3.5], [3.5, 5.5, -9.5]):
                pts = np.array([gen / sc, [s * 6, 4.5, 12], [-1.5, 2.0, 6.0], [-2.4, 2.3, 1.0], tip]) * sc
                p.tube(_smooth_path(pts, 26), 0.08, 0.08, 35.0)
        if "ecg" in kinds:  # electrodes on the skin: a disc and a dense snap each
            tc, ta = self.trunk[0], self.trunk[5]
            for xz in k["ecg"]:
                x = (xz[0] * 2 - 1) * 12 * sx
                z = (-12 + xz[1] * 22) * sz
                r2 = 1 - ((x - tc[0]) / ta[0]) ** 2 - ((z - tc[2]) / ta[2]) ** 2
                y = tc[1] + ta[1] * np.sqrt(max(r2, 0.05))
                c = np.array([x, y + 0.1, z])
                p.cylinders(c - [0, 0.05, 0], c + [0, 0.05, 0], 1.1, 1.1, 1.5, ref=(1, 0, 0))
                p.ellipsoids(c + [0, 0.3, 0], [0.28, 0.28, 0.28], 25.0)
        self.finding_info["devices"] = dict(kinds=kinds)

    # -- projection
    def line_integral(self, view: View) -> np.ndarray:
        """Attenuation line integral in tissue-equivalent cm: (H, W)."""
        n = view.size
        out = np.zeros((n, n))
        terms = _terms(view.S, [b[0] for b in self.body], [b[1] for b in self.body], [b[2] for b in self.body])
        ints = [_chord(view.dx, view.dy, view.dz, _pick(terms, i), b[3]) for i, b in enumerate(self.body)]
        out += _union_len(np.stack([i[0] for i in ints]), np.stack([i[1] for i in ints])) * view.L
        heart_reg = _region(view, self.heart)
        if heart_reg is not None:  # blood is a little denser than the fat around it
            out[heart_reg] += 0.05 * _carved(view, heart_reg, [self.heart], [])
        for lung in self.lungs:
            reg = _region(view, lung)
            if reg is not None:
                out[reg] += LUNG * _carved(view, reg, [lung], self.carves)
        for rho, base, carves in self.extra:
            reg = _region(view, base[0])
            if reg is not None:
                out[reg] += rho * _carved(view, reg, base, carves)
        out += project_additive(view, self.small)
        return out


# --------------------------------------------------------------------------- detector
def _box_blur(img: np.ndarray, r: int) -> np.ndarray:
    """Separable box filter of radius r (edge-replicated), via cumulative sums."""
    if r < 1:
        return img
    k = 2 * r + 1
    for ax in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[ax] = (r + 1, r)
        c = np.cumsum(np.pad(img, pad, mode="edge"), axis=ax)
        img = (np.take(c, np.arange(k, c.shape[ax]), axis=ax) - np.take(c, np.arange(0, c.shape[ax] - k), axis=ax)) / k
    return img


def _blur(img: np.ndarray, r: int) -> np.ndarray:
    """Three box passes ~ a Gaussian of sigma ~ r."""
    for _ in range(3):
        img = _box_blur(img, r)
    return img


def acquire(line: np.ndarray, rng: np.random.Generator, size: int, noise: bool) -> tuple[np.ndarray, dict]:
    """Beer-Lambert, scatter, detector blur, quantum noise, log and presentation
    processing; returns the display image in [0, 1] (1 = dense = bright) and settings."""
    mu = MU_TISSUE * rng.uniform(0.9, 1.1)  # beam energy (kVp) changes the contrast
    exposure = float(np.exp(rng.uniform(np.log(2e4), np.log(1.5e5)))) * (256.0 / size) ** 2
    scatter = rng.uniform(0.15, 0.45)
    eq = rng.uniform(0.5, 1.0)
    sharp = rng.uniform(0.3, 0.8)
    gamma = rng.uniform(0.85, 1.2)
    prim = np.exp(-mu * line)
    big = max(1, size // 24)
    total = (prim + scatter * _blur(prim, big)) / (1 + scatter)
    total = 0.75 * total + 0.25 * _box_blur(total, max(1, size // 256))  # detector MTF
    if noise:
        counts = rng.poisson(total * exposure)
        total = np.maximum(counts, 0.5) / exposure
    p = -np.log(total)
    # presentation processing (as a modality does): large-kernel equalisation lets lungs
    # and mediastinum share the grey range; a small unsharp mask crisps edges
    p = p + eq * (p - _blur(p, max(2, size // 16))) + sharp * (p - _blur(p, max(1, size // 128)))
    lo, hi = np.percentile(p, [0.5, 99.7])
    x = np.clip((p - lo) / max(hi - lo, 1e-6), 0, 1) ** gamma
    return x.astype(np.float32), dict(exposure=exposure, mu=mu, scatter=scatter, gamma=gamma)


def _pose(rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Rotation jitter and position of the patient on the detector."""
    ang = rng.normal(0, 1, 3) * np.radians([3.0, 2.0, 4.0])  # tilt, lean, rotation
    shift = np.array([rng.normal(0, 1.2), rng.normal(0, 0.8), rng.normal(0, 1.5)])
    if kind == "lateral":
        shift[0] = 0.0
        shift[1] = rng.normal(1.0, 1.2)
    zc = -2.0 + rng.normal(0, 0.8)
    return _rot(*ang), shift, zc


def _streams(rng_or_seed) -> list[np.random.SeedSequence]:
    if isinstance(rng_or_seed, np.random.Generator):
        seed = int(rng_or_seed.integers(2**63))
    elif isinstance(rng_or_seed, (int, np.integer)) and not isinstance(rng_or_seed, bool):
        seed = int(rng_or_seed)
    else:
        raise TypeError(f"rng_or_seed must be an int or a numpy Generator, got {type(rng_or_seed).__name__}")
    if seed < 0:
        raise ValueError(f"rng_or_seed={seed}; a seed must be >= 0")
    # findings, anatomy, frontal acquisition, lateral acquisition
    return np.random.SeedSequence(seed).spawn(4)


def study_findings(rng_or_seed, rates: Mapping[str, float] | None = None, uncertain_fraction: float = 0.0):
    """The (present, labels, params) a study seed gives, without rendering anything."""
    return draw_findings(np.random.default_rng(_streams(rng_or_seed)[0]), rates, uncertain_fraction)


def render_study(
    rng_or_seed,
    size: int = 256,
    *,
    views: Iterable[str] = ("frontal", "lateral"),
    frontal_position: str = "PA",
    findings: Iterable[str] | None = None,
    finding_rates: Mapping[str, float] | None = None,
    uncertain_fraction: float = 0.0,
    noise: bool = True,
    anatomy_seed: int | None = None,
) -> dict:
    """Render one synthetic chest study in memory.

    Args:
        rng_or_seed: an int seed (>= 0) or a numpy Generator (one draw taken from it).
        size: pixels per side of each square image (>= 32).
        views: any of "frontal", "lateral".
        frontal_position: "PA" (erect, long source distance) or "AP" (portable: short
            source distance, the heart magnified).
        findings: force exactly these findings (names in ALL_FINDINGS); None draws them with
            ``finding_rates``. Forcing changes nothing else about the study.
        uncertain_fraction: chance that a present finding is labelled -1.0.
        noise: quantum noise on the detector (off gives a noiseless image, for tests).
        anatomy_seed: patient seed; studies of one patient share it (None: from the study).

    Returns:
        dict(frontal=(size, size) float32 in [0, 1] or None, lateral=... or None,
        labels={CheXpert name: 1.0 | -1.0}, findings=sorted names, meta=dict) where the
        image convention is 1 = dense = bright (bone white, lungs dark).
    """
    size = int(size)
    if size < 32:
        raise ValueError(f"size={size}; need at least 32 pixels per side")
    views = tuple(views)
    bad = [v for v in views if v not in ("frontal", "lateral")]
    if bad or not views:
        raise ValueError(f"views={views!r}; expected a non-empty subset of ('frontal', 'lateral')")
    if frontal_position not in FRONTAL_POSITIONS:
        raise ValueError(f"frontal_position={frontal_position!r}; expected one of {FRONTAL_POSITIONS}")
    s_find, s_anat, s_front, s_lat = _streams(rng_or_seed)
    present, labels, fparams = draw_findings(np.random.default_rng(s_find), finding_rates, uncertain_fraction)
    if findings is not None:
        findings = set(findings)
        unknown = findings - set(ALL_FINDINGS)
        if unknown:
            raise ValueError(f"findings={sorted(unknown)} unknown; expected names from {ALL_FINDINGS}")
        present = findings
        labels = {lab: 1.0 for f in present for lab in FINDING_LABELS[f]}
        if not set(labels) - {"Support Devices"}:
            labels["No Finding"] = 1.0
    anat_ss = s_anat if anatomy_seed is None else np.random.SeedSequence(int(anatomy_seed))
    anat = _anatomy(np.random.default_rng(anat_ss))
    out: dict = dict(frontal=None, lateral=None, labels=labels, findings=sorted(present), meta={})
    for kind, ss in (("frontal", s_front), ("lateral", s_lat)):
        if kind not in views:
            continue
        rng = np.random.default_rng(ss)
        thorax = Thorax(anat, present, fparams, kind)
        rot, shift, zc = _pose(rng, kind)
        position = frontal_position if kind == "frontal" else "LATERAL"
        view = make_view(kind, position, size, rot, shift, zc)
        img, acq = acquire(thorax.line_integral(view), rng, size, noise)
        out[kind] = img
        out["meta"][kind] = dict(position=position, pixel_spacing_mm=10 * view.pix, **acq)
        out["meta"]["finding_info"] = thorax.finding_info
    return out
