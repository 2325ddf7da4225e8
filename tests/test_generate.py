"""`bmj generate` on PNG, JPEG and DICOM priors; clear errors for a missing model, a bad image, an empty prompt."""
import numpy as np
import pytest

from bmjlib.cli import main
from bmjlib.io import atomic_write_png, read_image

from test_pipeline import tiny_pipeline


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    tiny_pipeline().save_pretrained(d / "model")
    return d / "model"


def _prior(size=48):
    yy, xx = np.mgrid[:size, :size]
    return ((np.sin(xx / 5.0) * np.cos(yy / 7.0) + 1) * 100 + 20).astype(np.uint8)


def _write_dicom(path, arr):
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation = "DX", "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.PixelData = (arr.astype(np.uint16) * 16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


@pytest.mark.parametrize("fmt", ["png", "jpg", "dcm"])
def test_generate_from_each_format(tmp_path, model, fmt):
    from PIL import Image

    arr = _prior()
    src = tmp_path / f"prior.{fmt}"
    if fmt == "png":
        atomic_write_png(src, arr)
    elif fmt == "jpg":
        Image.fromarray(arr).save(src, quality=95)
    else:
        _write_dicom(src, arr)
    out = tmp_path / "cf.png"
    rc = main(["generate", "--model", str(model), "--prior", str(src), "--prompt", "new left effusion",
               "--out", str(out), "--steps", "2", "--seed", "1"])
    assert rc == 0
    img = read_image(out)
    assert img.shape == arr.shape  # written at the prior's size
    # same seed -> the same file; the pipeline is deterministic
    out2 = tmp_path / "cf2.png"
    main(["generate", "--model", str(model), "--prior", str(src), "--prompt", "new left effusion",
          "--out", str(out2), "--steps", "2", "--seed", "1"])
    assert out.read_bytes() == out2.read_bytes()


def test_generate_errors(tmp_path, model, capsys):
    good = tmp_path / "p.png"
    atomic_write_png(good, _prior())
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cases = [
        (["--model", str(tmp_path / "nope"), "--prior", str(good), "--prompt", "x"], "does not exist"),
        (["--model", str(tmp_path), "--prior", str(good), "--prompt", "x"], "not a saved BiomedJourney model"),
        (["--model", str(model), "--prior", str(bad), "--prompt", "x"], "prior image"),
        (["--model", str(model), "--prior", str(tmp_path / "missing.png"), "--prompt", "x"], "missing.png"),
        (["--model", str(model), "--prior", str(good), "--prompt", "   "], "prompt is empty"),
    ]
    for args, msg in cases:
        out = tmp_path / "o.png"
        assert main(["generate", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.startswith("bmj generate:")
        assert not out.exists()


def test_bmj_generate_model_demo_uses_the_shipped_model(tmp_path, monkeypatch):
    """`bmj generate --model demo` works on a fresh install: no run folder, only bmjlib/model/demo."""
    from PIL import Image

    from bmjlib.cli import main

    monkeypatch.setenv("BMJ_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    prior = tmp_path / "prior.png"
    yy, xx = np.mgrid[:96, :96]
    Image.fromarray((100 + 80 * np.sin(xx / 9.0) * np.cos(yy / 13.0)).astype(np.uint8)).save(prior)
    out = tmp_path / "cf.png"
    assert main(["generate", "--model", "demo", "--prior", str(prior), "--prompt", "New small left pleural effusion.",
                 "--steps", "2", "--out", str(out)]) == 0
    img = np.asarray(Image.open(out))
    assert img.shape == (96, 96) and img.dtype == np.uint8 and img.std() > 0


def test_scales_chosen_for_a_model_are_its_defaults(tmp_path, model):
    """A model folder that carries guidance.json (the scales chosen on validation pairs) samples with them when
    no scale is given; explicit scales still win; the shipped demo model carries its own."""
    import json
    import shutil

    from bmjlib.model.demo_model import DEMO_DIR, read_sums
    from bmjlib.model.generate import DEFAULTS, default_guidance, generate

    own = tmp_path / "model"
    shutil.copytree(model, own)
    (own / "guidance.json").write_text(json.dumps({"text_scale": 2.0, "image_scale": 2.5}))
    assert default_guidance(model) == (DEFAULTS["text_scale"], DEFAULTS["image_scale"])
    assert default_guidance(own) == (2.0, 2.5)
    atomic_write_png(tmp_path / "prior.png", _prior())
    run = lambda m, name, **kw: read_image(generate(str(m), str(tmp_path / "prior.png"), "new left effusion",
                                                    str(tmp_path / name), steps=2, **kw))
    implicit = run(own, "a.png")
    assert np.array_equal(implicit, run(model, "b.png", text_scale=2.0, image_scale=2.5))
    assert not np.array_equal(implicit, run(model, "c.png"))
    assert np.array_equal(run(own, "d.png", text_scale=7.5, image_scale=1.5), run(model, "c.png"))
    assert "guidance.json" in read_sums(DEMO_DIR)
    assert default_guidance(DEMO_DIR) == tuple(json.loads((DEMO_DIR / "guidance.json").read_text())[k]
                                               for k in ("text_scale", "image_scale"))


def _model_with_settings(model, tmp_path, guidance: dict):
    """A copy of the tiny model whose guidance.json is `guidance`, and a prior beside it (tmp_path/prior.png)."""
    import json
    import shutil

    own = tmp_path / "model"
    shutil.copytree(model, own)
    (own / "guidance.json").write_text(json.dumps(guidance))
    atomic_write_png(tmp_path / "prior.png", _prior())
    return own


def _generate_cli(own, tmp_path, name, steps, *extra):
    """`bmj generate` with that model and prior: (exit status, the written image or None)."""
    code = main(["generate", "--model", str(own), "--prior", str(tmp_path / "prior.png"), "--prompt",
                 "new left effusion", "--steps", str(steps), "--out", str(tmp_path / name), *extra])
    return code, (read_image(tmp_path / name) if (tmp_path / name).exists() else None)


def test_strength_option_overrides_the_models_own(tmp_path, model):
    """`--strength` wins over the folder's settings.strength; left out, the folder's value is used; 1 samples
    from pure noise, so with the same seed it differs from a start at the prior."""
    own = _model_with_settings(model, tmp_path, {"text_scale": 7.5, "image_scale": 1.5, "settings": {"strength": 0.5}})

    def run(name, *extra):
        code, image = _generate_cli(own, tmp_path, name, 4, *extra)
        assert code == 0
        return image

    implicit = run("a.png")
    assert np.array_equal(implicit, run("b.png", "--strength", "0.5"))
    assert not np.array_equal(implicit, run("c.png", "--strength", "1"))


@pytest.mark.parametrize("key,flag,value,bad", [("text_guidance_min_t", "--text-guidance-min-t", 0.5, 1.5),
                                                ("edit_mask", "--edit-mask", 2.0, -1.0)])
def test_sampler_options_are_the_python_calls(tmp_path, model, capsys, key, flag, value, bad):
    """`--text-guidance-min-t` and `--edit-mask` give the pipeline call's argument of that name (the same image as the
    Python call); left out, the folder's setting applies; a value the pipeline refuses is refused with one line,
    nothing written."""
    from PIL import Image

    from bmjlib.io import resize_image
    from bmjlib.model.pipeline import BiomedJourneyPipeline

    own = _model_with_settings(model, tmp_path, {"text_scale": 6.0, "image_scale": 1.5, "settings": {key: value}})

    def run(name, *extra):
        return _generate_cli(own, tmp_path, name, 6, *extra)

    _, implicit = run("a.png")
    _, given = run("b.png", flag, str(value))
    _, off = run("c.png", flag, "0")
    assert np.array_equal(implicit, given) and not np.array_equal(given, off)
    pipe = BiomedJourneyPipeline.from_pretrained(own)
    api = pipe(read_image(tmp_path / "prior.png"), "new left effusion", steps=6, **{key: 0.0})[0]
    png = np.asarray(Image.open(tmp_path / "c.png"), np.float32) / 255  # the file's pixels as written
    assert np.abs(resize_image(api, png.shape) - png).max() <= 1 / 255 + 1e-6  # 8-bit PNG of the same image
    capsys.readouterr()
    code, out = run("d.png", flag, str(bad))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and out is None and not (tmp_path / "d.png").exists()
    assert len(err) == 1 and f"{key} {bad} is not allowed" in err[0]


def test_strength_above_what_the_model_was_trained_on_is_refused(tmp_path, model, capsys):
    """bmj generate refuses a strength above the model folder's max_strength with one line, writing nothing."""
    import json
    import shutil

    from bmjlib.cli import main

    own = tmp_path / "model"
    shutil.copytree(model, own)
    meta = json.loads((own / "bmj_pipeline.json").read_text())
    (own / "bmj_pipeline.json").write_text(json.dumps(dict(meta, max_strength=0.7)))
    atomic_write_png(tmp_path / "prior.png", _prior())
    out = tmp_path / "cf.png"
    assert main(["generate", "--model", str(own), "--prior", str(tmp_path / "prior.png"), "--prompt",
                 "new left effusion", "--steps", "4", "--strength", "0.9", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "strength 0.9 is not allowed for this model" in err[0] and "up to 0.7" in err[0]
    assert not out.exists()
