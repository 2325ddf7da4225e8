"""Step 00, the phantom cohort (DESIGN "The phantom cohort"): simulated longitudinal chest X-ray journeys
in the MIMIC-CXR-JPG layout, with the truth no real dataset has.

anatomy   the frontal renderer: anatomy, the five findings, devices, positioning, exposure
lateral   the lateral view
reports   MIMIC-style reports and the CheXpert labels they imply
cohort    journeys, true counterfactuals and `write_cohort`
figures   gallery, finding distribution, one journey, speed
"""
