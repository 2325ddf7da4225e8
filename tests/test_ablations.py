"""Ablation bookkeeping: the eight Table-2 arms, the paper's claims checked on known arm scores."""
import pandas as pd

from bmjlib.evaluation import ablations as A


def test_eight_distinct_arms_with_distinct_names():
    assert len(A.ARMS) == 8 and len(set(A.ARMS)) == 8
    assert len({A.arm_name(*a) for a in A.ARMS}) == 8
    assert A.arm_name("description", True, False, "random") == "description_reg_one_random"


def known_arms():
    # CMIG built so that: registration helps everywhere; description helps everywhere except
    # (noreg, two-stage); two-stage helps only with registration (the paper's pattern).
    score = {("impression", False, False): 0.60, ("description", False, False): 0.62,
             ("impression", False, True): 0.55, ("description", False, True): 0.54,
             ("impression", True, False): 0.70, ("description", True, False): 0.71,
             ("impression", True, True): 0.72, ("description", True, True): 0.74}
    return pd.DataFrame([{"instruction": d, "registration": r, "two_stage": t, "encoder": "clip", "cmig": v,
                          "pathology_auroc": v, "retention_auroc": 0.9, "age_r": 0.5, "changed_auroc": v,
                          "dice_vs_prior": 0.9, "ssim": 0.5} for (d, r, t), v in score.items()])


def test_directions_known_answer():
    d = A.directions(known_arms())
    holds = dict(zip(d["claim (paper Table 2)"] + " | " + d["arms"], d["holds here"]))
    assert holds["registration helps | impression, one-stage"] == "yes"
    assert holds["description beats impression | reg=no, two-stage"] == "no"
    assert holds["description beats impression | reg=yes, two-stage"] == "yes"
    assert holds["two-stage beats one-stage with registration | description"] == "yes"
    assert holds["two-stage WORSE than one-stage without registration | impression"] == "yes"
    assert (d["holds here"] == "yes").sum() == 11


def test_table2_and_table5_rows_carry_paper_numbers():
    arms = known_arms()
    t2 = A.table2(arms)
    row = t2[(t2["Instruction"] == "LLM description") & (t2["Registration"] == "Yes") & (t2["Two-stage"] == "Yes")]
    assert row["CMIG paper (MIMIC-CXR)"].iloc[0] == 83.23 and row["CMIG"].iloc[0] == "74.0"
    arms5 = pd.concat([arms, arms.assign(encoder="random")[arms["registration"] & ~arms["two_stage"]]])
    t5 = A.table5(arms5)
    assert len(t5) == 4 and set(t5["Paper row compared"]) == {"BiomedCLIP", "PubMedBERT"}
