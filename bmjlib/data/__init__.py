"""Steps 01-02, data (paper §3, App. A.1, A.4): readers that turn every dataset into the same image records,
the cohort of consecutive pairs, and registration.

sources            MIMIC-CXR-JPG, the phantom, ICG-CXR and your own CSV cohort
icg                the ICG-CXR pair format (ProgEmu): reader and writer
cohort             PA images, journeys, consecutive pairs, splits, counts (Fig. 7)
registration       follow-up onto prior with SimpleITK, and the score filter (Fig. 8)
registration_eval  registration against the phantom's true transforms, and the comparison with ProgEmu's
"""
