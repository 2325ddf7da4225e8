"""Stage 2's training data (paper §4.2, with the demo profile's departures): exposure-matched targets and
stable (identity) triples."""
import numpy as np
import pandas as pd
import pytest
import torch

import bmjlib.model.train as T
from bmjlib.data.registration import match_intensity, outside_field, read_matched
from bmjlib.io import atomic_write_png, read_image, to_uint8
from bmjlib.model.latents import build_cache
from bmjlib.model.pipeline import to_batch
from bmjlib.model.stages import change_repeats, changed_findings, stage2_triples, with_stable_triples
from bmjlib.text.progression import compose_report, null_description

from test_pipeline import tiny_pipeline
from test_train import make_table


def chest(seed=0, size=64):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = 0.3 + 0.4 * np.exp(-((x - 0.5) ** 2) / 0.02) + 0.1 * np.sin(40 * y) * (x > 0.2) + 0.05 * rng.random((size, size))
    return img.astype(np.float32)


def test_match_intensity_recovers_a_known_exposure_change():
    prior = chest()
    moved = 0.7 * prior + 0.12                      # another exposure of the same patient
    assert np.abs(match_intensity(moved, prior) - prior).max() < 1e-4


def test_match_intensity_follows_the_exposure_and_keeps_a_local_change():
    prior = chest()
    follow = prior.copy()
    follow[40:, 36:] = np.maximum(follow[40:, 36:], 0.85)     # a new opacity on one base (~12 % of the image)
    moved = 1.2 * follow - 0.05
    m = match_intensity(moved, prior)
    outside = np.ones_like(prior, bool)
    outside[40:, 36:] = False
    # outside the change the prior's exposure is back (up to a small pull of the fit toward the change) ...
    assert np.abs(m - prior)[outside].mean() < 0.1 * np.abs(moved - prior)[outside].mean()
    # ... and the opacity is still there, about as bright relative to the prior as drawn
    drawn = (follow - prior)[~outside].mean()
    assert (m - prior)[~outside].mean() == pytest.approx(drawn, rel=0.25)


def test_read_matched_puts_a_registered_follow_up_in_its_prior_s_exposure(tmp_path):
    prior = chest(1)
    follow = np.clip(0.8 * prior + 0.15, 0, 1)
    follow[:, :3] = 0                                  # outside the registered image: left out of the fit
    atomic_write_png(tmp_path / "p.png", to_uint8(prior))
    atomic_write_png(tmp_path / "f.png", to_uint8(follow))
    got = read_matched(tmp_path / "f.png", tmp_path / "p.png")
    ref = read_image(tmp_path / "p.png")
    assert np.abs(got - ref)[:, 3:].mean() < 0.01 < np.abs(read_image(tmp_path / "f.png") - ref)[:, 3:].mean()
    assert np.array_equal(got[:, :3], ref[:, :3])     # where the registered image has no data: the prior's pixels


def test_outside_field_is_the_border_fill_only():
    img = chest(2)
    img[20:24, 30:34] = 0                              # a black object inside the image: not fill
    yy, xx = np.mgrid[0:64, 0:64]
    img[yy + xx < 12] = 0                              # a corner the rotated follow-up did not cover
    got = outside_field(img, grow=0)
    assert np.array_equal(got, yy + xx < 12)
    grown = outside_field(img, grow=2)
    assert grown[yy + xx < 14].all() and not grown[yy + xx > 16].any()
    assert not outside_field(chest(3)).any()          # nothing filled, nothing outside


def test_stable_triples_are_the_prior_as_its_own_follow_up_with_the_stable_sentence():
    pairs = pd.DataFrame({
        "pair_id": [f"p{i}" for i in range(10)], "split": ["train"] * 8 + ["val", "test"],
        "prior_path": [f"/a/{i}.png" for i in range(10)], "registered_path": [f"/b/{i}.png" for i in range(10)],
        "followup_path": [f"/c/{i}.png" for i in range(10)], "description": ["New left effusion."] * 10,
        "prior_findings": ["Small left pleural effusion."] * 10, "prior_impression": ["Small left effusion."] * 10})
    out = with_stable_triples(pairs, 0.25, seed=0)
    extra = out.iloc[len(pairs):]
    assert len(extra) == 2 and set(extra["split"]) == {"train"}
    assert (extra["registered_path"] == extra["prior_path"]).all()
    want = null_description(compose_report("Small left pleural effusion.", "Small left effusion."))
    assert set(extra["description"]) == {want} and "effusion" in want.lower()
    assert with_stable_triples(pairs, 0.0).equals(pairs)
    # the same seed draws the same priors
    assert with_stable_triples(pairs, 0.25, seed=0).equals(out)


def _reports_pairs():
    """Twelve triples whose reports change known findings: eight a left effusion appears, two the heart enlarges
    (one of them with a new right effusion too), one nothing changes; a validation triple with a new cardiomegaly."""
    effusion = ("No pleural effusion.", "No acute process.", "Small left pleural effusion.", "New left effusion.")
    heart = ("Heart size is normal.", "No acute process.", "Moderate cardiomegaly.", "New moderate cardiomegaly.")
    both = ("Heart size is normal. No pleural effusion.", "No acute process.",
            "Moderate cardiomegaly. Small right pleural effusion.", "New cardiomegaly and right effusion.")
    same = ("Small left pleural effusion.", "Small left effusion.", "Small left pleural effusion.",
            "Unchanged small left effusion.")
    rows = [effusion] * 8 + [heart, both, same, heart]
    pf, pi, ff, fi = zip(*rows)
    n = len(rows)
    return pd.DataFrame({"pair_id": [f"p{i}" for i in range(n)], "split": ["train"] * (n - 1) + ["val"],
                         "prior_path": [f"/a/{i}.png" for i in range(n)],
                         "registered_path": [f"/b/{i}.png" for i in range(n)], "description": ["x"] * n,
                         "prior_findings": pf, "prior_impression": pi, "followup_findings": ff,
                         "followup_impression": fi})


def test_changed_findings_are_read_from_the_two_reports():
    got = changed_findings(_reports_pairs())
    assert got[0] == {"Pleural Effusion"} and got[8] == {"Cardiomegaly"}
    assert got[9] == {"Cardiomegaly", "Pleural Effusion"} and got[10] == set()


def test_change_repeats_balance_the_rarely_changing_findings(capsys):
    pairs = _reports_pairs()
    # training counts: effusion changes in 9 triples, cardiomegaly in 2 (the validation triple is not counted)
    full = change_repeats(pairs, 1.0)   # (9 / 2) ** 1 = 4.5 -> 4 copies in all: 3 more of each heart triple
    assert sorted(full["pair_id"]) == ["p8-repeat1", "p8-repeat2", "p8-repeat3", "p9-repeat1", "p9-repeat2",
                                       "p9-repeat3"]
    assert set(full["split"]) == {"train"}
    assert (full["registered_path"] == full["prior_path"].str.replace("/a/", "/b/")).all()  # whole rows copied
    half = change_repeats(pairs, 0.5)   # sqrt(4.5) = 2.12 -> 2 copies in all
    assert sorted(half["pair_id"]) == ["p8-repeat1", "p9-repeat1"]
    assert change_repeats(pairs, 0.0).empty
    # without the reports there is nothing to read the changes from: skipped, said in one line
    assert change_repeats(pairs.drop(columns="followup_findings"), 1.0).empty
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["change balancing skipped: the triples have no followup_findings column (the reports it reads)"]


def test_stage2_triples_add_stable_triples_and_repeats(tmp_path):
    pairs = _reports_pairs()
    (tmp_path / "03_descriptions").mkdir()
    pairs.to_csv(tmp_path / "03_descriptions" / "pairs.csv", index=False)
    got = stage2_triples(tmp_path, {"stable_triples": 0.25, "seed": 0, "change_balance": 1.0})
    assert len(got) == len(pairs) + round(0.25 * 11) + 6
    assert got["pair_id"].str.endswith("-stable").sum() == 3 and got["pair_id"].str.contains("-repeat").sum() == 6
    assert len(stage2_triples(tmp_path, {"seed": 0})) == len(pairs)


def test_cache_with_matched_targets_encodes_the_matched_image(tmp_path):
    table = make_table(tmp_path / "img")
    rows = T.stage_rows(table, "registered", "description")
    pipe = tiny_pipeline()
    size = 32 + 2 * pipe.latent_factor
    data = build_cache(pipe, rows, tmp_path / "cache", 32, 1, dummy_prior=False, progress=False, match_targets=True)
    plain = build_cache(pipe, rows, tmp_path / "cache", 32, 1, dummy_prior=False, progress=False)
    idx = torch.arange(len(rows))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    got = data.batch(idx, g(), hflip=False, device="cpu")["target"]
    old = plain.batch(idx, g(), hflip=False, device="cpu")["target"]
    x = torch.cat([to_batch(read_matched(t, p), size) for t, p in zip(rows["target_path"], rows["prior_path"])])
    z = pipe.encode_images(x).half().float()
    off = torch.randint(0, 3, (len(rows), 2), generator=g())   # the batch's crop offsets (no flip drawn)
    h = z.shape[-1] - 2
    want = torch.stack([z[i, :, oy:oy + h, ox:ox + h] for i, (oy, ox) in enumerate(off.tolist())])
    assert torch.equal(got, want)
    assert not torch.equal(got, old)


def test_matched_targets_do_not_apply_to_the_dummy_prior(tmp_path):
    """Stage 1 (dummy prior) has no pair to match: its cache is the same file with or without the setting, so a
    second process that only opens the cache finds what the first one wrote."""
    from bmjlib.model.latents import cache_path
    table = make_table(tmp_path / "img")
    rows = T.stage_rows(table, "dummy", "impression")
    pipe = tiny_pipeline()
    assert (cache_path(pipe, rows, tmp_path, 32, 1, dummy_prior=True, match_targets=True)
            == cache_path(pipe, rows, tmp_path, 32, 1, dummy_prior=True))
    pairs = T.stage_rows(table, "registered", "description")
    assert (cache_path(pipe, pairs, tmp_path, 32, 1, dummy_prior=False, match_targets=True)
            != cache_path(pipe, pairs, tmp_path, 32, 1, dummy_prior=False))
