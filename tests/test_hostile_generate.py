"""`bmj generate` against hostile input: every refusal is one line naming the thing and the problem, a
non-zero exit, no traceback, and nothing written or overwritten. Real files, the real CLI, a real (tiny,
random-weight) saved pipeline."""
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from bmjlib.cli import main
from bmjlib.io import MAX_IMAGE_PIXELS, ImageError, atomic_write_png, read_image
from bmjlib.model.generate import GenerateError, generate
from bmjlib.model.pipeline import MAX_STEPS, BiomedJourneyPipeline, ModelFolderError, check_sampling

from test_generate import _prior, _write_dicom
from test_pipeline import tiny_pipeline


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile") / "model"
    tiny_pipeline().save_pretrained(d)
    return d


@pytest.fixture
def prior(tmp_path):
    p = tmp_path / "prior.png"
    atomic_write_png(p, _prior())
    return p


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, folder, args, *needles):
    """Run `bmj generate args`: exit 2, one stderr line holding every needle, no traceback, folder unchanged."""
    before = snapshot(folder)
    rc = main(["generate", *map(str, args)])
    cap = capsys.readouterr()
    assert rc == 2, cap
    assert cap.err.startswith("bmj generate: ") and cap.err.count("\n") == 1, cap.err
    assert "Traceback" not in cap.err and cap.out == ""
    for n in needles:
        assert n in cap.err, (n, cap.err)
    assert snapshot(folder) == before
    return cap.err


def base(model, prior, out, *extra):
    return ["--model", model, "--prior", prior, "--prompt", "new left effusion", "--out", out, "--steps", "1",
            *extra]


# --------------------------------------------------------------------------- 1. guidance scales

@pytest.mark.parametrize("option,value", [("--text-scale", "nan"), ("--text-scale", "inf"), ("--text-scale", "-1"),
                                          ("--image-scale", "nan"), ("--image-scale", "-inf"),
                                          ("--image-scale", "-0.5")])
def test_non_finite_or_negative_guidance_is_refused(capsys, tmp_path, model, prior, option, value):
    name = option[2:].replace("-", " ")
    refused(capsys, tmp_path, base(model, prior, tmp_path / "cf.png", f"{option}={value}"), name, value.lstrip("-"),
            "finite numbers >= 0")
    with pytest.raises(GenerateError, match=f"{name} .* finite numbers >= 0"):
        generate(str(model), str(prior), "x", str(tmp_path / "cf.png"), **{option[2:].replace("-", "_"): float(value)})
    assert not (tmp_path / "cf.png").exists()


def test_guidance_that_overflows_to_nan_writes_no_black_image(capsys, tmp_path, model, prior):
    """1e39 is a finite Python float but infinite in float32: the NaN output is refused, not written black."""
    refused(capsys, tmp_path, base(model, prior, tmp_path / "cf.png", "--text-scale", "1e39"), "non-finite")


def test_the_cli_refusal_is_one_line_without_traceback_in_a_real_process(tmp_path, model, prior):
    out = tmp_path / "cf.png"
    r = subprocess.run([sys.executable, "-m", "bmjlib.cli", "generate", *map(str, base(model, prior, out)),
                        "--text-scale", "nan"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "bmj generate: text scale nan is not allowed: guidance scales must be finite numbers >= 0\n"
    assert not out.exists()


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", "nan", "inf"])
def test_strength_outside_0_to_1_is_refused(capsys, tmp_path, model, prior, value):
    refused(capsys, tmp_path, base(model, prior, tmp_path / "cf.png", f"--strength={value}"), f"strength {float(value)}",
            "(0, 1]")
    assert not (tmp_path / "cf.png").exists()


# --------------------------------------------------------------------------- 2. output = prior

def test_output_equal_to_the_prior_is_refused_by_path_symlink_and_hardlink(capsys, tmp_path, model, prior,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.symlink(prior, tmp_path / "link.png")
    os.link(prior, tmp_path / "hard.png")
    (tmp_path / "sub").mkdir()
    for out in (prior, "prior.png", "./sub/../prior.png", tmp_path / "link.png", tmp_path / "hard.png"):
        refused(capsys, tmp_path, base(model, "prior.png", out), "is the prior image", "refusing to overwrite")
    # and the other way round: a prior given through a link, the output its target
    refused(capsys, tmp_path, base(model, tmp_path / "link.png", prior), "is the prior image")


# --------------------------------------------------------------------------- 3. steps

@pytest.mark.parametrize("steps", ["0", "-1", "1001", "100000"])
def test_steps_outside_1_to_1000_are_refused(capsys, tmp_path, model, prior, steps):
    args = base(model, prior, tmp_path / "cf.png")
    args[args.index("--steps") + 1] = steps
    refused(capsys, tmp_path, args, f"steps {steps} is not allowed", "from 1 to 1000")
    with pytest.raises(GenerateError, match=f"steps {steps} is not allowed"):
        generate(str(model), str(prior), "x", str(tmp_path / "cf.png"), steps=int(steps))


def test_steps_limits_are_the_training_schedule():
    assert MAX_STEPS == 1000
    check_sampling(steps=1)
    check_sampling(steps=1000)
    check_sampling(steps=np.int64(20), text_scale=np.float32(0.0), image_scale=0)
    for bad in (0, 1001, 2.5, float("nan"), True, "20"):
        with pytest.raises(ValueError, match="steps"):
            check_sampling(steps=bad)
    with pytest.raises(ValueError, match="text scale '7' is not a number"):
        check_sampling(text_scale="7")


def test_steps_zero_is_not_silently_the_default(tmp_path, model, prior):
    """steps=None means the default; steps=0 is an error, not 'unset'."""
    with pytest.raises(GenerateError, match="steps 0"):
        generate(str(model), str(prior), "x", str(tmp_path / "cf.png"), steps=0)


# --------------------------------------------------------------------------- 4. oversized images

def _bilevel_png(path, width, height):
    """A valid all-black 1-bit PNG of any size, a few kB on disk (rows of zeros compress ~1000:1)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    z = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [14000, 11000])  # beyond PIL's own bomb limit (179 MP), and between it and ours
def test_an_oversized_image_is_refused_before_decoding(capsys, tmp_path, model, side):
    big = _bilevel_png(tmp_path / "huge.png", side, side)
    assert big.stat().st_size < 100_000
    assert MAX_IMAGE_PIXELS == 100_000_000
    with pytest.raises(ImageError) as e:
        read_image(big)
    assert e.value.path == str(big) and f"{side} x {side} pixels" in str(e.value) and "100 megapixels" in str(e.value)
    refused(capsys, tmp_path, base(model, big, tmp_path / "cf.png"), "prior image", "huge.png",
            f"{side} x {side} pixels ({side * side / 1e6:.1f} megapixels)", "limit of 100 megapixels")


def test_an_oversized_dicom_is_refused_from_its_header(tmp_path):
    import pydicom  # deferred: only DICOM tests need it

    f = tmp_path / "huge.dcm"
    _write_dicom(f, np.full((4, 4), 5, np.uint8))
    ds = pydicom.dcmread(f)
    ds.Rows = ds.Columns = 12000  # the header claims 144 MP; the file stays a few hundred bytes
    ds.save_as(f)
    with pytest.raises(ImageError, match=r"12000 x 12000 pixels \(144.0 megapixels\), over the limit"):
        read_image(f)


# --------------------------------------------------------------------------- 5. unwritable output, damaged model

def test_an_output_under_a_file_or_onto_a_folder_is_refused(capsys, tmp_path, model, prior):
    refused(capsys, tmp_path, base(model, prior, tmp_path / "prior.png" / "cf.png"), "cannot be written",
            "is a file, not a folder")
    refused(capsys, tmp_path, base(model, prior, tmp_path / "prior.png" / "a" / "b" / "cf.png"), "is a file")
    (tmp_path / "dir.png").mkdir()
    refused(capsys, tmp_path, base(model, prior, tmp_path / "dir.png"), "is a folder")


@pytest.mark.parametrize("rel,content,needle", [
    ("bmj_pipeline.json", '{"class": ', "bmj_pipeline.json is not valid JSON (line"),
    ("bmj_pipeline.json", "[1, 2]", "bmj_pipeline.json is not a JSON object"),
    ("bmj_pipeline.json", '{"class": "BiomedJourneyPipeline"}', "bmj_pipeline.json has no valid image_size"),
    ("unet/config.json", "not json", "unet/config.json is not valid JSON"),
    ("vae/config.json", "\udcff", "vae/config.json is not valid JSON"),
    ("scheduler/scheduler_config.json", "{", "scheduler/scheduler_config.json is not valid JSON"),
    ("text_encoder/open_clip_config.json", "", "text_encoder/open_clip_config.json is not valid JSON"),
    ("guidance.json", '{"text_scale": 2', "guidance.json is not valid JSON"),
    ("guidance.json", '{"text_scale": NaN, "image_scale": 1}', "guidance.json is unusable (text scale nan"),
    ("guidance.json", '{"image_scale": 1}', "guidance.json has no 'text_scale'"),
    ("unet/diffusion_pytorch_model.safetensors", "truncated", "cannot be loaded"),
    ("unet/config.json", None, "unet/config.json is missing"),
])
def test_a_damaged_model_folder_is_one_line(capsys, tmp_path, model, prior, rel, content, needle):
    bad = tmp_path / "bad_model"
    shutil.copytree(model, bad)
    if content is None:
        (bad / rel).unlink()
    else:
        (bad / rel).write_bytes(content.encode("utf-8", "surrogateescape"))
    refused(capsys, tmp_path, base(bad, prior, tmp_path / "cf.png"), needle)
    if rel != "guidance.json" and content != "truncated":  # the loader itself names the file too
        with pytest.raises(ModelFolderError, match=needle.split(" (")[0]):
            BiomedJourneyPipeline.from_pretrained(bad)


# --------------------------------------------------------------------------- 6. long prompt

def test_a_prompt_cut_to_the_token_limit_is_said(capsys, tmp_path, model, prior):
    enc = tiny_pipeline().text_encoder
    long_prompt = " ".join(["new large left pleural effusion with mediastinal shift"] * 4)
    kept, total = enc.prompt_tokens(long_prompt)
    assert kept == enc.context_length == 16 and total > 30
    out = tmp_path / "cf.png"
    assert main(["generate", *map(str, base(model, prior, out)[:-4]), "--out", str(out), "--steps", "1",
                 "--prompt", long_prompt]) == 0
    cap = capsys.readouterr()
    assert cap.err == (f"bmj generate: warning: the prompt is {total} tokens long but the text encoder reads only "
                       f"16: 16 of {total} tokens kept, the rest of the prompt is ignored\n")
    assert out.is_file() and cap.out.startswith("wrote ")
    assert main(["generate", *map(str, base(model, prior, tmp_path / "short.png"))]) == 0
    assert capsys.readouterr().err == ""  # a prompt that fits says nothing
    with pytest.warns(UserWarning, match=f"16 of {total} tokens kept"):
        generate(str(model), str(prior), long_prompt, str(tmp_path / "api.png"), steps=1)


# --------------------------------------------------------------------------- 7. DICOM by content

@pytest.mark.parametrize("name", ["scan", "scan.png", "IM0001.img"])
def test_a_dicom_is_recognised_by_content_not_extension(tmp_path, model, name):
    arr = _prior()
    _write_dicom(tmp_path / "ref.dcm", arr)
    shutil.copy(tmp_path / "ref.dcm", tmp_path / name)
    np.testing.assert_array_equal(read_image(tmp_path / name), read_image(tmp_path / "ref.dcm"))
    out = tmp_path / "cf.png"
    assert main(["generate", *map(str, base(model, tmp_path / name, out))]) == 0
    assert read_image(out).shape == arr.shape
