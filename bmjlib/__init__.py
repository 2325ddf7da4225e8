"""bmjlib: the library behind the BiomedJourney companion notebooks.

BiomedJourney (Gu, Yang et al., arXiv 2310.10765) generates a counterfactual chest X-ray from a prior
image and a sentence describing disease progression; ProgEmu / ICG-CXR (Ma et al., MICCAI 2025,
arXiv 2503.23149) adds a text that states the visual changes. The package follows the chain of notebooks,
one subpackage per stage:

    phantom/     step 00  the phantom cohort (simulated journeys with their true counterfactuals)
    data/        01-02    dataset readers, the cohort of consecutive pairs, ICG-CXR format, registration
    text/        03       report sections and findings, progression descriptions, LLM backends
    model/       04-05    the pipeline, frozen encoders, latent cache, two-stage training, the demo model
    evaluation/  06-09    counterfactuals over the test pairs, judges, metrics, tables, figures, ablations
    icg/         10       interpretable counterfactuals (what each image changed, in words)
    app/                  the counterfactual explorer
    bench/                `bmj bench`

beside the core modules `io` (atomic files, images, figures, tables), `runtime` (paths, threads), `schema`
(the shared vocabulary), `chain` (the notebook runner) and `cli` (`bmj`). A lower stage never imports a
higher one. What a user needs is importable from here:

    from bmjlib import BiomedJourneyPipeline, from_pretrained, generate, cmig, read_icg, write_icg
    pipe = from_pretrained("demo")
    follow_up = pipe(prior, "New large right pleural effusion.")
"""

from importlib import import_module

__version__ = "0.1.0"

# name -> (module, attribute). Resolved on first use, so `import bmjlib` (and `bmj --help`) does not pay for
# torch and diffusers until something needs them (deferred on purpose, PEP 562).
_API = {
    "BiomedJourneyPipeline": ("bmjlib.model.pipeline", "BiomedJourneyPipeline"),
    "generate": ("bmjlib.model.generate", "generate"),
    "resolve_model": ("bmjlib.model.demo_model", "resolve_model"),
    "write_cohort": ("bmjlib.phantom.cohort", "write_cohort"),
    "load_source": ("bmjlib.data.sources", "load_source"),
    "read_icg": ("bmjlib.data.icg", "read_icg"),
    "write_icg": ("bmjlib.data.icg", "write_icg"),
    "read_image": ("bmjlib.io", "read_image"),
    "cmig": ("bmjlib.evaluation.metrics", "cmig"),
    "auroc": ("bmjlib.evaluation.metrics", "auroc"),
    "changed_auroc": ("bmjlib.evaluation.metrics", "changed_auroc"),
    "ssim": ("bmjlib.evaluation.metrics", "ssim"),
    "ms_ssim": ("bmjlib.evaluation.metrics", "ms_ssim"),
    "psnr": ("bmjlib.evaluation.metrics", "psnr"),
    "bootstrap_ci": ("bmjlib.evaluation.metrics", "bootstrap_ci"),
    "load_profile": ("bmjlib.chain", "load_profile"),
    "run_chain": ("bmjlib.chain", "run_chain"),
}
__all__ = [*_API, "from_pretrained"]


def from_pretrained(name_or_path, **kwargs):
    """`BiomedJourneyPipeline.from_pretrained`: a saved model folder, or "demo" for the shipped model."""
    return __getattr__("BiomedJourneyPipeline").from_pretrained(name_or_path, **kwargs)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'bmjlib' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(import_module(module), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_API])
