"""bmjlib: the library behind the BiomedJourney companion notebooks.

BiomedJourney (Gu, Yang et al., arXiv 2310.10765) generates a counterfactual chest X-ray from a prior
image and a sentence describing disease progression; ProgEmu / ICG-CXR (Ma et al., MICCAI 2025,
arXiv 2503.23149) adds a text that states the visual changes. Each module implements one pipeline
stage and names the paper section it follows in its docstring.
"""

__version__ = "0.1.0"
