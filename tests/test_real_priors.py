"""The model on real priors (bmjlib.evaluation.real_priors): known edits measured where they were made, real
Hannover radiographs, the figure attributed, a bad folder named in one line."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from bmjlib.evaluation.real_priors import RIGHT_BASE, base_boxes, pick_priors, real_prior_edits, real_prior_figure  # noqa: E402
from bmjlib.runtime import repo_root  # noqa: E402
from bmjlib.schema import HANNOVER_ATTRIBUTION  # noqa: E402

HANNOVER = repo_root().parent / "shared" / "real_cxr" / "hannover"
needs_images = pytest.mark.skipif(not (HANNOVER / "data.csv").is_file(), reason="../shared/real_cxr/hannover absent")


class Whitener:
    """A stand-in model with a known answer: an identity VAE; "No change." returns the prior; an effusion
    sentence adds 0.2 inside the image-left lower box (the patient's right base)."""
    image_size = 40

    def reconstruct(self, images, size):
        return np.asarray(images, np.float32)

    def __call__(self, priors, prompt, seed=0, **kw):
        out = np.asarray(priors, np.float32).copy()
        if "effusion" in prompt:
            right, _ = base_boxes(self.image_size)
            out[:, right] = np.minimum(out[:, right] + 0.2, 1.0)
        return out


def test_the_boxes_are_the_patients_right_base_and_its_mirror():
    right, left = base_boxes(50)
    r0, r1, c0, c1 = (int(round(f * 50)) for f in RIGHT_BASE)
    assert right[r0:r1, c0:c1].all() and right.sum() == (r1 - r0) * (c1 - c0)
    assert right[:, :25].sum() == right.sum()           # image left = the patient's right
    assert (left == right[:, ::-1]).all() and not (left & right).any()


@needs_images
def test_a_known_edit_is_found_in_the_right_base_only(tmp_path):
    rows, images = real_prior_edits(Whitener(), HANNOVER, n_priors=3)
    assert len(rows) == 3 and rows["patient_id"].is_unique
    assert (rows["projection"].str.lower() == "pa").iloc[0]              # PA films first
    assert np.allclose(rows["null_ssim"], 1.0, atol=1e-6)                 # "No change." kept the prior exactly
    right, _ = base_boxes(40)
    want = (np.minimum(images["prior"][:, right] + 0.2, 1.0) - images["prior"][:, right]).mean(1)
    assert np.allclose(rows["right_base_gain"], want, atol=1e-6) and (rows["right_base_gain"] > 0.1).all()
    assert (rows["left_base_gain"] == 0).all() and (rows["elsewhere_change"] == 0).all()
    figure, paths = real_prior_figure(rows, images, tmp_path)
    assert {p.name for p in paths} == {"fig_real_priors.png", "fig_real_priors.pdf"}
    assert any(HANNOVER_ATTRIBUTION in t.get_text() for t in figure.texts)
    table = pd.read_csv(tmp_path / "table_real_priors.csv")
    assert table["patient_id"].iloc[-1] == "mean" and HANNOVER_ATTRIBUTION in (tmp_path / "table_real_priors.md").read_text()


@needs_images
@pytest.mark.parametrize("n", [1, 8])
def test_the_figure_title_and_attribution_clear_every_panel(tmp_path, n):
    """Rendered, the figure's title lies above every panel (image and its title) and the attribution below, for one
    film and for eight."""
    rows, images = real_prior_edits(Whitener(), HANNOVER, n_priors=n)
    figure, _ = real_prior_figure(rows, images, tmp_path)
    renderer = figure.canvas.get_renderer()
    texts = {t.get_text(): t for t in figure.texts}
    title, credit = figure.get_suptitle(), figure.get_supxlabel()
    top, bottom = (texts[t].get_window_extent(renderer) for t in (title, credit))
    for ax in figure.axes:
        panel = ax.get_tightbbox(renderer)
        assert top.y0 >= panel.y1 and bottom.y1 <= panel.y0, (n, ax.get_title())
    assert HANNOVER_ATTRIBUTION in credit and 0 <= bottom.y0 and top.y1 <= figure.bbox.height


def test_a_folder_without_the_columns_is_named(tmp_path):
    (tmp_path / "data.csv").write_text("patient,image\na,b\n")
    with pytest.raises(ValueError, match=r"data.csv: no column image_id, patient_id, projection"):
        pick_priors(tmp_path, 2)
    (tmp_path / "data.csv").write_text("patient_id,image_id,projection\na,missing,pa\n")
    with pytest.raises(ValueError, match="no readable real prior"):
        real_prior_edits(Whitener(), tmp_path, 2)
