"""Drawing one synthetic chest radiograph (PA frontal, or a plain lateral) with whole-array numpy.

Everything is drawn in *canonical* thorax coordinates ``(u, v)``: ``u`` runs from -1 (image left = patient right) to
+1 across the chest, ``v`` downwards with the apices near -0.75 and the diaphragm domes near 0.4. Each pixel's canonical
coordinates come from inverting a random per-image shift / scale / rotation, so anatomy and findings move together.
Intensities add up like attenuation: soft tissue bright, lungs dark, bone and fluid bright again.
All work is whole-array numpy; the only Python loops run over a handful of shapes (ribs are one periodic field).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .synthetic_findings import STREAM_ANATOMY, STREAM_LATERAL, FindingSpec, FindingType, Side, Zone

F32 = np.float32


@dataclass
class DrawnFinding:
    """A finding as drawn: one box and one boolean mask per component (two for bilateral findings)."""

    spec: FindingSpec
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # (x, y, w, h) in pixels
    masks: list[np.ndarray] = field(default_factory=list)
    sides: list[Side | None] = field(default_factory=list)


@dataclass
class RenderedImage:
    pixels: np.ndarray  # (H, W) uint8
    findings: list[DrawnFinding]
    cardiothoracic_ratio: float
    lung: np.ndarray  # (H, W) bool: both lung fields as drawn (the surroundings a finding's contrast is read against)


# ----------------------------------------------------------------------------------------------------------- helpers


def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = (x - lo) * (1.0 / (hi - lo))
    np.clip(t, 0.0, 1.0, out=t)
    return t * t * (3.0 - 2.0 * t)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: float) -> np.ndarray:
    """Smooth noise, roughly in [-1, 1], with ``cells`` cells across the image width, in pixel space.

    A coarse random grid upsampled bicubically by PIL (C code, deterministic): far cheaper than per-pixel gathers,
    and without the blocky seams of linear value noise. Textures need not follow the anatomy's small rotation.
    """
    h, w = shape
    nx = max(int(round(cells)), 1)
    ny = max(int(round(cells * h / w)), 1)
    table = rng.uniform(-1.0, 1.0, size=(ny + 2, nx + 2)).astype(F32)
    # The box leaves a one-node margin so the image border is interpolated, not clamped.
    up = Image.fromarray(table).resize((w, h), Image.Resampling.BICUBIC, box=(1, 1, nx + 1, ny + 1))
    return np.asarray(up, dtype=F32)


def _blur3(a: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur (edge-replicated): turns white noise into film-grain-like noise."""
    p = np.pad(a, 1, mode="edge")
    a = (p[:-2, 1:-1] + 2 * p[1:-1, 1:-1] + p[2:, 1:-1]) * 0.25
    p = np.pad(a, 1, mode="edge")
    return (p[1:-1, :-2] + 2 * p[1:-1, 1:-1] + p[1:-1, 2:]) * 0.25


def _box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def _segment_distance(u: np.ndarray, v: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Distance from each pixel to a polyline through ``points`` (K, 2) in canonical units."""
    best = np.full(u.shape, np.inf, dtype=F32)
    for (ua, va), (ub, vb) in zip(points[:-1], points[1:]):
        du, dv = ub - ua, vb - va
        t = np.clip(((u - ua) * du + (v - va) * dv) / (du * du + dv * dv), 0.0, 1.0)
        best = np.minimum(best, np.hypot(u - ua - t * du, v - va - t * dv))
    return best


def _heart_profile(v: np.ndarray, top: float, floor: float, peak: float) -> np.ndarray:
    """0..1 bulge of a heart border between ``top`` and ``floor``: a rounded shoulder up to its widest point at
    fraction ``peak`` of the height, then a slight tuck into the cardiophrenic angle."""
    t = (v - top) / (floor - top)
    rise = 1.0 - (1.0 - np.clip(t / peak, 0.0, 1.0)) ** 2
    tuck = 1.0 - 0.12 * np.clip((t - peak) / (1.0 - peak), 0.0, 1.0) ** 2
    return rise * tuck


def image_size_for(rng: np.random.Generator, image_size: int) -> tuple[int, int]:
    """(height, width): portrait and mildly non-square, like real radiographs, so resize + pad gets exercised."""
    width = int(round(image_size * rng.uniform(0.92, 1.08)))
    height = int(round(image_size * rng.uniform(1.0, 1.25)))
    return height, width


def _canonical_grid(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Canonical (u, v) of every pixel after a random global shift / scale / rotation of the anatomy: patient
    position and size differ from film to film (distance to the detector, centring, a slight tilt). A smaller chest
    leaves room to sit further off centre; a large one keeps the lateral walls on the image."""
    half = width / 2.0
    y, x = np.mgrid[0:height, 0:width].astype(F32)
    ui = (x + 0.5 - width / 2.0) / half
    vi = (y + 0.5 - height / 2.0) / half
    scale = rng.uniform(0.76, 1.04)
    room = 1.04 - scale
    du = rng.uniform(-1.0, 1.0) * (0.05 + 0.8 * room)
    dv = rng.uniform(-1.0, 1.0) * (0.06 + 0.6 * room)
    angle = math.radians(rng.uniform(-7.0, 7.0))
    c, s = math.cos(angle), math.sin(angle)
    ui, vi = ui - du, vi - dv
    u = (c * ui + s * vi) / scale
    v = (-s * ui + c * vi) / scale
    # Taller images show more neck and abdomen, not a stretched chest.
    return u.astype(F32), (v + 0.05).astype(F32)


# ------------------------------------------------------------------------------------------------------------ lungs


@dataclass
class _Lung:
    side: Side
    x: np.ndarray  # lateral coordinate: distance from the midline, positive towards this side's chest wall
    soft: np.ndarray  # 0..1 membership (soft edge)
    hard: np.ndarray  # bool
    depth: np.ndarray  # approximate distance inside the lung (canonical units, negative outside)
    to_wall: np.ndarray  # horizontal distance to the lateral wall / apex curve (for pneumothorax)
    t: np.ndarray  # 0 at the apex, 1 at the costophrenic angle (lung zones are thirds of this)
    dome: np.ndarray  # height of this side's hemidiaphragm above each pixel column
    envelope: np.ndarray  # the thoracic cavity on this side without the diaphragm cut (where effusion collects)
    x_medial: float
    x_lateral: float
    v_apex: float
    v_costophrenic: float
    v_dome_top: float


def _lung(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, side: Side, silhouette: np.ndarray,
          inspiration: float) -> _Lung:
    """One lung field; ``inspiration`` (about 0.8-1.1) stretches it downwards from the apex: a deep breath lowers and
    flattens the diaphragm, a shallow one raises its dome."""
    x = -u if side is Side.RIGHT else u
    v_apex = rng.uniform(-0.80, -0.70)
    v_cp = v_apex + (rng.uniform(0.58, 0.68) - v_apex) * inspiration
    x_lat = rng.uniform(0.80, 0.88)
    x_med = rng.uniform(0.08, 0.11)
    x_apex = rng.uniform(0.28, 0.36)
    # The right hemidiaphragm sits a little higher than the left (liver below it).
    dome_height = (rng.uniform(0.20, 0.28) + (0.05 if side is Side.RIGHT else 0.0)) * (2.0 - inspiration)
    t = (v - v_apex) / (v_cp - v_apex)
    # Rounded apex: the lateral wall reaches full width at ~45% of the height, the medial wall earlier.
    grow_lat = np.sqrt(np.clip(1.0 - (1.0 - np.clip(t / 0.45, 0.0, 1.0)) ** 2, 0.0, 1.0))
    grow_med = np.sqrt(np.clip(1.0 - (1.0 - np.clip(t / 0.22, 0.0, 1.0)) ** 2, 0.0, 1.0))
    wall_lat = x_apex + (x_lat - x_apex) * grow_lat + 0.03 * np.sin(np.pi * np.clip(t, 0, 1))
    wall_med = x_apex - (x_apex - x_med) * grow_med
    q = np.clip((x - (x_med - 0.12)) / (x_lat - x_med + 0.12), 0.0, 1.0)
    dome = v_cp - dome_height * np.clip(np.sin(np.pi * q), 0.0, 1.0) ** 0.7
    to_wall = wall_lat - x
    envelope_depth = np.minimum(np.minimum(x - wall_med, to_wall), (v - v_apex) * 0.8)
    depth = np.minimum(envelope_depth, dome - v)
    edge = 0.018
    soft = _smoothstep(depth, -edge, edge) * (1.0 - silhouette)
    return _Lung(
        side=side,
        x=x,
        soft=soft.astype(F32),
        hard=soft >= 0.5,
        depth=depth.astype(F32),
        to_wall=to_wall.astype(F32),
        t=t.astype(F32),
        dome=dome.astype(F32),
        envelope=(envelope_depth > 0) & (v < v_cp + 0.03),
        x_medial=float(x_med),
        x_lateral=float(x_lat),
        v_apex=float(v_apex),
        v_costophrenic=float(v_cp),
        v_dome_top=float(v_cp - dome_height),
    )


_ZONE_T = {Zone.UPPER: (0.06, 0.36), Zone.MIDDLE: (0.36, 0.64), Zone.LOWER: (0.64, 0.95)}


def _sample_point(
    rng: np.random.Generator, lung: _Lung, zone: Zone, margin: float, u: np.ndarray, v: np.ndarray
) -> tuple[float, float] | None:
    """A random canonical point inside ``lung`` within ``zone``, at least ``margin`` inside its edge."""
    lo, hi = _ZONE_T[zone]
    for m in (margin, margin / 2, 0.0):
        candidates = np.flatnonzero(((lung.depth > m) & (lung.t >= lo) & (lung.t < hi) & lung.hard).ravel())
        if candidates.size:
            i = int(candidates[rng.integers(candidates.size)])
            return float(u.ravel()[i]), float(v.ravel()[i])
    return None


# --------------------------------------------------------------------------------------------------------- findings


def _blob(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, cu: float, cv: float, radius: float) -> np.ndarray:
    """An irregular lobulated patch in [0, 1]: several overlapping Gaussians, its margin frayed by noise."""
    k = int(rng.integers(4, 7))
    total = np.zeros(u.shape, dtype=F32)
    for _ in range(k):
        ou, ov = (float(o) for o in rng.normal(0.0, 0.5 * radius, size=2))
        s = radius * rng.uniform(0.35, 0.65)
        total += rng.uniform(0.5, 1.0) * np.exp(-((u - cu - ou) ** 2 + (v - cv - ov) ** 2) / (2 * s * s))
    # Summed (not max-ed) Gaussians merge into one amorphous patch; noise added before the callers' threshold
    # frays the margin instead of just modulating the brightness.
    rough = _smooth_noise(rng, u.shape, int(rng.integers(20, 30)))
    return np.clip(total / max(float(total.max()), 1e-6) + 0.35 * rough * (total > 0.02), 0.0, 1.0)


def _draw_findings(
    rng: np.random.Generator,
    specs: list[FindingSpec],
    u: np.ndarray,
    v: np.ndarray,
    lungs: dict[Side, _Lung],
    heart_hard: np.ndarray,
    lung_darkness: np.ndarray,
    contrast: float,
) -> tuple[np.ndarray, np.ndarray, list[DrawnFinding]]:
    """Returns (additive intensity, lung-marking keep factor, drawn findings)."""
    add = np.zeros(u.shape, dtype=F32)
    keep_markings = np.ones(u.shape, dtype=F32)
    drawn: list[DrawnFinding] = []
    for spec in specs:
        out = DrawnFinding(spec)
        if spec.type is FindingType.CARDIOMEGALY:
            # The heart itself was drawn enlarged; the finding's box is the heart.
            out.masks.append(heart_hard)
            out.sides.append(None)
        elif spec.type is FindingType.EDEMA:
            strength = 0.22 if spec.severity == "mild" else 0.28
            for side in spec.sides:
                lung = lungs[side]
                sx, sy = rng.uniform(0.17, 0.24), rng.uniform(0.24, 0.32)
                # Perihilar ("bat wing") to lower-zone predominant, as the distribution of edema varies.
                cx, cy = rng.uniform(0.22, 0.34), rng.uniform(-0.14, 0.14)
                # A flat-topped (super-Gaussian) perihilar haze: dense centrally, fading over a short distance.
                haze = np.exp(-(((lung.x - cx) ** 2 / (2 * sx * sx) + (v - cy) ** 2 / (2 * sy * sy)) ** 2))
                # Interstitial edema is reticular, not a flat veil.
                texture = 0.75 + 0.5 * np.abs(_smooth_noise(rng, u.shape, 30))
                add += contrast * strength * haze * texture * lung.soft
                out.masks.append((haze > 0.45) & lung.hard)
                out.sides.append(side)
        elif spec.type is FindingType.PLEURAL_EFFUSION:
            for side in spec.sides:
                lung = lungs[side]
                q = np.clip((lung.x - lung.x_medial) / (lung.x_lateral - lung.x_medial), 0.0, 1.0)
                # Meniscus: the fluid surface climbs higher along the lateral chest wall. A small effusion only
                # blunts the costophrenic angle; a moderate one rises over the dome and hides it.
                if spec.severity == "small":
                    medial = lung.v_costophrenic + 0.02
                    lateral = lung.v_costophrenic - rng.uniform(0.14, 0.22)
                else:
                    medial = lung.v_dome_top - rng.uniform(0.02, 0.1)
                    lateral = medial - rng.uniform(0.12, 0.25)
                meniscus = medial + (lateral - medial) * q * q
                fluid = _smoothstep(v - meniscus, -0.02, 0.05) * lung.envelope
                # Fluid is soft-tissue dense: it cancels most of the lung's darkness (and hides the dome).
                gradient = 0.75 + 0.25 * _smoothstep(v - meniscus, 0.0, 0.25)
                add += contrast * 0.8 * fluid * gradient * lung_darkness * lung.soft
                out.masks.append((fluid >= 0.5) & lung.hard)
                out.sides.append(side)
        elif spec.type is FindingType.PNEUMOTHORAX:
            side = spec.sides[0]
            lung = lungs[side]
            depth = rng.uniform(0.05, 0.08) if spec.severity == "small" else rng.uniform(0.09, 0.14)
            reach = rng.uniform(0.30, 0.42) if spec.severity == "small" else rng.uniform(0.45, 0.62)
            width = depth * (1.0 - _smoothstep(lung.t, reach * 0.55, reach))
            region = (lung.to_wall < width) & lung.hard & (width > 0.01)
            # No lung markings lateral to the visceral pleural line, darker (air without lung tissue; the periphery
            # of a normal lung is brighter than its centre, so a faint darkening would vanish), and the line itself.
            keep_markings *= np.where(region, F32(0.0), F32(1.0))
            add -= contrast * 0.22 * region
            line = np.exp(-(((lung.to_wall - width) / 0.007) ** 2)) * (width > 0.02) * lung.soft
            add += contrast * 0.12 * line
            out.masks.append(region)
            out.sides.append(side)
        elif spec.type is FindingType.SUPPORT_DEVICE:
            # Right internal jugular central line down to the SVC: bright, thin, and not made subtle.
            pts = np.array([[-0.45, -1.25], [-0.30, -0.92], [-0.14, -0.66], [-0.07, -0.30]], dtype=F32)
            pts += rng.normal(0.0, 0.025, size=pts.shape).astype(F32)
            dist = _segment_distance(u, v, pts)
            add += 0.35 * np.exp(-((dist / 0.008) ** 2))
            out.masks.append(dist < 0.016)
            out.sides.append(Side.RIGHT)
        else:
            for side in spec.sides:
                lung = lungs[side]
                zone = spec.zone or Zone.MIDDLE
                if spec.type in (FindingType.CONSOLIDATION, FindingType.OPACITY):
                    radius = rng.uniform(0.09, 0.13) if spec.severity == "mild" else rng.uniform(0.12, 0.18)
                    centre = _sample_point(rng, lung, zone, 0.5 * radius, u, v)
                    if centre is None:
                        continue
                    blob = _blob(rng, u, v, centre[0], centre[1], radius)
                    if spec.type is FindingType.CONSOLIDATION:
                        # Dense, fairly well defined, mottled.
                        shape = _smoothstep(blob, 0.2, 0.6)
                        mottle = 0.8 + 0.2 * _smooth_noise(rng, u.shape, 30)
                        add += contrast * 0.27 * shape * (0.6 + 0.4 * blob) * mottle * lung.soft
                    else:
                        # Ground-glass: fainter, hazier margins.
                        shape = _smoothstep(blob, 0.1, 0.7)
                        add += contrast * 0.19 * shape * lung.soft
                    mask = (shape >= 0.5) & lung.hard
                elif spec.type is FindingType.NODULE:
                    radius = rng.uniform(0.026, 0.034) if spec.severity == "small" else rng.uniform(0.034, 0.048)
                    centre = _sample_point(rng, lung, zone, radius + 0.03, u, v)
                    if centre is None:
                        continue
                    dist = np.hypot(u - centre[0], v - centre[1])
                    disk = _smoothstep(radius - dist, -0.006, 0.006)
                    # Clipped to the lung field like every lung lesion (a small lung leaves a near-edge place only).
                    add += contrast * 0.17 * disk * (1.0 - 0.3 * np.clip(dist / radius, 0, 1) ** 2) * lung.soft
                    mask = (dist <= radius) & lung.hard
                elif spec.type is FindingType.ATELECTASIS:
                    centre = _sample_point(rng, lung, zone, 0.07, u, v)
                    if centre is None:
                        continue
                    cu, cv = centre
                    band = np.zeros(u.shape, dtype=F32)
                    sign = 1.0 if side is Side.LEFT else -1.0  # tilt mirrored: both sides droop laterally
                    angle = sign * math.radians(rng.uniform(-8.0, 18.0))
                    length = rng.uniform(0.16, 0.28)
                    for k in range(1 + int(rng.random() < 0.35)):
                        offset = 0.05 * k
                        thick = rng.uniform(0.014, 0.022)
                        ca, sa = math.cos(angle), math.sin(angle)
                        along = (u - cu) * ca + (v - cv - offset) * sa
                        across = -(u - cu) * sa + (v - cv - offset) * ca + rng.uniform(-0.6, 0.6) * along**2
                        window = _smoothstep(length / 2 - np.abs(along), 0.0, 0.04)
                        band = np.maximum(band, np.exp(-(across**2) / (2 * thick * thick)) * window)
                    add += contrast * 0.22 * band * lung.soft
                    mask = (band > 0.3) & lung.hard
                else:
                    raise ValueError(f"cannot draw {spec.type}")
                out.masks.append(mask)
                out.sides.append(side)
        # Keep only components that are actually visible in the image (jitter can push a lesion off an edge).
        kept = [(m, s) for m, s in zip(out.masks, out.sides) if m.sum() >= 4]
        out.masks = [m for m, _ in kept]
        out.sides = [s for _, s in kept]
        out.boxes = [b for b in (_box(m) for m in out.masks) if b is not None]
        if out.masks:
            if spec.bilateral and len(out.masks) == 1:
                # A bilateral finding that lost one side is reported as one-sided.
                out.spec = FindingSpec(spec.type, (out.sides[0],), spec.zone, spec.severity, spec.hedged, spec.pneumonia)
            drawn.append(out)
    return add, keep_markings, drawn


# --------------------------------------------------------------------------------------------------------- frontal


def render_frontal(seed: int, index: int, specs: list[FindingSpec], image_size: int, difficulty: float) -> RenderedImage:
    """One PA chest radiograph with ``specs`` drawn in; deterministic in (seed, index, specs, size, difficulty)."""
    rng = np.random.default_rng([seed, index, STREAM_ANATOMY])
    height, width = image_size_for(rng, image_size)
    u, v = _canonical_grid(rng, height, width)
    au = np.abs(u)
    contrast = 1.0 / difficulty

    # Torso outline with sloping shoulders and a neck; thickness falls off towards the flanks.
    torso_half = 0.24 + rng.uniform(0.90, 0.98) * _smoothstep(v, -1.22, -0.82) - 0.03 * np.clip(v, 0, None) ** 2
    q = np.clip(1.0 - (u / np.maximum(torso_half, 0.05)) ** 2, 0.0, 1.0)
    torso = _smoothstep(torso_half - au, -0.015, 0.015)
    img = 0.03 + torso * (0.26 + 0.34 * np.sqrt(q))
    # Upper abdomen: denser than the chest, with a lumpy low-frequency texture (bowel, liver edge).
    img += torso * _smoothstep(v, 0.35, 0.9) * (0.05 + 0.03 * _smooth_noise(rng, u.shape, 8))

    # Mediastinal silhouette: its right and left borders as functions of height. Above the hila it is the narrow
    # band of the great vessels (with the aortic knob on the left); below, the heart bulges out on both sides,
    # a third of its width to the patient's right (image left), two thirds to the left, resting on the diaphragm.
    cardiomegaly = next((s for s in specs if s.type is FindingType.CARDIOMEGALY), None)
    if cardiomegaly is None:
        ctr_target = rng.uniform(0.38, 0.47)
    else:
        ctr_target = rng.uniform(0.55, 0.60) if cardiomegaly.severity == "mild" else rng.uniform(0.60, 0.68)
    heart_width = ctr_target * 2 * 0.87  # the inner thorax spans about +-0.87
    med_r, med_l = rng.uniform(0.09, 0.11), rng.uniform(0.09, 0.11)
    bulge_r = heart_width * rng.uniform(0.3, 0.36) - med_r
    bulge_l = heart_width - med_r - bulge_r - med_l
    # Inspiration depth: the lung fields' height (and the heart resting on the diaphragm moves with them).
    inspiration = rng.uniform(0.8, 1.12)
    floor = -0.75 + (rng.uniform(0.42, 0.5) + 0.75) * inspiration
    top_r, top_l = rng.uniform(-0.08, 0.0), rng.uniform(-0.2, -0.1)
    border_r = med_r + bulge_r * _heart_profile(v, top_r, floor, rng.uniform(0.5, 0.65))
    border_l = med_l + bulge_l * _heart_profile(v, top_l, floor, rng.uniform(0.65, 0.8))
    border_l += rng.uniform(0.03, 0.05) * np.exp(-(((v + rng.uniform(0.3, 0.38)) / 0.06) ** 2))  # aortic knob
    silhouette = _smoothstep(u + border_r, -0.025, 0.025) * _smoothstep(border_l - u, -0.025, 0.025)
    # No floor cut: below the domes everything is soft tissue anyway, and the heart must meet the diaphragm.
    heart = silhouette * _smoothstep(v - min(top_r, top_l), 0.0, 0.15)

    lungs = {side: _lung(rng, u, v, side, silhouette, inspiration) for side in (Side.RIGHT, Side.LEFT)}
    lung_soft = np.maximum(lungs[Side.RIGHT].soft, lungs[Side.LEFT].soft)
    # The heart as a finding: the silhouette below the hila and above the diaphragm.
    diaphragm = np.where(u < 0, lungs[Side.RIGHT].dome, lungs[Side.LEFT].dome)
    heart_hard = (silhouette >= 0.5) & (v > min(top_r, top_l)) & (v < diaphragm)
    lung_depth = np.maximum(lungs[Side.RIGHT].depth, lungs[Side.LEFT].depth)
    # Lungs are darkest centrally and over the upper zones; breast / chest-wall tissue lightens the bases.
    lung_darkness = 0.42 * (0.55 + 0.45 * _smoothstep(lung_depth, 0.0, 0.18)) * (1 - 0.22 * _smoothstep(v, 0.0, 0.6))
    lung_darkness *= 1.0 + 0.08 * _smooth_noise(rng, u.shape, 6)
    img -= lung_darkness * lung_soft
    img += 0.03 * silhouette + 0.02 * heart
    trachea = _smoothstep(0.035 - np.abs(u - 0.005), -0.012, 0.012) * _smoothstep(-0.28 - v, 0, 0.08)
    img -= 0.06 * trachea

    # Spine: faint vertebral bodies and discs, seen through the mediastinum and heart.
    spine = _smoothstep(0.075 - au, -0.015, 0.015)
    vert = _smoothstep(np.cos(2 * np.pi * (v / 0.105 + rng.uniform(0, 1))), -0.6, 0.4)
    img += spine * (0.035 + 0.02 * vert) * (1 - 0.4 * heart)

    # Ribs: posterior ribs arch up from the spine, then sweep down along the lateral wall, spacing widening
    # downwards; anterior ribs (fainter) slope down towards the sternum. Most conspicuous against the lungs.
    g = -0.4 * au + 0.9 * au * au
    level = np.clip(v - g + 1.05, 0.0, None) ** 1.12
    post = 0.5 + 0.5 * np.cos(2 * np.pi * (level / rng.uniform(0.125, 0.14) + rng.uniform(0, 1)))
    thorax = _smoothstep(au - 0.07, 0.0, 0.05) * _smoothstep(0.93 - au, 0.0, 0.05)
    thorax *= _smoothstep(v + 0.98, 0.0, 0.05) * _smoothstep(0.62 - v, 0.0, 0.2)
    ribs = _smoothstep(post, 0.5, 0.8) * thorax
    ant = 0.5 + 0.5 * np.cos(2 * np.pi * ((v + 0.4 * au) / 0.17 + rng.uniform(0, 1)))
    ribs_ant = _smoothstep(ant, 0.7, 0.92) * thorax * _smoothstep(au - 0.25, 0.0, 0.1) * _smoothstep(0.3 - v, 0, 0.15)
    rib_amp = rng.uniform(0.045, 0.065) * (0.45 + 0.55 * lung_soft) * (1 - 0.5 * heart)
    img += rib_amp * (ribs + 0.4 * ribs_ant)

    # Clavicles, computed on the top rows only (they never reach lower; a row's smallest v grows with the row).
    top = slice(0, int((v.min(axis=1) < -0.6).sum()))
    for side_sign in (-1.0, 1.0):
        pts = np.array([[0.06, -0.78], [0.35, -0.86], [0.70, -0.93]], dtype=F32)
        pts[:, 1] += rng.normal(0.0, 0.02)
        pts[:, 0] *= side_sign
        dist = _segment_distance(u[top], v[top], pts)
        img[top] += 0.08 * _smoothstep(0.035 - dist, -0.012, 0.012)

    # Gastric bubble under the left hemidiaphragm, often.
    if rng.random() < 0.6:
        bu, bv = rng.uniform(0.35, 0.5), lungs[Side.LEFT].v_costophrenic - rng.uniform(0.02, 0.08)
        bubble = ((u - bu) / 0.09) ** 2 + ((v - bv) / 0.05) ** 2
        img -= 0.08 * _smoothstep(1.0 - bubble, 0.0, 0.6) * (1 - lung_soft)

    findings_add, keep_markings, drawn = _draw_findings(
        rng, specs, u, v, lungs, heart_hard, lung_darkness, contrast
    )

    # Lung markings: branching vessels fanning out from each hilum, thinning and fading towards the periphery.
    hx = au - 0.2
    hy = v + 0.08
    radius = np.sqrt(hx * hx + hy * hy)
    angle = np.arctan2(hy, hx)
    # A sum of angular sinusoids whose phases drift with the radius: its zero crossings are wandering radial
    # lines; integer frequencies keep it seamless around the hilum, and each side gets its own phases.
    wander = np.zeros(u.shape, dtype=F32)
    right_side = (u > 0).astype(F32)
    for freq in rng.choice(np.arange(3, 13), size=5, replace=False):
        phase = rng.uniform(0, 2 * np.pi) + right_side * rng.uniform(1.0, 5.0)
        drift = rng.uniform(-9.0, 9.0)
        wander += np.sin(float(freq) * angle + drift * radius + phase) / math.sqrt(float(freq))
    # Line width ~ threshold / gradient, and the angular gradient falls as 1/radius: a threshold shrinking with
    # the radius keeps vessels from fattening towards the periphery (they taper instead).
    vessels = 0.065 * np.exp(-((wander / (0.5 * np.exp(-radius / 0.3) + 0.06)) ** 2))
    vessels *= np.exp(-radius / 0.55) * _smoothstep(radius, 0.04, 0.16)
    hilum = np.exp(-((radius / 0.1) ** 2)) * (0.8 + 0.4 * _smooth_noise(rng, u.shape, 20))
    img += (vessels + 0.06 * hilum) * lung_soft * keep_markings

    img += findings_add

    # Exposure: smooth low-frequency variation, then grainy noise, then a random gamma.
    img *= 1.0 + 0.07 * _smooth_noise(rng, u.shape, 3)
    noise = _blur3(rng.normal(0.0, 1.0, size=img.shape).astype(F32))
    img += rng.uniform(0.018, 0.03) * noise
    img = np.clip(img, 0.0, 1.0) ** rng.uniform(0.85, 1.1)
    pixels = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)

    # The cardiothoracic ratio as drawn: widest heart extent over the widest inner thoracic extent.
    lung_any = lungs[Side.RIGHT].hard | lungs[Side.LEFT].hard
    heart_cols = np.flatnonzero(heart_hard.any(axis=0))
    lung_cols = np.flatnonzero(lung_any.any(axis=0))
    ctr = float((heart_cols[-1] - heart_cols[0] + 1) / (lung_cols[-1] - lung_cols[0] + 1)) if heart_cols.size and lung_cols.size else 0.0
    return RenderedImage(pixels=pixels, findings=drawn, cardiothoracic_ratio=ctr, lung=lung_any)


# --------------------------------------------------------------------------------------------------------- lateral


def render_lateral(seed: int, index: int, image_size: int) -> np.ndarray:
    """A plain lateral view (no findings drawn): it exists so loaders' frontal-view filters get exercised."""
    rng = np.random.default_rng([seed, index, STREAM_LATERAL])
    height, width = image_size_for(rng, image_size)
    u, v = _canonical_grid(rng, height, width)
    body = _smoothstep(1.0 - ((u - 0.02) / 0.86) ** 2 - ((v - 0.1) / 1.35) ** 2, 0.0, 0.1)
    img = 0.03 + 0.55 * body
    lung = _smoothstep(1.0 - ((u + 0.02) / 0.58) ** 2 - ((v + 0.05) / 0.72) ** 2, 0.0, 0.15)
    lung *= _smoothstep(0.5 - 0.15 * u - v, 0.0, 0.04)
    heart = _smoothstep(1.0 - ((u + 0.25) / 0.3) ** 2 - ((v - 0.3) / 0.28) ** 2, 0.0, 0.2)
    img -= 0.33 * lung * (1.0 - heart)
    spine = _smoothstep(0.09 - np.abs(u - 0.55 - 0.08 * v), -0.01, 0.01)
    img += spine * (0.10 + 0.05 * _smoothstep(np.cos(2 * np.pi * v / 0.11), -0.5, 0.3))
    img += 0.08 * _smoothstep(0.02 - np.abs(u + 0.66 + 0.05 * v), -0.01, 0.01) * (v > -0.8) * (v < 0.4)
    img *= 1.0 + 0.07 * _smooth_noise(rng, u.shape, 3)
    img += 0.025 * _blur3(rng.normal(0.0, 1.0, size=img.shape).astype(F32))
    return np.clip(np.clip(img, 0.0, 1.0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
