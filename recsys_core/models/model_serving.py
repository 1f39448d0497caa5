"""Serving a model directory written by `recsys train` (the layout:
training/modeldir.py): validate it, install its encoder and user
tower as Triton model versions, and give the embedding service its item ID
vectors. Needs neither torch nor transformers, so the services' image can
use it.

    python -m recsys_core.models.model_serving DIR --out REPO   # a Triton model repository serving DIR

A served model:
- Triton's `text_encoder` gets DIR/encoder as its next version (the version
  policy keeps the previous one loaded), and the embedding service, which
  pins the newest version at start, indexes the catalogue with it;
- an item of the catalogue trained on is indexed as encoder(text) plus its ID
  vector (DIR/items), any other item as encoder(text) alone;
- Triton's `user_tower` (deploy/triton/user_tower/) gets DIR/user_tower, and
  the profile service sends it a shopper's latest item vectors.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recsys_core.models import encoder as enc
from recsys_core.models import export
from recsys_core.data import paths
from recsys_core.models import user_tower as ut

log = logging.getLogger(__name__)

# The layout training/modeldir.py writes (that module needs torch;
# tests/test_model_serving.py checks the two agree).
FORMAT = "recsys-two-tower/1"
MANIFEST = "manifest.json"
ENCODER_DIR = "encoder"
USER_TOWER_DIR = "user_tower"
ITEMS_DIR = "items"
ITEM_IDS_FILE = "item_ids.json"
ID_VECTORS_FILE = "id_vectors.npy"

USER_TOWER_MODEL = "user_tower"
# The user tower's Triton config and backend code; not in model_repo/, which
# Triton must be able to load as it is, and a user tower has no weights before
# a model is trained.
USER_TOWER_TEMPLATE = paths.REPO_ROOT / "deploy" / "triton" / USER_TOWER_MODEL
CONFIG_FILE = "config.pbtxt"
SERVING_MARKER = ".recsys-serving-repository"
HOW_TO_TRAIN = "`recsys train --out DIR`"


class ModelDirError(ValueError):
    """A model directory that cannot be served, and why."""


class IdVectors:
    """The ID vectors of the catalogue a model was trained on, by item id."""

    def __init__(self, item_ids: Sequence[str], vectors: np.ndarray):
        self.vectors = np.asarray(vectors, dtype=np.float32)
        self._row = {item_id: row for row, item_id in enumerate(item_ids)}

    def __len__(self) -> int:
        return len(self._row)

    def add_to(self, item_ids: Sequence[str], vectors: np.ndarray) -> np.ndarray:
        """`vectors` (encoder outputs, one row per id) plus the ID vector of
        each id trained on; other rows unchanged."""
        rows = np.asarray([self._row.get(item_id, -1) for item_id in item_ids], dtype=np.int64)
        known = rows >= 0
        out = np.array(vectors, dtype=np.float32, copy=True)
        out[known] += self.vectors[rows[known]]
        return out


@dataclass(frozen=True)
class ModelDir:
    path: Path
    manifest: dict

    @property
    def encoder_dir(self) -> Path:
        return self.path / ENCODER_DIR

    @property
    def user_tower_dir(self) -> Path:
        return self.path / USER_TOWER_DIR

    @property
    def dimension(self) -> int:
        return int(self.manifest["encoder"]["dimension"])

    def encoder_fingerprint(self, precision: str) -> str:
        return enc.weights(self.encoder_dir, precision)[1]

    def item_ids(self) -> list[str]:
        return json.loads((self.path / ITEMS_DIR / ITEM_IDS_FILE).read_text())

    def id_vectors(self) -> IdVectors | None:
        """None for a text-only model."""
        if not self.manifest.get("id_vectors"):
            return None
        return IdVectors(self.item_ids(), np.load(self.path / ITEMS_DIR / ID_VECTORS_FILE))


def serves_model(manifest: dict) -> bool:
    """False for a directory whose training guard (training/guard.py) found
    the model no better on validation than serving without one: serving it
    would make recommendations worse, so the untrained path is served.
    Directories written before the guard have no `guard` and are served."""
    return bool(manifest.get("guard", {}).get("serve_model", True))


def refuse_held_back(path: Path | str) -> None:
    """ModelDirError for a directory whose guard held its model back; read
    from the manifest alone, before the files are checked."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return  # open_model_dir says what is wrong
    if isinstance(manifest, dict) and not serves_model(manifest):
        raise ModelDirError(f"{path}: its training guard held the model back (no better than the untrained "
                            f"serving path on validation: {manifest['guard'].get('valid')}); serve without it, "
                            "or pass --ignore-guard")


def open_model_dir(path: Path | str) -> ModelDir:
    """The model directory at `path`, checked for everything serving reads;
    ModelDirError says what is missing or wrong."""
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"{path}: no such directory (a model directory is what {HOW_TO_TRAIN} writes)")
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise ModelDirError(
            f"{path} is not a model directory written by {HOW_TO_TRAIN}: it has no {MANIFEST} "
            f"(written last, so a training that did not finish leaves none)")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelDirError(f"{manifest_file} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ModelDirError(f"{path}: model format {found!r} is not one this version serves ({FORMAT!r})")
    model = ModelDir(path.resolve(), manifest)

    if not export.is_exported(model.encoder_dir):
        raise ModelDirError(
            f"{model.encoder_dir} is incomplete: an exported encoder has {enc.WEIGHTS_FILE}, "
            f"{enc.INT8_WEIGHTS_FILE}, {enc.TOKENIZER_FILE} and {enc.METADATA_FILE}")
    tower_files = (enc.WEIGHTS_FILE, enc.INT8_WEIGHTS_FILE, ut.METADATA_FILE)
    missing = [name for name in tower_files if not (model.user_tower_dir / name).is_file()]
    if missing:
        raise ModelDirError(f"{model.user_tower_dir} lacks {', '.join(missing)}")
    encoder_dimension = json.loads((model.encoder_dir / enc.METADATA_FILE).read_text())["dimension"]
    tower_dimension = json.loads((model.user_tower_dir / ut.METADATA_FILE).read_text())["dimension"]
    if not encoder_dimension == tower_dimension == model.dimension:
        raise ModelDirError(f"{path}: the encoder ({encoder_dimension}), the user tower ({tower_dimension}) and "
                            f"the manifest ({model.dimension}) disagree on the vector dimension")

    ids_file = path / ITEMS_DIR / ITEM_IDS_FILE
    if not ids_file.is_file():
        raise ModelDirError(f"{path} lacks {ITEMS_DIR}/{ITEM_IDS_FILE}")
    if manifest.get("id_vectors"):
        vectors_file = path / ITEMS_DIR / ID_VECTORS_FILE
        if not vectors_file.is_file():
            raise ModelDirError(f"{path}: the manifest says the model has ID vectors, but {vectors_file} is missing")
        shape = np.load(vectors_file, mmap_mode="r").shape
        items = len(model.item_ids())
        if shape != (items, model.dimension):
            raise ModelDirError(f"{vectors_file} is {shape}, expected ({items}, {model.dimension}): "
                                f"one row per id of {ITEM_IDS_FILE}")
    return model


# -- Triton model versions ------------------------------------------------------


def _link_or_copy(source, target) -> None:
    # Weights are large and never change once written: a hard link costs
    # nothing where the two paths share a file system.
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _fingerprints(version_dir: Path, metadata_file: str) -> dict | None:
    try:
        weights = json.loads((version_dir / metadata_file).read_text())["weights"]
    except (OSError, ValueError, KeyError):
        return None
    return {precision: entry["fingerprint"] for precision, entry in weights.items()}


def encoder_fingerprints(encoder_dir: Path) -> dict | None:
    """What identifies an exported encoder's weights (per precision): equal
    for a registry version's encoder/ and the text_encoder version
    install_encoder made of it; None where there is no exported encoder."""
    return _fingerprints(encoder_dir, enc.METADATA_FILE)


def install_version(source: Path, model_dir: Path, metadata_file: str, backend_code: Path,
                    version: int | None = None) -> int:
    """The version of Triton model `model_dir` that holds the exported files
    of `source`: an existing version with the same weights, else the next
    one, its files linked from `source` (the metadata last: it marks the
    version complete) and the backend's model.py beside them. `version`
    fixes the number instead (Triton pods that install the same registry
    version on their own must agree on it): ModelDirError where that number
    already holds other weights."""
    wanted = _fingerprints(source, metadata_file)
    if version is not None:
        existing = _fingerprints(model_dir / str(version), metadata_file)
        if existing == wanted:
            return version
        if (model_dir / str(version)).exists():
            if existing is not None:
                raise ModelDirError(f"{model_dir / str(version)} holds other weights than {source}")
            # A copy cut short (no metadata: it is written last), made again.
            shutil.rmtree(model_dir / str(version))
    else:
        versions = sorted((int(p.name) for p in model_dir.iterdir() if p.name.isdigit()), reverse=True) \
            if model_dir.is_dir() else []
        for found in versions:
            if _fingerprints(model_dir / str(found), metadata_file) == wanted:
                return found
        version = export.next_version(model_dir)
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True)
    files = sorted((p for p in source.iterdir() if p.is_file()), key=lambda p: p.name == metadata_file)
    for file in files:
        _link_or_copy(file, version_dir / file.name)
    shutil.copyfile(backend_code, version_dir / export.BACKEND_FILE)
    return version


def install_encoder(model: ModelDir, repo: Path, version: int | None = None) -> int:
    """The model's encoder as a version of `repo`/text_encoder (`version`: that number)."""
    model_dir = repo / paths.TEXT_ENCODER_MODEL
    if not (model_dir / CONFIG_FILE).is_file():
        raise ModelDirError(f"{repo} has no {paths.TEXT_ENCODER_MODEL}/{CONFIG_FILE} to install an encoder into")
    return install_version(model.encoder_dir, model_dir, enc.METADATA_FILE, committed_encoder_backend(), version)


def committed_encoder_backend() -> Path:
    return paths.MODEL_REPO / paths.TEXT_ENCODER_MODEL / "1" / export.BACKEND_FILE


def install_user_tower(model: ModelDir, repo: Path) -> int:
    """The model's user tower as a version of `repo`/user_tower, whose
    config is the committed one (deploy/triton/user_tower/) with the
    longest history any installed version reads (`max_len`, so clients send
    no more than that)."""
    model_dir = repo / USER_TOWER_MODEL
    model_dir.mkdir(parents=True, exist_ok=True)
    version = install_version(model.user_tower_dir, model_dir, ut.METADATA_FILE,
                              USER_TOWER_TEMPLATE / export.BACKEND_FILE)
    max_len = max(json.loads(p.read_text())["max_len"] for p in model_dir.glob(f"[0-9]*/{ut.METADATA_FILE}"))
    config = (USER_TOWER_TEMPLATE / CONFIG_FILE).read_text()
    config = re.sub(r"\n*$", "\n", config) + (
        "parameters: {\n"
        "  # Written by recsys_core/models/model_serving.py: the longest history an\n"
        "  # installed version reads; clients send at most this many items.\n"
        '  key: "max_len"\n'
        f'  value: {{ string_value: "{max_len}" }}\n'
        "}\n")
    (model_dir / CONFIG_FILE).write_text(config)
    return version


def replace_serving_repository(out: Path, base: Path) -> None:
    """An empty `out`, removing an earlier serving repository there but
    nothing else: a mistyped path must not delete a real repository."""
    if out.resolve() == base.resolve():
        raise ModelDirError(f"{out} is the repository to start from: the serving repository needs a path of its own")
    if out.exists() and any(out.iterdir()):
        if not (out / SERVING_MARKER).is_file():
            raise ModelDirError(f"{out} exists and was not written by recsys_core.models.model_serving: not replacing it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    # Triton reads only the folders of a repository, never a file beside them.
    (out / SERVING_MARKER).write_text("written by recsys_core.models.model_serving; replaced when a model is served again\n")


def serving_repository(model: ModelDir, out: Path, base: Path = paths.MODEL_REPO,
                       copy: bool = False, models: Sequence[str] | None = None) -> dict[str, int]:
    """A Triton model repository at `out` (replaced if present) that serves
    every model of `base` as it is, plus the model's encoder as the next
    version of text_encoder and its user tower; returns the installed versions.

    `base` itself is never written to: whatever runs on it (`recsys serve`
    without a model, the tests) keeps serving the pretrained encoder. `out`
    links to `base` (symbolic links, or with `copy` real files, as an image
    build needs) and to the model's files (hard links where possible).
    `models` limits what is taken from `base` (default: every model)."""
    serving_repository_of(out, base, models, copy)
    installed = {paths.TEXT_ENCODER_MODEL: install_encoder(model, out), USER_TOWER_MODEL: install_user_tower(model, out)}
    log.info("model repository %s serves %s: %s", out, model.path, installed)
    return installed


def serving_repository_of(out: Path, base: Path = paths.MODEL_REPO, models: Sequence[str] | None = None,
                          copy: bool = False) -> None:
    """A serving repository at `out` (replaced if present) holding `base`'s
    models as they are (all, or `models`), linked or with `copy` copied:
    where a promotion (services/embedding/promotion.py) installs versions."""
    replace_serving_repository(out, base)
    for source in sorted(base.iterdir()):
        if not (source / CONFIG_FILE).is_file() or (models is not None and source.name not in models):
            continue
        target = out / source.name
        target.mkdir()
        versions = [p for p in source.iterdir() if p.name.isdigit()]
        if copy:
            shutil.copyfile(source / CONFIG_FILE, target / CONFIG_FILE)
            for version in versions:
                shutil.copytree(version, target / version.name, copy_function=_link_or_copy,
                                ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (target / CONFIG_FILE).symlink_to((source / CONFIG_FILE).resolve())
            for version in versions:
                (target / version.name).symlink_to(version.resolve(), target_is_directory=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recsys_core.models.model_serving",
        description="Write a Triton model repository serving a trained model directory: model_repo/'s "
                    "models, the model's encoder as the next text_encoder version and its user tower.")
    parser.add_argument("model", type=Path, help=f"model directory ({HOW_TO_TRAIN})")
    parser.add_argument("--out", type=Path, required=True, help="repository to write (replaced if present)")
    parser.add_argument("--base", type=Path, default=paths.MODEL_REPO, help="repository to start from")
    parser.add_argument("--copy", action="store_true",
                        help="real files instead of symbolic links into --base (for an image build)")
    parser.add_argument("--ignore-guard", action="store_true",
                        help="write it even if its training guard held the model back (manifest guard.serve_model)")
    args = parser.parse_args(argv)
    try:
        if not args.ignore_guard:
            refuse_held_back(args.model)
        model = open_model_dir(args.model)
        installed = serving_repository(model, args.out, args.base, copy=args.copy)
    except ModelDirError as error:
        print(f"model_serving: {error}", file=sys.stderr)
        return 1
    print(json.dumps({"repository": str(args.out), "model": str(model.path), "versions": installed}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
