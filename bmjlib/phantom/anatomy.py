"""Phantom radiograph renderer: anatomy, the five findings, devices, positioning and exposure.

Part of the phantom cohort (DESIGN "The phantom cohort"), the embedded stand-in for MIMIC-CXR that the
paper's pipeline (arXiv 2310.10765 §3) runs on when no credentialed data exist. `render` draws one
radiograph from (patient invariants, disease state, pose, exposure, view) and, on request, the organ
masks of the paper's Fig. 5 (schema.ORGANS) in the same pixel grid.

Geometry. Anatomy is defined analytically in a canonical patient frame (u, v) in [-1, 1]^2: u to the
image's right (= the patient's LEFT, radiological convention), v downwards. A pose maps a canonical pixel
q (x = column, y = row) to the image pixel p = c + s R(rot) (q - c) + t, with c the image centre, s the
scale, R a rotation by `rot_deg` (positive = clockwise on screen, since y points down) and t = (tx, ty) in
pixels. Every pixel of the output is evaluated at its canonical coordinates, so masks are exact (no
resampling) and `pose_matrix` is the true transform. Inspiration depth is NOT rigid: it moves the
diaphragm domes (deeper inspiration -> lower domes), so only structures above the domes follow the
affine exactly.

Findings, severity grade 1 / 2 / 3 (0 = absent), defined physically:

* Cardiomegaly: cardiothoracic ratio (maximal transverse cardiac width / maximal internal thoracic
  width, both measured from the masks). Normal hearts have the patient's own CTR in 0.42-0.49;
  grade 1 (mild) 0.55, 2 (moderate) 0.60, 3 (severe) 0.67, each +- the patient's fixed offset <= 0.015.
  AP views magnify the heart by 12 % (as a real AP projection does); the recorded `ctr` is the image's.
* Pleural effusion (left / right / bilateral): dependent fluid whose meniscus climbs the lateral chest
  wall to a height of 0.18 / 0.36 / 0.60 of the hemithorax (costophrenic angle to apex); blunts the
  costophrenic angle and hides the hemidiaphragm; soft upper edge (layering fluid thins upwards).
* Edema (always bilateral): grade 1 interstitial = thickened vessels, Kerley B septal lines at the
  lateral bases and a faint perihilar haze; 2 = dense perihilar (bat-wing) haze; 3 = plus widespread
  patchy airspace opacity. Haze amplitude 0.18 / 0.30 / 0.42 of soft-tissue attenuation.
* Atelectasis (left / right / bilateral = bibasilar): grade 1 plate-like (discoid) band in the lower
  zone; 2 = segmental basal opacity plus 4 % (of half the image) elevation of the hemidiaphragm;
  3 = lower-lobe collapse (triangular retro-/para-cardiac opacity) with 8 % hemidiaphragm elevation
  and 3 % mediastinal shift towards the collapsed side (volume loss).
* Pneumothorax (left / right): visceral pleural line separated from the chest wall, with absent lung
  markings and increased lucency outside it; the rim is 10 / 20 / 35 % of the hemithorax width (wider
  at the apex), and the collapsed lung is slightly denser.

Support devices (distractors, not findings): endotracheal tube, central venous line, nasogastric tube,
pacemaker with lead, ECG electrodes.

Speed: the pose- and disease-independent anatomy of a patient (soft tissue, bones, vessel markings)
is drawn once on a canonical grid and resampled per pose; the rest is closed-form numpy per pixel.
A 256 px PA image with masks costs about 10 ms of CPU, plus 10-20 ms per patient and view type for
the static layers, drawn at 3/4 resolution (`phantom.figures.benchmark` prints the rate).
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from bmjlib.phantom.body import (EDEMA_HAZE, EFFUSION_HEIGHT, LAYER_SCALE, PTX_RIM, Exposure, Patient, Pose, State,
                                 grid, image_ctr, inside, pose_matrix, spikes, tube)
from bmjlib.phantom.lateral import lateral, lateral_body
from bmjlib.schema import ORGANS

# --------------------------------------------------------------------------- static layers

_LAYERS: dict[tuple, dict] = {}


def _static_layers(p: Patient, size: int, view: str) -> dict:
    """Pose- and disease-independent attenuation of one patient on a canonical grid with a margin:
    soft tissue + bones ("body"), lung markings ("marks") and a parenchymal texture ("tex").
    Computed once per patient and view type, then resampled for each pose (cheap)."""
    key = (p.texture_seed, p.subject_id, size, view)
    if key in _LAYERS:
        return _LAYERS[key]
    if len(_LAYERS) > 8:
        _LAYERS.clear()
    ap = view == "AP"
    shared = next((v for k, v in _LAYERS.items() if k[:3] == key[:3]), None)
    m = size // 9
    # the layers are drawn at LAYER_SCALE of the output resolution (bilinear resampling makes up the
    # difference; the exposure blur is of the same order) and cover the image plus a margin of m px
    G = int(round((size + 2 * m) * LAYER_SCALE))
    r = G / (size + 2 * m)
    half = size / 2.0 * r
    i = (np.arange(G, dtype=np.float32) - (G - 1) / 2.0) / half
    u = np.repeat(i[None, :], G, 0)
    v = np.repeat(i[:, None], G, 1)
    eps = 1.0 / half
    if view == "LATERAL":
        layers = {"body": lateral_body(p, u, v, eps).astype(np.float32), "margin": m, "scale": r}
        layers.update({k: shared[k] for k in ("vessels", "tex")} if shared else _lung_texture(p, u, v, size * r))
        _LAYERS[key] = layers
        return layers
    x = np.abs(u)
    tw = p.tw
    vw, apex = 0.18, p.apex
    t = np.clip((vw - v) / (vw - apex), 0.0, 1.0)
    wall = tw * np.sqrt(np.clip(1.0 - t ** 2.2, 0.0, 1.0)) - 0.03 * np.clip(v - vw, 0, None)
    xr = x / tw
    vd = np.where(u < 0, p.dome, p.dome + p.dome_lr) + (p.cp_drop / 0.3025) * np.clip(xr - 0.45, 0, None) ** 2

    # Soft tissue: a cylinder-like body with neck, shoulders, arms and (women) breasts.
    bw = tw + 0.20 + 0.06 * p.soft
    # shoulders slope from the neck (image top) down to the acromia; the body widens slightly downwards
    top = -1.12 + 0.22 * np.clip((x - 0.19) / 0.62, 0, 1) ** 1.3 + 0.5 * np.clip(x - 0.85, 0, None)
    body_w = bw + 0.04 * np.clip(v, 0, None) - 0.06 * np.clip((-0.55 - v) / 0.3, 0, 1)
    body = tube(u, body_w) * inside(top - v, eps * 3)
    # deltoids over the shoulders, and the humeral heads in the upper corners
    delt = tube(np.hypot((x - bw + 0.02) / 0.22, (v + 0.78) / 0.16), 1.0) * inside(top - v, eps * 3)
    soft = 0.85 * p.soft * body + 0.30 * delt
    if p.breast > 0:
        # lower lateral soft-tissue density: sharp inferolateral border, fading upwards and medially
        bx = (x - 0.60 * tw) / 0.32
        by = (v - 0.30) / 0.27
        fade = np.clip((v - 0.02) / 0.25, 0, 1) * np.clip((x - 0.22) / 0.2, 0, 1)
        soft += 0.17 * p.breast * inside(bx * bx + by * by - 1.0, eps * 3) * fade

    # Bones. Spine: vertebral bodies with end plates, pedicles.
    bone = np.zeros_like(u)
    spine_hw = 0.075
    vert = 0.5 + 0.5 * np.cos(2 * np.pi * (v * 9.5 + p.rib_phase))
    spine = tube(u, spine_hw) * (0.15 + 0.06 * vert)
    ped = tube(np.abs(u) - spine_hw * 0.8, 0.018) * (vert > 0.6)
    bone += (spine + 0.2 * ped) * inside(-1.05 - v, eps)
    # Posterior ribs: a phase field over arcs that rise from the spine then sweep down laterally,
    # spacing widening downwards.
    z = v + 0.24 * x - 0.80 * x ** 3 - (apex - 0.06)
    psi = 11.0 * np.clip(z / 1.08, 0.0, None) ** 0.82 + p.rib_phase
    frac = psi - np.floor(psi)
    k = np.floor(psi)
    hw = 0.25 + 0.025 * np.sin(2.1 * k + 7.0 * p.rib_phase)  # ribs differ a little in width
    rib_p = (tube(frac - 0.27, hw) + 0.6 * np.exp(-0.5 * ((frac - 0.27 - hw) / 0.03) ** 2)) \
        * (psi < 15.0) * (psi > 0.3) * (1.0 - 0.35 * np.clip(x / tw, 0, 1))  # bright inferior cortex
    rib_p *= np.clip((x - 0.05) / 0.04, 0, 1) * inside(x - wall - 0.09, eps * 4)
    # Anterior ribs: descend medially, fade out before the sternum (costal cartilage).
    za = v - 0.40 * (tw - x) - (apex - 0.10)
    psa = 5.6 * np.clip(za / 0.95, 0, None) ** 0.95 + 0.35 + p.rib_phase
    fra = psa - np.floor(psa)
    rib_a = tube(fra - 0.2, 0.2) * (psa < 6.2) * np.clip((x - 0.32 * tw) / 0.15, 0, 1) * (x < wall + 0.07)
    bone += (0.16 * rib_p + 0.10 * rib_a) * (1.0 - 0.6 * inside(vd - v, eps * 3))
    # Clavicles (higher and more horizontal in AP).
    cx = np.clip((x - 0.08) / 0.62, 0, 1.2)
    cv = p.clav - (0.07 if ap else 0.0) - 0.16 * cx + 0.04 * np.sin(np.clip(cx, 0, 1) * np.pi)
    head = np.clip(1 - cx * 3, 0, 1)  # the sternal end is thicker
    bone += (0.26 + 0.12 * head) * tube(v - cv, 0.019 + 0.012 * head) * (x > 0.07) * (x < 0.78)
    hum = tube(np.hypot(x - (bw + 0.02), v + 0.80), 0.11)
    bone += 0.45 * hum * inside(top - 0.05 - v, eps * 3)
    if ap:  # scapulae projected over the lateral upper lung fields
        sx, sy = (x - (tw - 0.01)) / 0.14, (v + 0.38) / 0.30
        bone += 0.10 * inside(sx * sx + sy * sy - 1.0, eps * 5) * (1.0 + 0.5 * tube(np.abs(sx) - 0.8, 0.25))

    layers = {"margin": m, "scale": r}
    if shared is not None:  # all views of a patient share the lung texture
        layers.update(vessels=shared["vessels"], tex=shared["tex"])
    else:
        layers.update(_lung_texture(p, u, v, size * r))
    # upper abdomen: soft-tissue mottle and bowel / colonic gas below the lowest diaphragm position
    abd = np.clip((v - vd - 0.12) / 0.1, 0, 1) * inside(x - wall - 0.05, eps * 4)
    t = layers["tex"]
    soft = soft + abd * (0.05 * t - 0.5 * np.clip(t - 0.2, 0, None))
    layers["body"] = (soft + 0.75 * p.bone * bone).astype(np.float32)
    _LAYERS[key] = layers
    return layers


def _lung_texture(p: Patient, u, v, size: float) -> dict:
    """Lung markings (vessels radiating from the hila, tapering to the periphery, plus a fine
    parenchymal grain) and a coarse texture for patchy opacities, on the canonical layer grid."""
    vh = p.dome + p.dome_lr - p.heart_b * 0.40
    hil_v = vh - p.heart_b * 0.95
    vessels = np.zeros_like(u)
    n = 1024
    for sgn, seed_off in ((-1, 11), (1, 23)):
        du = u - sgn * (p.mw + 0.07)
        dv = v - hil_v
        r = np.sqrt(du * du + dv * dv) + 1e-3
        th = np.arctan2(dv, du)
        ang = th + 0.16 * np.sin(6.0 * r + 3.0 * th) + 0.06 * np.sin(17.0 * r + 5.0 * th)  # curving vessels
        idx = ((ang + np.pi) * (n / (2 * np.pi))).astype(np.int32) % n
        tab1 = spikes(p.texture_seed + seed_off, n, 46, 2.2)
        tab2 = spikes(p.texture_seed + seed_off + 1, n, 140, 1.2)
        vessels += tab1[idx] * np.exp(-r / 0.32) * 1.3 + tab2[idx] * np.exp(-r / 0.55) * 0.45 * np.clip(r / 0.2, 0, 1)
        vessels += 0.9 * np.exp(-0.5 * ((du / 0.06) ** 2 + (dv / 0.10) ** 2))  # hilar vessels and bronchi
    rng = np.random.default_rng(p.texture_seed)
    G = u.shape[0]
    g4 = G // 4 + 1
    coarse = gaussian_filter(rng.standard_normal((g4, g4)).astype(np.float32), size / 112.0, mode="wrap")
    tex = np.asarray(Image.fromarray(coarse).resize((G, G), Image.Resampling.BILINEAR), dtype=np.float32)
    fine = gaussian_filter(rng.standard_normal((G, G)).astype(np.float32), size / 160.0)
    fine /= fine.std() + 1e-6
    return {"vessels": (vessels + 0.12 * fine).astype(np.float32),
            "tex": (0.25 * tex / (tex.std() + 1e-6)).astype(np.float32)}


def _sample(layer: np.ndarray, minv: np.ndarray, size: int, margin: int, scale: float) -> np.ndarray:
    """Bilinear resampling of a canonical layer at the canonical position of every output pixel."""
    a, b, c = minv[0]
    d, e, f = minv[1]
    c, f = c + margin + 0.5 - 0.5 * a - 0.5 * b, f + margin + 0.5 - 0.5 * d - 0.5 * e  # PIL: pixel corners
    a, b, c, d, e, f = (scale * z for z in (a, b, c, d, e, f))  # onto the layer's coarser grid
    im = Image.fromarray(layer).transform((size, size), Image.Transform.AFFINE, (a, b, c, d, e, f),
                                                     resample=Image.Resampling.BILINEAR)
    return np.array(im, dtype=np.float32)  # writable copy


# --------------------------------------------------------------------------- frontal anatomy

def _frontal(p: Patient, st: State, pose: Pose, view: str, u, v, eps, devices, layer):
    """Attenuation field and masks of a frontal (PA or AP) view in canonical coordinates u, v.
    `layer(name)` resamples a static layer at this pose."""
    ap = view == "AP"
    ins = pose.inspiration
    x = np.abs(u)
    right = u < 0  # patient's right = image left
    tw = p.tw

    # Volume loss from atelectasis elevates a hemidiaphragm and shifts the mediastinum towards it.
    at_g, at_side = st.get("atelectasis")
    lift = {0: 0.0, 1: 0.0, 2: 0.04, 3: 0.08}[at_g]
    lift_r = lift if at_side in ("right", "bilateral") else 0.0
    lift_l = lift if at_side in ("left", "bilateral") else 0.0
    shift = 0.03 * (at_g == 3) * (-1 if at_side == "right" else 1 if at_side == "left" else 0)

    # Lung apex-to-base lateral wall profile, widest at vw.
    vw = 0.18 + 0.04 * ins
    apex = p.apex - 0.02 * ins
    t = np.clip((vw - v) / (vw - apex), 0.0, 1.0)
    wall = tw * np.sqrt(np.clip(1.0 - t ** 2.2, 0.0, 1.0)) - 0.03 * np.clip(v - vw, 0, None)

    # Diaphragm domes (right higher), dome top at 45 % of the hemithorax, deep lateral recess.
    dome = np.where(right, np.float32(p.dome - lift_r + 0.07 * ins), np.float32(p.dome + p.dome_lr - lift_l + 0.07 * ins))
    xr = x / tw
    lat = np.clip(xr - 0.45, 0.0, None)
    med = np.clip(0.45 - xr, 0.0, None)
    vd = dome + (p.cp_drop / 0.3025) * lat ** 2 + 0.3 * med ** 2
    below = inside(vd - v, eps)
    thorax = inside(x - wall, eps) * (1.0 - below) * inside(apex - v, eps)

    # Heart: sheared ellipse; CTR = width / (2 tw).
    ctr = image_ctr(p, st, view)
    a = ctr * tw
    b = p.heart_b * (1.0 + 0.9 * (ctr - 0.46)) * (1.08 if ap else 1.0)
    vh = p.dome + p.dome_lr - b * 0.40 + 0.07 * ins
    uh = a * 0.34 + shift
    hu = (u - uh - p.heart_shear * (v - vh)) / a
    hv = (v - vh) / b
    hr2 = hu * hu + hv * hv
    heart = inside((hr2 - 1.0) * a * 0.5, eps) * inside(v - vd - 0.02, eps)
    heart_thick = np.sqrt(np.clip(1.0 - hr2, 0.0, 1.0))  # an ellipsoid: lung overlaps its thin edges

    # Upper mediastinum: trachea/SVC on the right, aortic knob on the left (unfolds with age).
    knob_v = -0.36 + 0.04 * p.unfold
    knob = 0.055 * (1 + 0.6 * p.unfold) * np.exp(-0.5 * ((v - knob_v) / 0.06) ** 2)
    trunk = 0.06 * np.exp(-0.5 * ((v - (vh - 0.85 * b)) / 0.08) ** 2)  # pulmonary trunk / left atrial appendage
    med_hw = p.mw + np.where(u > shift, knob + trunk + 0.02 * p.unfold, 0.04 * np.clip(v + 0.2, 0, None))
    # (below the heart's centre the column narrows to the spine / oesophagus / IVC and reaches the diaphragm)
    med_hw = np.where(v > vh, np.float32(p.mw * 0.8), med_hw)
    medias = inside(np.abs(u - shift) - med_hw, eps) * inside(-0.95 - v, eps)
    central = np.maximum(heart, medias)
    lungs = thorax * (1.0 - central)
    lungs_soft = thorax * (1.0 - np.maximum(heart * (0.55 + 0.45 * heart_thick), medias))

    # Lung air: thickest centrally, thin at the apices and laterally.
    depth = np.sqrt(np.clip(1.0 - (xr - 0.45) ** 2 / 0.42, 0.05, 1.0)) * np.clip((v - apex) / 0.25, 0.2, 1.0)

    att = layer("body") + 0.22 * below * np.clip((tw + 0.24 - x) / 0.25, 0, 1)
    # Gastric bubble under the left hemidiaphragm.
    gx = (u - 0.36 * tw - 0.08) / 0.11
    gy = (v - (p.dome + p.dome_lr + 0.07 * ins + 0.12 - lift_l)) / 0.055
    att -= 0.18 * inside(gx * gx + gy * gy - 1.0, eps * 3)

    air = 0.60 * lungs_soft * depth
    mark_w = lungs
    ed_g, _ = st.get("edema")
    tex = layer("tex") if (ed_g or at_g) else None

    # ---- findings that replace air
    ef_g, ef_side = st.get("effusion")
    fluid = np.zeros_like(u)
    if ef_g:
        H = (p.dome + p.cp_drop) - p.apex
        for side in ("right", "left"):
            if ef_side not in (side, "bilateral"):
                continue
            sgn = -1.0 if side == "right" else 1.0
            s = np.clip((sgn * (u - shift) - 0.02) / 0.12, 0, 1) * (1.0 - 0.6 * central)  # fades at the mediastinum
            cp = p.dome + p.cp_drop + 0.07 * ins + (0 if side == "right" else p.dome_lr)
            level = cp - EFFUSION_HEIGHT[ef_g] * H  # top of the meniscus, at the lateral chest wall
            surf = level + (0.08 + 0.25 * EFFUSION_HEIGHT[ef_g]) * (1.0 - np.clip(xr, 0, 1) ** 3)
            layer_f = np.clip((v - surf) / 0.07, 0.0, 1.0)
            fluid = np.maximum(fluid, s * layer_f * inside(x - wall - 0.01, eps) * inside(v - vd, eps))
        air = air * (1.0 - fluid)
        mark_w = mark_w * (1.0 - fluid)
        att += 0.30 * fluid

    px_g, px_side = st.get("pneumothorax")
    ptx_space = np.zeros_like(u)
    if px_g:
        s = (u < 0) if px_side == "right" else (u >= 0)
        rim = PTX_RIM[px_g] * tw * (1.0 + 0.8 * np.clip((0.0 - v) / 0.7, 0, 1))
        edge = wall - rim
        apex_edge = apex + PTX_RIM[px_g] * 0.9
        f = np.maximum(x - edge, apex_edge - v)  # > 0 outside the collapsed lung
        ptx_space = s * lungs * inside(-f, eps)
        pleural_line = s * lungs * tube(f, 1.6 * eps) * (f > -2 * eps)
        air = air * (1.0 - ptx_space) + (0.60 * depth + 0.15) * ptx_space
        air -= 0.12 * PTX_RIM[px_g] / 0.35 * s * lungs * (1.0 - ptx_space) * 0.62
        mark_w = mark_w * (1.0 - ptx_space)
        att += 0.25 * pleural_line
    att -= air
    # Trachea and main bronchi: the air column of the upper mediastinum.
    carina = vh - b * 1.15
    tra = tube(u - shift * 0.5, 0.034) * inside(v - carina, eps)
    for sgn in (-1, 1):
        g = shift * 0.5 + sgn * 0.75 * np.clip(v - carina, 0, None)
        tra = tra + tube(u - g, 0.024) * (v >= carina) * (v < carina + 0.13)
    att -= 0.22 * np.clip(tra, 0, 1) * inside(-0.95 - v, eps)

    att += mark_w * (0.12 * (1.0 + 0.15 * ed_g)) * layer("vessels")

    # ---- opacities on top of the lungs
    if ed_g:
        hil_v = vh - b * 0.95
        hz = 0.0
        for sgn in (-1, 1):
            du = (u - sgn * (p.mw + 0.14) - shift) / (0.16 + 0.07 * ed_g)
            dv = (v - hil_v - 0.05) / (0.20 + 0.08 * ed_g)
            hz = hz + np.exp(-0.5 * (du * du + dv * dv))
        haze = EDEMA_HAZE[ed_g] * (1.3 * hz * (ed_g >= 2) + 0.6 * hz * (ed_g == 1) + 0.35
                                  + (0.5 + 0.8 * tex if ed_g == 3 else 0.0))
        kerley = (np.abs(((v * 34.0 + 3.0 * tex) % 1.0) - 0.5) < 0.09) * np.clip((xr - 0.72) / 0.2, 0, 1) \
            * np.clip(v / 0.2, 0, 1)
        att += lungs * (1.0 - ptx_space) * (haze + 0.16 * kerley * (0.6 + 0.4 * ed_g))
    if at_g:
        for side in ("right", "left"):
            if at_side not in (side, "bilateral"):
                continue
            sgn = -1 if side == "right" else 1
            s = (u < 0) if side == "right" else (u >= 0)
            base = p.dome + 0.07 * ins + (-lift_r if side == "right" else p.dome_lr - lift_l)
            band_v = base - 0.13 - 0.05 * (xr - 0.5)  # plate-like band, slightly tilted
            band_v = band_v + 0.04 * (xr - 0.55) ** 2  # gently curved, tapering at both ends
            op = 0.36 * tube(v - band_v, 0.026 + 0.008 * at_g) * tube(xr - 0.55, 0.34)
            if at_g >= 2:
                seg = np.clip((v - (base - 0.18)) / 0.12, 0, 1) * np.clip(1 - np.abs(xr - 0.45) / 0.35, 0, 1)
                op = op + 0.42 * seg * (0.85 + 0.6 * tex)
            if at_g == 3:  # lower lobe collapse: triangle from the hilum to the medial hemidiaphragm
                hil_v = vh - b * 0.95
                tri = np.clip(1.0 - (x - (p.mw + 0.02)) / (0.05 + 0.35 * np.clip((v - hil_v) / 0.6, 0, 1)), 0, 1)
                att += s * thorax * 0.40 * np.clip(tri * 1.6, 0, 1) ** 1.5 * np.clip((v - hil_v) / 0.15, 0, 1) \
                    * (u * sgn > 0)  # seen through the heart (the "sail" behind it on the left)
            att += s * lungs * op

    # ---- support devices (radio-opaque)
    for d in devices:
        if d == "ett":
            att += 0.9 * tube(np.abs(u - 0.005) - 0.022, 0.006) * (v < -0.42)
        elif d == "central_line":
            g = -0.34 + 0.30 * np.clip((v + 1.0) / 0.7, 0, 1) ** 0.7
            att += 0.8 * tube(u - g, 0.008) * (v < -0.28)
        elif d == "ng_tube":
            g = 0.015 + (0.30 * tw) * np.clip((v - 0.18) / 0.3, 0, 1) ** 1.5
            att += 0.7 * tube(u - g, 0.009) * (v < p.dome + 0.26)
        elif d == "pacemaker":
            box = inside(np.maximum(np.abs(u - 0.5 * tw) - 0.07, np.abs(v + 0.56) - 0.045), eps)
            g = 0.5 * tw - 0.45 * tw * np.clip((v + 0.56) / 0.75, 0, 1) ** 0.8
            att += 1.6 * box + 0.9 * tube(u - g, 0.007) * (v > -0.56) * (v < vh + 0.1)
        elif d == "ecg_leads":
            for cx, cy in ((-0.55, -0.45), (0.55, -0.45), (0.5 * tw, 0.25)):
                rr = np.sqrt((u - cx) ** 2 + (v - cy) ** 2)
                att += 0.6 * inside(np.abs(rr - 0.035) - 0.008, eps)

    lung_m = thorax * (1.0 - central) > 0.5
    masks = {
        "right_lung": lung_m & (u < shift),
        "left_lung": lung_m & (u >= shift),
        "heart": heart > 0.5,
        "mediastinum": (medias * (1 - heart) * inside(apex - 0.05 - v, eps)) > 0.5,
        "diaphragm": (below * inside(v - vd - 0.06, eps) * (x < wall + 0.02)) > 0.5,
        "spine": (x < 0.075) & (v < dome + 0.35),
    }
    extra = {"effusion": fluid > 0.5, "pneumothorax": ptx_space > 0.5}
    return att, masks, extra


# --------------------------------------------------------------------------- render

def render(patient: Patient, state: State, pose: Pose, exposure: Exposure, view: str = "PA",
           size: int = 256, noise_seed: int = 0, devices=(), masks: bool = False, extra: bool = False):
    """Draw one radiograph.

    patient: invariants; state: disease State; pose: Pose (tx, ty in px of this size); exposure:
    Exposure; view: "PA" | "AP" | "LATERAL"; size: 128-512 px (square); noise_seed: the detector-noise
    realisation (reuse it to redraw the same image with another disease state); devices: names from
    DEVICES. Returns a uint8 (size, size) array, plus a dict organ -> bool mask (schema.ORGANS) when
    masks=True, plus finding masks ({"effusion", "pneumothorax"}) when extra=True.
    """
    if not 32 <= size <= 1024:
        raise ValueError(f"render: size {size} px outside 32-1024")
    if view not in ("PA", "AP", "LATERAL"):
        raise ValueError(f"render: unknown view {view!r} (PA, AP or LATERAL)")
    gx, gy = grid(size)
    m = np.linalg.inv(pose_matrix(pose, size))
    c = (size - 1) / 2.0
    half = size / 2.0
    k = [float(z) / half for z in m[:2].ravel()]
    u = k[0] * gx + k[1] * gy + (k[2] - c / half)
    v = k[3] * gx + k[4] * gy + (k[5] - c / half)
    eps = 1.0 / (half * pose.scale)
    layers = _static_layers(patient, size, view)

    def layer(name):
        return _sample(layers[name], m, size, layers["margin"], layers["scale"])

    if view == "LATERAL":
        att, mk, ex = lateral(patient, state, pose, u, v, eps, devices, layer)
    else:
        att, mk, ex = _frontal(patient, state, pose, view, u, v, eps, devices, layer)

    e = exposure
    if e.blur > 0:
        att = gaussian_filter(att, e.blur * size / 256.0, mode="nearest", truncate=2.5)
    heel = 1.0 + e.heel * (gx / size - 0.5)
    a_ = e.k * heel * np.clip(att + 0.05, 0, None)
    # film-like response: a soft shoulder compresses soft tissue, a linear tail keeps metal and bone white
    img = 0.06 + 0.40 * (1.0 - np.exp(-2.2 * a_)) + 0.13 * a_
    # unsharp masking of the large scale, as CR/DR post-processing does (local contrast)
    f = max(1, size // 64)
    low = gaussian_filter(img[::f, ::f], 2.0, mode="nearest")
    low = np.repeat(np.repeat(low, f, 0), f, 1)[:size, :size]
    img = img + 0.45 * (img - low)
    # detector: quantum noise (more where fewer photons arrive) + fine grain
    rng = np.random.default_rng(noise_seed)
    nz = rng.standard_normal((size, size), dtype=np.float32)
    img = img + e.noise * (0.6 + 0.8 * img) * nz
    # display curve (gamma, offset) through a 4096-entry table: cheaper than a power per pixel
    q = np.clip(img * 4095.0 + 0.5, 0, 4095).astype(np.int32)
    lut = np.clip((np.linspace(0, 1, 4096) ** e.gamma + e.offset) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    out = lut[q]
    res = [out]
    if masks:
        res.append({k: mk[k] for k in ORGANS})
    if extra:
        res.append(ex)
    return out if len(res) == 1 else tuple(res)
