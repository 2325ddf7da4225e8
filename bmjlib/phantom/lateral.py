"""Phantom radiograph renderer, lateral view (see `body` for the frame, `anatomy` for the findings and grades).

Part of the phantom cohort (DESIGN "The phantom cohort"): MIMIC-CXR studies are often "PA and lateral",
and the paper's cohort keeps only PA images (§3), so laterals exist to be filtered out, and a lateral
recorded as PA is what the registration score must catch. Left lateral: anterior to the image left,
spine to the right; u, v are the canonical coordinates of `body`.
"""
from __future__ import annotations

import numpy as np

from bmjlib.phantom.body import EDEMA_HAZE, EFFUSION_HEIGHT, Patient, Pose, State, image_ctr, inside, tube


def lateral_body(p: Patient, u, v, eps):
    """Static part of a left lateral view (soft tissue, bones, great vessels) on canonical u, v."""
    front_skin = -0.88 + 0.06 * ((v + 0.15) / 0.9) ** 2
    back_skin = 0.96 - 0.03 * ((v + 0.1) / 0.9) ** 2
    body = inside(front_skin - u, eps * 3) * inside(u - back_skin, eps * 3) * (0.75 + 0.25 * tube(u - 0.05, 0.9))
    shoulders = np.clip((-0.45 - v) / 0.45, 0, 1) * inside(u - 0.5, eps * 8)
    att = 0.88 * p.soft * body + 0.30 * shoulders
    arm_d = np.abs((u + 0.15) * 0.8 + (v + 0.95) * 0.6)  # humeri raised forwards
    bone = 0.25 * tube(arm_d, 0.045) * (v < -0.5) * (u < 0.25) * (u > front_skin)
    arch_r = np.hypot((u - 0.08) / 0.28, (v + 0.28) / 0.2)  # aortic arch and descending aorta
    att += 0.10 * tube(arch_r - 1.0, 0.25) * (v < -0.2) + 0.10 * tube(u - 0.40, 0.05) * (v > -0.25)
    att += 0.10 * np.exp(-0.5 * (((u - 0.02) / 0.1) ** 2 + ((v + 0.08) / 0.12) ** 2))  # hila
    # thoracic spine: vertebral bodies and discs, gentle kyphosis; posterior elements; sternum; ribs
    us = 0.62 + 0.06 * (1 - ((v + 0.1) / 0.9) ** 2)
    k = (v * 11.0 + p.rib_phase) % 1.0
    bodies = inside(np.abs(u - us) - 0.09, eps * 2) * (0.35 + 0.2 * tube(k - 0.5, 0.42)) * (k > 0.1)
    post = 0.25 * tube(u - us - 0.17, 0.05)
    stern = tube(u - (front_skin + 0.07), 0.025) * (v > -0.62) * (v < 0.25)
    ribs = tube(((v * 6.5 - 0.9 * u + p.rib_phase) % 1.0) - 0.5, 0.16) * np.clip((u + 0.1) / 0.5, 0, 1) * \
        (np.abs(u) < 0.6) * (np.abs(v) < 0.75)
    bone += (bodies + post) * (v < 0.95) + 0.3 * stern + 0.15 * ribs
    return att + 0.75 * p.bone * bone


def lateral(p: Patient, st: State, pose: Pose, u, v, eps, devices, layer):
    """A left lateral view: anterior to the image left, spine to the right."""
    ins = pose.inspiration
    att = layer("body")
    dome = p.dome + 0.07 * ins + 0.03
    vd = dome + 0.10 * ((u + 0.2) / 0.6) ** 2 + 0.12 * np.clip(u - 0.2, 0, None) / 0.4
    vd2 = vd + 0.035 + 0.02 * u  # the other hemidiaphragm, slightly lower
    su, sv = ((u + 0.02) / 0.70) ** 2, ((v + 0.04) / (0.78 + 0.02 * ins)) ** 2
    shape = np.where(v < -0.04, su + sv, np.sqrt(su * su + sv * sv))  # round apex, squarer base
    lung = inside(shape - 1.0, eps) * inside(v - vd2, eps)
    ctr = image_ctr(p, st, "LATERAL")
    hv = (v - (dome - 0.10)) / (0.30 * (1 + 0.6 * (ctr - 0.46)))
    hu = (u + 0.36 + 0.12 * hv) / (0.34 * ctr / 0.46)  # long axis tilted: apex forwards and down
    heart = inside(hu * hu + hv * hv - 1.0, eps * 2) * inside(v - vd, eps)
    lungs = lung * (1 - heart)
    below = inside(vd - v, eps) * (np.abs(u - 0.04) < 0.86)
    air = 0.58 * lungs * (0.75 + 0.25 * np.clip((v + 0.7) / 0.3, 0, 1)) * (1.0 - 0.35 * inside(vd2 - v, eps))
    tra_c = -0.05 + 0.12 * np.clip((v + 1.0) / 0.8, 0, 1)  # trachea running down and back to the carina
    air += 0.10 * tube(u - tra_c, 0.045) * (v < -0.22)
    tex = layer("tex")
    att += 0.35 * below + 0.05 * lungs * tex

    ef_g, _ = st.get("effusion")
    fluid = np.zeros_like(u)
    if ef_g:  # fills the posterior costophrenic sulcus first, meniscus climbing the posterior wall
        sulcus = dome + 0.10 * (0.7 / 0.6) ** 2 + 0.12 * 0.75 + 0.045
        top = sulcus - (0.08 + EFFUSION_HEIGHT[ef_g] * 0.8)
        surf = top + (0.1 + 0.2 * EFFUSION_HEIGHT[ef_g]) * (1 - np.clip((u + 0.6) / 1.2, 0, 1) ** 3)
        fluid = np.clip((v - surf) / 0.06, 0, 1) * lung
        air = air * (1 - fluid)
        att += 0.2 * fluid
    att -= air
    ed_g, _ = st.get("edema")
    if ed_g:
        att += lungs * EDEMA_HAZE[ed_g] * (0.5 + np.exp(-0.5 * ((u / 0.25) ** 2 + ((v + 0.05) / 0.3) ** 2)) + tex)
    at_g, _ = st.get("atelectasis")
    if at_g:
        att += lungs * 0.25 * tube(v - (dome - 0.12 - 0.1 * u), 0.02 + 0.01 * at_g)
    if "pacemaker" in devices:
        att += 1.5 * inside(np.maximum(np.abs(u + 0.72) - 0.03, np.abs(v + 0.5) - 0.06), eps)
    us = 0.62 + 0.06 * (1 - ((v + 0.1) / 0.9) ** 2)
    masks = {
        "right_lung": lungs > 0.5, "left_lung": lungs > 0.5, "heart": heart > 0.5,
        "mediastinum": np.zeros(u.shape, bool),
        "diaphragm": (below * inside(v - vd2 - 0.04, eps) * (shape < 1.3)) > 0.5,
        "spine": (np.abs(u - us) < 0.09) & (v < 0.95),
    }
    return att, masks, {"effusion": fluid > 0.5, "pneumothorax": np.zeros(u.shape, bool)}
