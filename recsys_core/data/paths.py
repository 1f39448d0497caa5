"""Where the platform finds its bundled data, model repository and caches."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_DATA_DIR = REPO_ROOT / "data"
# A subset of the UCI Online Retail invoices (scripts/make_subset.py): shoppers with money.
BUNDLED_RETAIL_DIR = BUNDLED_DATA_DIR / "online-retail"
MODEL_REPO = REPO_ROOT / "model_repo"
TEXT_ENCODER_MODEL = "text_encoder"
REVIEW_SENTIMENT_MODEL = "review_sentiment"


def cache_dir() -> Path:
    """Embedding caches, outside the clone so that a new clone reuses vectors this
    machine already computed for the same weights and texts. RECSYS_CACHE_DIR moves it."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "recsys"
    return Path(os.environ.get("RECSYS_CACHE_DIR", default))


def shared_data_dir() -> Path:
    """The full public data set, kept beside the clone (../shared/data/amazon-2014)."""
    return REPO_ROOT.parent / "shared" / "data" / "amazon-2014"


BUNDLED_REVIEWS_DIR = BUNDLED_DATA_DIR / "reviews"


def reviews_data_dir() -> Path:
    """The review corpora beside the clone (../shared/data/reviews), else the
    bundled sample (scripts/make_subset.py)."""
    shared = REPO_ROOT.parent / "shared" / "data" / "reviews"
    return shared if shared.is_dir() else BUNDLED_REVIEWS_DIR
