"""Files: atomic writes, sha256 manifests, and image reading that fails loudly (DESIGN "Working rules").

Every artifact of the chain is written to a temporary file in the same folder and renamed into place,
so an interrupted run never leaves a half-written file under the final name. A `Manifest` records each
output's sha256 together with a fingerprint of the inputs that produced it, which is how a step knows
that a rerun with the same inputs has nothing to do.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


# --------------------------------------------------------------------------- atomic writes

@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_torch_save(path: str | os.PathLike, obj) -> Path:
    """torch.save, atomically and byte-reproducibly: the archive is built in memory, so the record name
    inside it does not come from the temporary file's random name."""
    import torch  # deferred: io stays importable without loading torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_csv(path: str | os.PathLike, df) -> Path:
    """Write a pandas DataFrame as CSV (no index) atomically."""
    return atomic_write_text(path, df.to_csv(index=False))


def atomic_write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write a 2-D uint8 (or uint16) array as a grayscale PNG, atomically and deterministically."""
    arr = np.asarray(image)
    if arr.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"{path}: expected uint8/uint16 image, got {arr.dtype}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- figures and tables

# The credit line a run stamps on every figure it saves (the chain sets it from the profile's `figure_credit`,
# e.g. the CC BY attribution of a real cohort's images); unset = no line.
CREDIT_ENV = "BMJ_FIGURE_CREDIT"


def figure_credit() -> str:
    """The run's figure credit line ($BMJ_FIGURE_CREDIT), "" when none."""
    return os.environ.get(CREDIT_ENV, "").strip()


def save_figure(fig, folder: str | os.PathLike | None, name: str, dpi: int = 150,
                bbox_inches: str | None = "tight", formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """folder/<name>.png and .pdf (or `formats`), each written atomically; returns the paths.

    Nothing is written when `folder` is None. PDFs carry no creation date, so the same figure gives the
    same bytes. The figure is left open. The run's `figure_credit()` is added below everything else unless
    the figure already carries it.
    """
    if folder is None:
        return []
    credit = figure_credit()
    if credit and not any(credit in t.get_text() for t in fig.texts):
        if bbox_inches:  # below everything; the tight box grows to hold it
            low = min([t.get_position()[1] for t in fig.texts] + [0.0])
            fig.text(0.5, low - 0.05, credit, ha="center", va="top", fontsize=6, color="0.3", wrap=True)
        else:  # a fixed canvas: inside its bottom edge
            fig.text(0.5, 0.002, credit, ha="center", va="bottom", fontsize=6, color="0.3", wrap=True)
    out = []
    for ext in formats:
        path = Path(folder) / f"{name}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=dpi, bbox_inches=bbox_inches,
                        metadata={"CreationDate": None} if ext == "pdf" else None)
        out.append(path)
    return out


def markdown_table(df: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    """A GitHub Markdown table without extra dependencies; missing values print as empty cells."""
    def cell(v):
        if v is None or (not isinstance(v, str) and pd.isna(v)):
            return ""
        return floatfmt.format(v) if isinstance(v, (float, np.floating)) else str(v)
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_table(df: pd.DataFrame, folder: str | os.PathLike, name: str, caption: str = "", note: str = "",
                floatfmt: str = "{:.3f}") -> list[Path]:
    """A published table: folder/<name>.csv (no index) and folder/<name>.md (caption, table, note), atomic."""
    folder = Path(folder)
    atomic_write_csv(folder / f"{name}.csv", df)
    text = (f"{caption}\n\n" if caption else "") + markdown_table(df, floatfmt) + note
    atomic_write_text(folder / f"{name}.md", text)
    return [folder / f"{name}.csv", folder / f"{name}.md"]


# --------------------------------------------------------------------------- resizing

def resize_image(image: np.ndarray, size: int | tuple[int, int], nearest: bool = False) -> np.ndarray:
    """The package's one image resize: H,W (or a stack N,H,W) to `size` (int: square, or (height, width)).

    PIL bilinear on float32, which averages over the source footprint when shrinking (the same numbers as
    torch's bilinear interpolation with antialias=True); `nearest=True` for label maps. A uint8 image
    comes back uint8 (rounded); a bool mask comes back bool, True where the mask covers more than half of
    the output pixel (area average > 0.5); anything else comes back float32.
    """
    arr = np.asarray(image)
    h, w = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    if arr.ndim == 3:
        out = np.zeros((len(arr), h, w), arr.dtype if arr.dtype in (np.uint8, bool) else np.float32)
        for i, a in enumerate(arr):
            out[i] = resize_image(a, (h, w), nearest)
        return out
    if arr.ndim != 2:
        raise ValueError(f"resize_image expects H,W or N,H,W; got shape {arr.shape}")
    x = np.array(arr, dtype=np.float32, order="C")  # a new array, never a view of the input
    if x.shape != (h, w):
        how = Image.NEAREST if nearest else Image.BOX if arr.dtype == bool else Image.BILINEAR
        x = np.asarray(Image.fromarray(x).resize((w, h), how), np.float32)
    if arr.dtype == np.uint8:
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)
    if arr.dtype == bool:
        return x > 0.5
    return x


# --------------------------------------------------------------------------- hashing and manifests

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def contents_fingerprint(paths) -> str:
    """sha256 over the sha256 of each file of `paths` (unique, sorted; an empty path or a missing file counts
    as such): the identity of a set of images, which their paths alone do not give (a rerun rewrites them)."""
    return fingerprint([(p, sha256_file(p) if p and os.path.isfile(p) else "missing")
                        for p in sorted({str(p) for p in paths})])


def fingerprint(*parts: Any) -> str:
    """sha256 of a JSON rendering of `parts` (parameters, input hashes): the identity of a piece of work."""
    return sha256_bytes(json.dumps(parts, sort_keys=True, default=str).encode("utf-8"))


def files_fingerprint(files, root: str | os.PathLike) -> str:
    """sha256 over (path relative to `root`, sha256) of each of `files`, in the order given."""
    root = Path(root)
    return fingerprint([(Path(f).relative_to(root).as_posix(), sha256_file(f)) for f in files])


def folder_fingerprint(folder: str | os.PathLike, skip_suffixes: tuple[str, ...] = (".md",)) -> str:
    """sha256 over (relative path, sha256) of every file under `folder` but those ending in `skip_suffixes`
    (documentation): the identity of a saved model, every part of which shapes its output."""
    root = Path(folder)
    return files_fingerprint(sorted(f for f in root.rglob("*") if f.is_file() and not f.name.endswith(skip_suffixes)),
                             root)


class Manifest:
    """A JSON file mapping each output (path relative to `root`) to its sha256 and the inputs' fingerprint.

    `is_current(rel, key)` is true when the output exists, still has the recorded sha256 and was made
    from inputs with fingerprint `key`: the step can skip it. `record(rel, key)` stores the new state.
    Call `save()` (atomic) after a batch of records; a crash loses at most the unsaved entries, and
    those outputs are simply redone.
    """

    def __init__(self, path: str | os.PathLike, root: str | os.PathLike | None = None):
        self.path = Path(path)
        self.root = Path(root) if root is not None else self.path.parent
        self.entries: dict[str, dict[str, str]] = {}
        if self.path.exists():
            self.entries = json.loads(self.path.read_text())

    def is_current(self, rel: str, key: str) -> bool:
        e = self.entries.get(rel)
        f = self.root / rel
        return bool(e) and e.get("inputs") == key and f.exists() and sha256_file(f) == e.get("sha256")

    def record(self, rel: str, key: str) -> str:
        digest = sha256_file(self.root / rel)
        self.entries[rel] = {"sha256": digest, "inputs": key}
        return digest

    def save(self) -> None:
        atomic_write_json(self.path, self.entries)


# --------------------------------------------------------------------------- reading images

# The largest image the package reads: 100 megapixels. The largest projection radiographs are far smaller
# (a 43 x 43 cm chest detector at 0.1 mm pitch is 4300 x 4300 = 18.5 MP; full-field mammography is about
# 30 MP), the model itself works at 256 px or less, and 100 MP is already 400 MB as float32; a larger
# file is refused with ImageError before it is decoded (a 'decompression bomb' never fills the memory).
MAX_IMAGE_PIXELS = 100_000_000
DICOM_MAGIC_OFFSET = 128  # a DICOM file (PS3.10) is a 128-byte preamble, then b"DICM", whatever its name


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a radiograph as a 2-D float32 array in [0, 1].

    PNG/JPEG of any bit depth (8- or 16-bit; 16-bit is scaled by its own range, not clamped), RGB or
    RGBA (converted to luminance), and DICOM (recognised by its content, so with any file name or none;
    rescale slope/intercept and MONOCHROME1 inversion applied). Raises `ImageError` naming the file for a
    missing, truncated or undecodable file, for an image over MAX_IMAGE_PIXELS, and for a blank (constant)
    image, which is never silently turned into zeros.
    """
    arr = read_pixels(path)
    lo, hi = float(arr.min()), float(arr.max())
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ImageError(path, "image contains NaN or infinite values")
    if hi - lo < 1e-6:
        raise ImageError(path, f"image is blank (every pixel = {lo:g})")
    return (arr - lo) / (hi - lo)


def read_pixels(path: str | os.PathLike) -> np.ndarray:
    """The stored pixel values of an image as float32 (0-255 for 8-bit, DICOM after rescale), before
    `read_image`'s scaling to [0, 1]: what a comparison in one intensity frame needs (e.g. an 8-bit PNG the
    package wrote is read back as pixels / 255, not stretched again). Same errors as `read_image`."""
    path = Path(path)
    if not path.exists():
        raise ImageError(path, "file does not exist")
    if path.is_dir():
        raise ImageError(path, "is a folder, not an image file")
    if path.stat().st_size == 0:
        raise ImageError(path, "file is empty")
    dicom = is_dicom(path) or path.suffix.lower() in (".dcm", ".dicom")
    arr = _read_dicom(path) if dicom else _read_raster(path)
    return arr.astype(np.float32)


def is_dicom(path: str | os.PathLike) -> bool:
    """True when the file is a DICOM file by content: b"DICM" after the 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            head = f.read(DICOM_MAGIC_OFFSET + 4)
    except OSError:
        return False
    return head[DICOM_MAGIC_OFFSET:] == b"DICM"


def _too_large(path: Path, width: int | None, height: int | None, pixels: int | None = None) -> ImageError:
    pixels = pixels if pixels is not None else width * height
    size = f"{width} x {height} pixels" if width and height else f"{pixels:,} pixels"
    return ImageError(path, f"image is {size} ({pixels / 1e6:.1f} megapixels), over the limit of "
                            f"{MAX_IMAGE_PIXELS / 1e6:g} megapixels for images read by bmjlib "
                            "(bmjlib.io.MAX_IMAGE_PIXELS); downsample it first")


def _png_size(path: Path) -> tuple[int, int] | tuple[None, None]:
    """(width, height) from a PNG's IHDR chunk without decoding, else (None, None)."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return None, None


def _read_raster(path: Path) -> np.ndarray:
    try:
        with warnings.catch_warnings():  # the size limit is MAX_IMAGE_PIXELS, checked below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)  # reads the header only
        with im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise _too_large(path, im.width, im.height)
            im.load()  # forces a full decode, so a truncated file fails here
            mode = im.mode
            if mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
                arr = np.asarray(im.convert("L"), dtype=np.float32)
            elif mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
            elif mode == "F":
                arr = np.asarray(im, dtype=np.float32)
            else:
                arr = np.asarray(im.convert("L"), dtype=np.float32)
    except Image.DecompressionBombError as e:  # PIL's own limit (2 x its MAX_IMAGE_PIXELS) is hit at open
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise _too_large(path, *_png_size(path), int(found.group(1)) if found else None) from None
    except UnidentifiedImageError:
        raise ImageError(path, "not a readable image (unknown or corrupt format)") from None
    except PermissionError:
        raise ImageError(path, "cannot be read (permission denied)") from None
    except (OSError, SyntaxError) as e:  # PIL raises OSError("image file is truncated ...")
        raise ImageError(path, f"corrupt or truncated image ({e})") from None
    if arr.ndim != 2:
        raise ImageError(path, f"expected a 2-D grayscale image, got shape {arr.shape}")
    return arr


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom  # deferred: only DICOM priors need it

    try:
        ds = pydicom.dcmread(str(path), defer_size="1 MB")  # pixel data is read only after the size check
        rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    except Exception as e:  # pydicom raises many types for bad files
        raise ImageError(path, f"unreadable DICOM ({type(e).__name__}: {e})") from None
    if rows * cols * frames > MAX_IMAGE_PIXELS:
        raise _too_large(path, cols, rows, rows * cols * frames)
    try:
        arr = ds.pixel_array.astype(np.float32)
    except Exception as e:  # pydicom raises many types for bad files
        raise ImageError(path, f"unreadable DICOM ({type(e).__name__}: {e})") from None
    arr = arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
    if arr.ndim == 3:  # multi-frame or colour: take the first frame / luminance
        arr = arr[0] if arr.shape[-1] not in (3, 4) else arr[..., :3].mean(-1)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = arr.max() - arr
    return arr


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 with rounding and clipping."""
    return np.clip(np.rint(np.asarray(image, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on success it replaces `path` (old one removed),
    on error it is deleted. A reader never sees a half-written folder under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        if path.exists():
            old = path.parent / f".{path.name}.old.{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- the package's own code as an input

PACKAGE_DIR = Path(__file__).resolve().parent  # the bmjlib package


def imports_of(tree: ast.AST, package: str = "bmjlib") -> set[str]:
    """The `package` modules a parsed source imports at its top level or inside functions."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == package}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == package:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
    return names


def _module_file(name: str, root: Path) -> Path | None:
    parts = name.split(".")[1:]
    if not parts:
        return root / "__init__.py" if (root / "__init__.py").is_file() else None
    rel = Path(*parts)
    for f in (root / rel.with_suffix(".py"), root / rel / "__init__.py"):
        if f.is_file():
            return f
    return None


def code_files(modules: set[str], root: Path = PACKAGE_DIR) -> list[Path]:
    """The source files of `modules` and of everything they import from the same package, transitively,
    with the packages' __init__ files (importing a module runs them)."""
    package = root.name
    seen: dict[str, Path] = {}
    todo = list(modules) + [package]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        f = _module_file(name, root)
        if f is None:
            continue
        seen[name] = f
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        st = f.stat()
        todo += _file_imports(str(f), st.st_mtime_ns, st.st_size, package)
    return sorted(set(seen.values()))


@functools.lru_cache(maxsize=4096)
def _file_imports(path: str, mtime_ns: int, size: int, package: str) -> list[str]:
    """imports_of one source file, parsed once per version of it (every cached step asks for its code's key)."""
    return sorted(imports_of(ast.parse(Path(path).read_text()), package))


def code_fingerprint_of(*modules: str, root: Path = PACKAGE_DIR) -> str:
    """sha256 over the source of `modules` and everything they import from the package, transitively: an
    output cached under a key that includes it is redone when the code that makes it changes."""
    return files_fingerprint(code_files(set(modules), root), root)
