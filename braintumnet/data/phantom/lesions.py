"""Tumours on CE-T1 by type, drawn into the subject's anatomy on the 1 mm template grid.

The paper classifies glioma, metastasis and meningioma on CE-T1 (§2.1.1). Each type is drawn the way radiologists
tell them apart, with parameter ranges that overlap so the task is not trivial:

- glioma (high grade): intra-axial in white matter, lobulated, thick irregular enhancing rim around necrosis, large
  edema along the white matter; some cross the midline through the corpus callosum;
- metastasis: 1-4 round lesions (5-30 mm) at the grey-white junction, thin smooth rim or solid, edema out of
  proportion to their size;
- meningioma: extra-axial, a broad base on the dura (convexity, falx or skull base), homogeneous intense enhancement,
  a dural tail, a CSF cleft between tumour and brain, little edema.

Atypical cases (``plan.ATYPICAL``) swap one hallmark: a glioma without necrosis, a solitary large necrotic metastasis,
a meningioma with edema. Every mass pushes the brain aside (``Push``) rather than overwriting it.

Masks: 1 = tumour (enhancing rim + necrotic core), 2 = peritumoral edema. A meningioma's dural tail enhances but is not
tumour in the mask (reactive dura), as most annotation protocols have it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi

from braintumnet.data.phantom.anatomy import Anatomy, load_anatomy, smooth_noise

CSF_SIGNAL = 0.25  # relative to white matter, as the anatomy's CSF


@dataclass
class Push:
    """Mass effect: tissue within ``radius`` of ``centre`` is moved out of the way, fading over ``reach`` mm.

    A point at distance r samples the template at distance r_t, where r_t³ = r³ - radius³·w(r): the volume of a ball
    of ``radius`` is pushed outwards (monotone, so no folding), w = 1 inside and exp(-((r - radius)/reach)²) outside.
    """

    centre: np.ndarray
    radius: float
    reach: float

    def apply(self, pts: np.ndarray) -> np.ndarray:
        d = pts - self.centre.reshape(3, *([1] * (pts.ndim - 1)))
        r = np.sqrt((d * d).sum(0)) + 1e-6
        w = np.exp(-np.square(np.maximum(r - self.radius, 0.0) / self.reach))
        r_t = np.cbrt(np.maximum(r**3 - self.radius**3 * w, 0.0))
        return pts - d * (1.0 - r_t / r)


@dataclass
class Lesion:
    """One mass: its kind, centre (template voxels), size, extent of its box and its push; ``p`` holds the rest."""

    kind: str
    centre: np.ndarray
    radius: float
    half: float  # half-width of the box it is drawn in, mm
    push: Push
    p: dict = field(default_factory=dict)


@lru_cache(maxsize=1)
def candidates() -> dict[str, np.ndarray]:
    """Voxels where each kind of lesion may be centred (every 2nd voxel of the anatomy; built once per process)."""
    anat = load_anatomy()
    sub = (slice(None, None, 2),) * 3
    wm, gm, csf = anat.wm[sub], anat.gm[sub], anat.csf[sub]
    depth = -anat.sdist[sub].astype(np.float32)
    x, y, z = np.meshgrid(*(np.arange(0, n, 2) + anat.affine[i, 3] for i, n in enumerate(anat.shape)), indexing="ij")
    masks = {
        "white_matter": (wm > 0.8) & (depth > 14) & (z > -15),
        "corpus_callosum": (wm > 0.8) & (np.abs(x) < 4) & (z > 8) & (z < 28) & (y > -35) & (y < 25),
        # Not in the brainstem (rare there, and easily mistaken for something else), not below the field of view.
        "grey_white_junction": (gm > 0.3) & (gm < 0.6) & (wm > 0.3) & (depth > 6) & (z > -45)
        & ~((np.abs(x) < 15) & (z < 0) & (y > -45) & (y < -5)),
        "convexity": (depth > 0.3) & (depth < 1.5) & (z > 5) & (np.abs(x) > 8),
        "skull_base": (depth > 0.3) & (depth < 1.5) & (z > -45) & (z < -8) & (y > -60),
        "falx": (np.abs(x) < 1.2) & (csf > 0.5) & (depth > 10) & (z > 0) & (y > -70) & (y < 40),
    }
    return {k: (np.argwhere(m) * 2).astype(np.int16) for k, m in masks.items()}


def _depth_at(anat: Anatomy, vox: np.ndarray) -> float:
    i = tuple(np.clip(np.round(vox).astype(int), 0, np.array(anat.shape) - 1))
    return -float(anat.sdist[i])


def _pick(anat: Anatomy, where: str, rng: np.random.Generator, ok) -> np.ndarray:
    """A random candidate voxel that satisfies ``ok`` (falls back to the best of 200 tries)."""
    pool = candidates()[where]
    best, best_score = None, -np.inf
    for _ in range(200):
        vox = pool[rng.integers(len(pool))].astype(np.float64) + rng.uniform(-1, 1, 3)
        score = ok(vox)
        if score >= 0:
            return vox
        if score > best_score:
            best, best_score = vox, score
    return best


def plan_lesions(row, anat: Anatomy, rng: np.random.Generator) -> list[Lesion]:
    """Place and size the lesions of one planned case (``row``: tumor_type, atypical, location, n_lesions)."""
    kind = row["tumor_type"]
    if kind == "glioma":
        return [_plan_glioma(row, anat, rng)]
    if kind == "metastasis":
        return _plan_metastases(row, anat, rng)
    if kind == "meningioma":
        return [_plan_meningioma(row, anat, rng)]
    raise ValueError(f"unknown tumour type {kind!r}")


def _plan_glioma(row, anat, rng) -> Lesion:
    radius = rng.uniform(13.0, 25.0)
    crosses = row["location"] == "corpus_callosum"
    where = "corpus_callosum" if crosses else "white_matter"
    centre = _pick(anat, where, rng, lambda v: _depth_at(anat, v) - (0.55 * radius + 6))
    axes = rng.uniform(0.8, 1.2, 3)
    if crosses:  # the "butterfly": stretched left-right across the midline along the corpus callosum
        axes[0] = rng.uniform(1.5, 1.8)
        radius *= 0.85
    edema = min(radius * rng.uniform(1.7, 2.5), 52.0)
    push = Push(centre, 0.5 * radius, 0.8 * radius)
    p = dict(axes=axes, crosses=crosses, lobulation=rng.uniform(0.10, 0.22), wall=rng.uniform(3.5, 9.0),
             necrosis=row["atypical"] != "no_necrosis", enhance=rng.uniform(1.3, 1.75),
             core=rng.uniform(0.22, 0.45), edema=edema, edema_drop=rng.uniform(0.18, 0.32))
    return Lesion("glioma", centre, radius, max(edema * 1.1, push.radius + 2.5 * push.reach) + 4, push, p)


def _plan_metastases(row, anat, rng) -> list[Lesion]:
    large = row["atypical"] == "large_necrotic"
    lesions: list[Lesion] = []
    for i in range(int(row["n_lesions"])):
        if large:
            diameter = rng.uniform(32.0, 44.0)
        else:
            diameter = rng.uniform(12.0, 30.0) if i == 0 else rng.uniform(5.0, 20.0)
        radius = diameter / 2

        def ok(v, radius=radius):
            apart = min((np.linalg.norm(v - o.centre) - o.radius - radius - 15 for o in lesions), default=0.0)
            return min(_depth_at(anat, v) - radius - 2, apart)

        centre = _pick(anat, "grey_white_junction", rng, ok)
        ring = large or (diameter >= 10 and rng.random() < 0.75)
        # Edema out of proportion: several times the lesion's radius, even for small ones (but some have little).
        edema = min(max(radius * rng.uniform(2.5, 4.5), rng.uniform(8.0, 16.0)), 40.0)
        if rng.random() < 0.1:  # a few have little edema
            edema = radius * rng.uniform(1.2, 1.5)
        push = Push(centre, 0.45 * radius, 0.8 * radius + 2)
        p = dict(axes=rng.uniform(0.93, 1.07, 3), lobulation=rng.uniform(0.06, 0.10) if large else 0.03,
                 wall=rng.uniform(3.0, 7.0) if large else rng.uniform(1.2, 3.0), necrosis=ring,
                 enhance=rng.uniform(1.3, 1.75), core=rng.uniform(0.25, 0.5), edema=edema,
                 edema_drop=rng.uniform(0.24, 0.36))
        lesions.append(Lesion("metastasis", centre, radius, max(edema * 1.1, push.radius + 2.5 * push.reach) + 4,
                              push, p))
    return lesions


def _plan_meningioma(row, anat, rng) -> Lesion:
    where = row["location"]
    radius = rng.uniform(10.0, 24.0)
    if where == "falx":
        base = _pick(anat, "falx", rng, lambda v: _depth_at(anat, v) - radius * 0.6)
        base[0] = anat.to_voxel([0.0, 0.0, 0.0])[0]  # on the midline plane
        normal = np.array([rng.choice([-1.0, 1.0]), 0.0, 0.0])
    else:
        up = where == "skull_base"
        base = _pick(anat, where, rng, lambda v: (_inward(anat, v)[2] - 0.4) if up else 0.0)
        normal = _inward(anat, base)
    height = rng.uniform(0.3, 0.65)  # how far the sphere's centre sits inside the dura, in radii
    centre = base + normal * height * radius
    edema_scale = rng.uniform(1.7, 2.4) if row["atypical"] == "edema" else rng.uniform(1.0, 1.35)
    push = Push(centre, 0.85 * radius, 0.6 * radius)
    tail = rng.uniform(8.0, 20.0) if rng.random() < 0.75 else 0.0
    p = dict(location=where, base=base, normal=normal, axes=rng.uniform(0.9, 1.1, 3), enhance=rng.uniform(1.55, 1.95),
             edema=radius * edema_scale, edema_drop=rng.uniform(0.15, 0.28), tail=tail,
             tail_signal=rng.uniform(1.1, 1.4), cleft=rng.uniform(1.0, 2.2) if rng.random() < 0.8 else 0.0,
             with_edema=row["atypical"] == "edema" or rng.random() < 0.35)
    reach = max(radius * edema_scale * 1.1, height * radius + radius * np.sqrt(1 - height**2) + tail,
                push.radius + 2.5 * push.reach)
    return Lesion("meningioma", centre, radius, reach + 5, push, p)


def _inward(anat: Anatomy, vox: np.ndarray) -> np.ndarray:
    """Unit normal of the intracranial surface at ``vox``, pointing into the head (minus the distance gradient)."""
    i = np.clip(np.round(vox).astype(int), 3, np.array(anat.shape) - 4)
    box = anat.sdist[i[0] - 3:i[0] + 4, i[1] - 3:i[1] + 4, i[2] - 3:i[2] + 4].astype(np.float32)
    g = np.array([np.mean(np.gradient(box, axis=a)) for a in range(3)])
    return -g / max(np.linalg.norm(g), 1e-6)


@dataclass(frozen=True, eq=False)
class LabelMaps:
    """Soft label fractions on a box of the template grid starting at voxel ``lo``."""

    lo: np.ndarray
    tumour: np.ndarray
    edema: np.ndarray


def draw(lesions: list[Lesion], anat: Anatomy, brain: np.ndarray, image: np.ndarray,
         rng: np.random.Generator) -> LabelMaps:
    """Draw ``lesions`` into ``image`` (in place) and return their soft label maps.

    Args:
        lesions: from ``plan_lesions``.
        anat: the static anatomy.
        brain: the subject's intracranial signal (what the masses push aside).
        image: ``brain`` plus scalp and skull; modified in place.
        rng: the case's random generator.
    """
    shape = np.array(anat.shape)
    los = [np.clip(np.floor(les.centre - les.half).astype(int), 0, shape) for les in lesions]
    his = [np.clip(np.ceil(les.centre + les.half).astype(int) + 1, 0, shape) for les in lesions]
    lo, hi = np.min(los, axis=0), np.max(his, axis=0)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grid = np.stack(np.meshgrid(*(np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi)), indexing="ij"))

    # Mass effect: compose the pushes, then resample the brain only where something moved.
    pushed = grid
    for les in lesions:
        pushed = les.push.apply(pushed)
    moved = np.abs(pushed - grid).max(0) > 0.05
    local_brain, local_image = brain[box], image[box]
    white = anat.wm[box] + 0.25 * anat.gm[box]  # where edema can spread: white matter, a little into cortex
    coords = pushed[:, moved] - lo[:, None]
    scalp = local_image[moved] - local_brain[moved]
    local_image[moved] = anat.icm[box][moved] * ndi.map_coordinates(local_brain, coords, order=1, prefilter=False,
                                                                   mode="nearest") + scalp
    white[moved] = ndi.map_coordinates(white, coords, order=1, prefilter=False, mode="nearest")

    tumour = np.zeros(hi - lo, np.float32)
    edema = np.zeros(hi - lo, np.float32)
    ctx = dict(anat=anat, lo=lo, hi=hi, image=local_image, white=white, tumour=tumour, edema=edema, rng=rng)
    for les in lesions:
        _DRAW[les.kind](les, ctx)
    image[box] = local_image
    return LabelMaps(lo=lo, tumour=tumour, edema=edema)


def _sat(x):
    return np.clip(x, 0.0, 1.0)


def _view(les: Lesion, ctx) -> tuple[tuple[slice, ...], tuple[slice, ...], np.ndarray]:
    """The lesion's own box: as slices of the drawing box and of the template grid, and its voxels' offsets from
    the lesion centre, ``(3, X, Y, Z)`` in mm."""
    shape = ctx["hi"] - ctx["lo"]
    a = np.clip(np.floor(les.centre - les.half).astype(int) - ctx["lo"], 0, shape)
    b = np.clip(np.ceil(les.centre + les.half).astype(int) + 1 - ctx["lo"], 0, shape)
    local = tuple(slice(i, j) for i, j in zip(a, b))
    grid = tuple(slice(i + o, j + o) for i, j, o in zip(a, b, ctx["lo"]))
    d = np.stack(np.meshgrid(*(np.arange(i, j, dtype=np.float32) + ctx["lo"][k] - les.centre[k]
                               for k, (i, j) in enumerate(zip(a, b))), indexing="ij"))
    return local, grid, d


def _ellipsoid_radius(d: np.ndarray, axes: np.ndarray, rng: np.random.Generator, turn: bool = True) -> np.ndarray:
    """Distance in mm on an ellipsoid's scale (``axes``: relative semi-axis lengths along x, y, z, randomly turned
    unless ``turn`` is false)."""
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    if not turn:
        q = np.eye(3)
    e = np.tensordot((q / axes[:, None]).astype(np.float32), d, axes=1)
    return np.sqrt((e * e).sum(0))


def _paint(ctx, sl, enhancing, necrotic, enhance, core, edema, edema_drop):
    """Edema darkens the tissue; then the tumour replaces it; then the label fractions are kept (max over lesions)."""
    img = ctx["image"][sl]
    img *= 1.0 - edema_drop * edema
    img[...] = img * (1.0 - enhancing - necrotic) + enhancing * enhance + necrotic * core
    ctx["tumour"][sl] = np.maximum(ctx["tumour"][sl], enhancing + necrotic)
    ctx["edema"][sl] = np.maximum(ctx["edema"][sl], edema)


def _edema(les: Lesion, ctx, sl, d, tumour) -> np.ndarray:
    """Vasogenic edema: a noisy ball around the mass, following white matter, outside the tumour."""
    rng, p = ctx["rng"], les.p
    rho = np.sqrt((d * d).sum(0)) / p["edema"] + 0.18 * smooth_noise(d.shape[1:], 12.0, rng)
    ball = _sat((1.0 - rho) * p["edema"] / 3.0)
    follows = _sat((ctx["white"][sl] - 0.35) / 0.3)
    return ball * follows * (1.0 - tumour)


def _draw_intra_axial(les: Lesion, ctx) -> None:
    """Glioma and metastasis: an intra-axial mass with an enhancing wall around a necrotic core (or solid)."""
    rng, p = ctx["rng"], les.p
    sl, gsl, d = _view(les, ctx)
    shape = d.shape[1:]
    rho = _ellipsoid_radius(d, p["axes"], rng, turn=not p.get("crosses", False)) / les.radius
    rho += p["lobulation"] * smooth_noise(shape, 0.5 * les.radius + 2, rng)
    depth = -ctx["anat"].sdist[gsl].astype(np.float32)
    tumour = _sat((1.0 - rho) * les.radius + 0.5) * _sat(depth - 1.5)  # intra-axial: stays off the dura
    if p["necrosis"]:
        # A glioma's wall is thick and ragged (its own noise), a metastasis's thin and even.
        wall = p["wall"] * (1.0 + 0.5 * smooth_noise(shape, 5.0, rng) * (les.kind == "glioma"))
        necrotic = _sat((1.0 - rho) * les.radius - wall + 0.5) * tumour
    else:
        necrotic = np.zeros_like(tumour)
    enhancing = tumour - necrotic
    texture = 0.12 if les.kind == "glioma" else 0.05
    enhance = p["enhance"] * (1.0 + texture * smooth_noise(shape, 3.0, rng))
    if not p["necrosis"] and les.kind == "glioma":  # solid, patchy: enhancing and non-enhancing parts
        enhance = p["enhance"] * (0.75 + 0.25 * np.tanh(1.5 * smooth_noise(shape, 5.0, rng)))
    _paint(ctx, sl, enhancing, necrotic, enhance, p["core"], _edema(les, ctx, sl, d, tumour), p["edema_drop"])


def _draw_meningioma(les: Lesion, ctx) -> None:
    """Extra-axial: a dural-based mass cut flat at the dura, CSF cleft, dural tail, little edema."""
    rng, p = ctx["rng"], les.p
    sl, gsl, d = _view(les, ctx)
    shape = d.shape[1:]
    rho = _ellipsoid_radius(d, p["axes"], rng) / les.radius + 0.04 * smooth_noise(shape, 0.5 * les.radius + 2, rng)
    from_centre_of_base = d + (les.centre - p["base"]).astype(np.float32)[:, None, None, None]
    from_base = np.tensordot(p["normal"].astype(np.float32), from_centre_of_base, axes=1)  # brain side > 0
    icm = ctx["anat"].icm[gsl]
    inside = _sat(from_base + 0.5) * icm
    tumour = _sat((1.0 - rho) * les.radius + 0.5) * inside
    img = ctx["image"][sl]
    if p["cleft"] > 0:  # a thin CSF rim between tumour and brain
        gap = (rho - 1.0) * les.radius
        cleft = _sat(1.0 - np.abs(gap - p["cleft"] / 2) / (p["cleft"] / 2 + 0.5)) * inside * (1.0 - tumour)
        img[...] = img * (1.0 - cleft) + cleft * CSF_SIGNAL
    if p["tail"] > 0:  # thickened enhancing dura running on from the base's rim, tapering over p["tail"] mm
        along = np.sqrt((from_centre_of_base**2).sum(0))
        rim = np.sqrt(max(les.radius**2 - float(np.sum((les.centre - p["base"]) ** 2)), 1.0))
        taper = _sat(1.0 - (along - rim) / p["tail"]) * (along > 0.8 * rim)
        if p["location"] == "falx":  # along the midline plane, inside the fissure
            off = np.abs(from_base)
            within = icm
        else:  # along the dura, at the intracranial surface
            off = np.abs(ctx["anat"].sdist[gsl].astype(np.float32) - 0.3)
            within = 1.0
        tail = _sat(0.5 + 1.2 * taper - off) * (taper > 0) * within * (1.0 - tumour)
        img[...] = img * (1.0 - tail) + tail * p["tail_signal"]
    edema = np.zeros_like(tumour)
    if p["with_edema"]:
        edema = _edema(les, ctx, sl, d, tumour) * (icm > 0.5)
    enhance = p["enhance"] * (1.0 + 0.04 * smooth_noise(shape, 3.0, rng))
    _paint(ctx, sl, tumour, np.zeros_like(tumour), enhance, 0.0, edema, p["edema_drop"])


_DRAW = {"glioma": _draw_intra_axial, "metastasis": _draw_intra_axial, "meningioma": _draw_meningioma}
