"""The phantom patient and its frame: per-patient invariants, pose, exposure, disease state, finding grades.

Shared by the frontal (`anatomy`) and lateral (`lateral`) renderers. Canonical units: 1 = half the image
width, origin at the image centre; `inside` and `tube` are the anti-aliased primitives both views draw with.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter1d

CTR_BY_GRADE = {1: 0.55, 2: 0.60, 3: 0.67}
EFFUSION_HEIGHT = {1: 0.18, 2: 0.36, 3: 0.60}
PTX_RIM = {1: 0.10, 2: 0.20, 3: 0.35}
EDEMA_HAZE = {1: 0.18, 2: 0.30, 3: 0.42}
AP_MAGNIFICATION = 1.12
LAYER_SCALE = 0.75  # resolution of the per-patient static layers relative to the image
DEVICES = ["ett", "central_line", "ng_tube", "pacemaker", "ecg_leads"]


@dataclass
class Patient:
    """Per-patient invariants (canonical units: 1 = half the image width)."""
    subject_id: int = 10000000
    sex: str = "F"
    age: int = 60
    race: str = "WHITE"
    tw: float = 0.78            # thorax (lung) half-width at its widest
    apex: float = -0.78         # lung apex height
    dome: float = 0.40          # right hemidiaphragm dome top at mid inspiration
    dome_lr: float = 0.04       # left dome lower than the right by this
    cp_drop: float = 0.15       # costophrenic angle below the dome top
    ctr0: float = 0.46          # normal cardiothoracic ratio of this patient
    ctr_jit: float = 0.0        # fixed offset of the diseased CTR (|.| <= 0.015)
    heart_b: float = 0.31       # heart vertical semi-axis
    heart_shear: float = 0.45   # heart long axis tilt (down and to the left)
    mw: float = 0.155           # upper mediastinum half-width
    unfold: float = 0.0         # aortic unfolding 0..1 (age)
    bone: float = 1.0           # bone density factor (age, sex)
    soft: float = 1.0           # soft-tissue thickness factor (habitus)
    breast: float = 0.0         # breast shadow strength (0 for most men)
    rib_phase: float = 0.0
    clav: float = -0.60         # clavicle medial end height
    texture_seed: int = 0

    def to_row(self) -> dict:
        return asdict(self)


@dataclass
class Pose:
    tx: float = 0.0             # px of the image
    ty: float = 0.0
    rot_deg: float = 0.0
    scale: float = 1.0
    inspiration: float = 0.0    # -1 (poor) .. 1 (deep)


@dataclass
class Exposure:
    k: float = 1.0              # attenuation-to-density gain (kVp / mAs proxy)
    gamma: float = 1.0
    offset: float = 0.0         # brightness offset after windowing
    noise: float = 0.02         # quantum noise standard deviation (of [0, 1])
    blur: float = 0.7           # unsharpness in px at 256 px
    heel: float = 0.0           # left-right exposure gradient (anode heel effect)


@dataclass
class State:
    """Disease state: severity 0-3 and side per finding key (schema.FINDING_KEYS values)."""
    sev: dict = field(default_factory=dict)
    side: dict = field(default_factory=dict)

    def get(self, key: str) -> tuple[int, str]:
        return int(self.sev.get(key, 0)), str(self.side.get(key, "") or "")


def pose_matrix(pose: Pose, size: int) -> np.ndarray:
    """3x3 homogeneous matrix mapping a canonical pixel (x, y, 1) to the image pixel of this pose."""
    c = (size - 1) / 2.0
    th = np.deg2rad(pose.rot_deg)
    r = pose.scale * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    m = np.eye(3)
    m[:2, :2] = r
    m[:2, 2] = np.array([c, c]) + np.array([pose.tx, pose.ty]) - r @ np.array([c, c])
    return m


def pair_affine(prior: Pose, followup: Pose, size: int) -> np.ndarray:
    """2x3 matrix mapping a PRIOR image pixel (x, y) to the FOLLOW-UP image pixel of the same anatomy."""
    return (pose_matrix(followup, size) @ np.linalg.inv(pose_matrix(prior, size)))[:2]


def image_ctr(patient: Patient, state: State, view: str = "PA") -> float:
    """The cardiothoracic ratio drawn in an image of this view (see the module docstring)."""
    g, _ = state.get("cardiomegaly")
    ctr = patient.ctr0 if g == 0 else CTR_BY_GRADE[g] + patient.ctr_jit
    return ctr * (AP_MAGNIFICATION if view == "AP" else 1.0)


# --------------------------------------------------------------------------- helpers

_GRID: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def grid(size: int):
    if size not in _GRID:
        i = np.arange(size, dtype=np.float32)
        _GRID[size] = (i[None, :].repeat(size, 0), i[:, None].repeat(size, 1))
    return _GRID[size]


def inside(f, eps):
    """Anti-aliased indicator of f < 0 (f in canonical units, eps = one pixel)."""
    return np.clip(0.5 - f / eps, 0.0, 1.0)


def tube(d, half):
    """Projected thickness of a cylinder of radius `half` at distance d from its axis (0..1)."""
    t = np.clip(1.0 - (d / half) ** 2, 0.0, 1.0)
    return np.sqrt(t)


def spikes(seed: int, n: int, count: int, width: float) -> np.ndarray:
    """A periodic 1-D profile of `count` random narrow peaks: vessels around a hilum by angle."""
    rng = np.random.default_rng(seed)
    out = np.zeros(n, np.float64)
    np.add.at(out, rng.uniform(0, n, count).astype(np.int64) % n, rng.uniform(0.4, 1.0, count))
    return (gaussian_filter1d(out, width, mode="wrap") * (np.sqrt(2 * np.pi) * width)).astype(np.float32)
