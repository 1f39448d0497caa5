"""Where the platform finds its bundled data, model repository and caches."""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_DATA_DIR = REPO_ROOT / "data"
# A subset of the UCI Online Retail invoices (scripts/make_subset.py): shoppers with money.
BUNDLED_RETAIL_DIR = BUNDLED_DATA_DIR / "online-retail"
# A data directory's files (recsys_core/data/shopping.py); here so that a
# service may name them without importing pandas.
ITEMS_FILE = "items.csv.gz"
INTERACTIONS_FILE = "interactions.csv.gz"
MODEL_REPO = REPO_ROOT / "model_repo"
TEXT_ENCODER_MODEL = "text_encoder"
# The same encoder as a Triton ensemble without a Python stub around the
# graph: tokenisation (Python backend) then the pooled ONNX graph on Triton's
# onnxruntime backend (TensorRT on GPU). docs/operations.md, "Triton models".
TEXT_TOKENIZER_MODEL = "text_tokenizer"
TEXT_ENCODER_ONNX_MODEL = "text_encoder_onnx"
TEXT_ENCODER_ENSEMBLE_MODEL = "text_encoder_ensemble"
REVIEW_SENTIMENT_MODEL = "review_sentiment"


def cache_dir() -> Path:
    """Embedding caches, outside the clone so that a new clone reuses vectors this
    machine already computed for the same weights and texts. RECSYS_CACHE_DIR moves it."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "recsys"
    return Path(os.environ.get("RECSYS_CACHE_DIR", default))


def files_digest(files: list[Path]) -> str:
    """A digest of files' names and contents: names a data set by what it
    holds, so a service may keep what it derived from it across restarts."""
    import hashlib

    digest = hashlib.sha256()
    for path in files:
        digest.update(Path(path).name.encode() + b"\0")
        with open(path, "rb") as content:
            for block in iter(lambda: content.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


def directory_files(directory: Path) -> list[Path]:
    """The regular files directly in `directory`, in name order."""
    return sorted(p for p in Path(directory).iterdir() if p.is_file())


def shared_data_dir() -> Path:
    """The full public data set, kept beside the clone (../shared/data/amazon-2014)."""
    return REPO_ROOT.parent / "shared" / "data" / "amazon-2014"


BUNDLED_REVIEWS_DIR = BUNDLED_DATA_DIR / "reviews"


def reviews_data_dir() -> Path:
    """The review corpora beside the clone (../shared/data/reviews), else the
    bundled sample (scripts/make_subset.py)."""
    shared = REPO_ROOT.parent / "shared" / "data" / "reviews"
    return shared if shared.is_dir() else BUNDLED_REVIEWS_DIR


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` to write; once the block succeeds it
    replaces `path` in one step, so a reader never sees half a file. Its name
    is unique, so writers that overlap (two saves of one cache) never write
    into each other's temporary file; the last to finish wins. The suffix is
    kept, for writers that add or check one (numpy's .npz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer creates the file itself, with the permissions it always had.
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.tmp{path.suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
