"""Review sentiment: the held-out split, fine-tuning MiniLM, export and evaluation.

`recsys train-reviews` fine-tunes the pretrained MiniLM (the encoder's base
model) with a classification head on the training part of the review corpora,
stops early on a validation slice of that part, exports the best weights to
ONNX (fp32 and int8) into model_repo/review_sentiment/<version>/, and measures
the held-out accuracy of both beside the lexicon baseline.
`recsys evaluate-reviews` measures an exported model again.

The split (never trained or tuned on): see `split_reviews`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from recsys_core.models import export
from recsys_core.data import paths
from recsys_core.models import review_classifier as rc
from recsys_core.signals import reviews

log = logging.getLogger(__name__)

MULTI_DOMAIN_FILE = "multi-domain-sentiment-2007.csv.gz"
BEAUTY_FILE = "amazon-all-beauty-2018.csv.gz"
MULTI_DOMAIN = "multi-domain"
BEAUTY = "all-beauty"
BEAUTY_DOMAIN = "all_beauty"
# Changing the salt or the fractions makes a different split: results on
# another split are not comparable.
SPLIT_SALT = "recsys-reviews-split-v1"
HELD_OUT_FRACTION = 0.20
VALID_FRACTION = 0.10
TRAIN, VALID, TEST = "train", "valid", "test"
GENERATED_TITLE = r"(?i)(one|two|three|four|five) stars?"
CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.pt"
DONE_FILE = "training.json"
RESULTS_FILE = "evaluation.json"


# -- data and split ---------------------------------------------------------------

def normalised(text: str) -> str:
    return " ".join(str(text).lower().split())


def split_key(body: str) -> str:
    return hashlib.sha256(f"{SPLIT_SALT}\n{normalised(body)}".encode("utf-8")).hexdigest()


def split_reviews(frame: pd.DataFrame) -> pd.Series:
    """TRAIN / VALID / TEST for each review of one corpus.

    Within each stratum (domain x label), the distinct review bodies
    (lower-cased, whitespace collapsed) are ordered by SHA-256 of SPLIT_SALT
    and the body; the first 20% of them (rounded) are held out (TEST), the next
    10% are the validation slice (VALID) for early stopping and choices, the
    rest TRAIN. Deterministic without a seed, independent of row order, and a
    body posted twice (the corpora hold copies: 147 in multi-domain, 1,364 in
    All_Beauty, one per product variant) never lands on both sides.
    """
    keys = frame["body"].map(split_key)
    parts = pd.Series(TRAIN, index=frame.index, dtype=object)
    for _, stratum in frame.groupby(["domain", "label"], sort=True):
        distinct = sorted(set(keys[stratum.index]))
        held_out = round(HELD_OUT_FRACTION * len(distinct))
        valid = round(VALID_FRACTION * len(distinct))
        part_of = {key: TEST if rank < held_out else VALID if rank < held_out + valid else TRAIN
                   for rank, key in enumerate(distinct)}
        parts[stratum.index] = keys[stratum.index].map(part_of)
    return parts


def load_reviews(data_dir: Path) -> pd.DataFrame:
    """Both corpora with a binary label (rating >= 4 positive, <= 2 negative,
    3 dropped) and their split: columns corpus, domain, item_id, rating,
    label, title, body, text (title and body as the model reads them), part."""
    frames = []
    for corpus, filename in ((MULTI_DOMAIN, MULTI_DOMAIN_FILE), (BEAUTY, BEAUTY_FILE)):
        path = Path(data_dir) / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: --data must name the reviews folder "
                                    f"(../shared/data/reviews)")
        raw = pd.read_csv(path)
        frame = pd.DataFrame({
            "corpus": corpus,
            "domain": raw["domain"] if "domain" in raw else BEAUTY_DOMAIN,
            "item_id": raw["item_id"].astype(str),
            "rating": raw["rating"].astype(float),
            "title": raw["summary"].fillna("").astype(str).str.strip(),
            "body": raw["text"].fillna("").astype(str).str.strip(),
        })
        # All_Beauty's "Five Stars", "One Star", ... titles were written by the
        # shop from the rating, not by the reviewer: they would give the label away.
        frame.loc[frame.title.str.fullmatch(GENERATED_TITLE), "title"] = ""
        frame = frame[(frame.rating != 3) & ((frame.body != "") | (frame.title != ""))].copy()
        # A review without a body is split by its title.
        frame.loc[frame.body == "", "body"] = frame.title
        frame["label"] = (frame.rating >= 4).astype(int)
        frame["text"] = [reviews.review_text(t, b) for t, b in zip(frame.title, frame.body)]
        frame["part"] = split_reviews(frame)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def training_examples(frame: pd.DataFrame, part: str, corpora: tuple[str, ...]) -> pd.DataFrame:
    """One row per distinct body of `part`: copies would weigh a review twice."""
    rows = frame[(frame.part == part) & frame.corpus.isin(corpora)]
    return rows.loc[~rows.body.map(normalised).duplicated()]


# -- the model ---------------------------------------------------------------------

def build_model(source_dir: Path):
    """The pretrained transformer, mean pooling (as the sentence encoder was
    trained) and a linear head; forward() returns P(positive) as [batch, 1],
    the exported graph's output."""
    import torch
    from transformers import AutoModel

    class ReviewSentimentModel(torch.nn.Module):
        def __init__(self, transformer):
            super().__init__()
            self.transformer = transformer
            self.dropout = torch.nn.Dropout(0.1)
            self.head = torch.nn.Linear(transformer.config.hidden_size, 1)

        def logits(self, input_ids, attention_mask):
            hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return self.head(self.dropout(pooled)).squeeze(-1)

        def forward(self, input_ids, attention_mask):
            return torch.sigmoid(self.logits(input_ids, attention_mask)).unsqueeze(-1)

    return ReviewSentimentModel(AutoModel.from_pretrained(str(source_dir)))


@dataclass
class TrainConfig:
    max_tokens: int = rc.MAX_TOKENS
    head_tokens: int = rc.HEAD_TOKENS
    # Two epochs reached the target (docs/profiles.md); a third costs another
    # 400 steps on this machine's CPU.
    epochs: int = 2
    learning_rate: float = 4e-5
    batch_size: int = 16
    warmup_fraction: float = 0.06
    weight_decay: float = 0.01
    # The share of training reviews shown without their title each epoch, so
    # the model also reads bare review bodies (what most callers send) well.
    title_dropout: float = 0.3
    # Validation passes per epoch (early stopping looks at each).
    evaluations_per_epoch: int = 2
    # Stop after this many validation passes without a better accuracy.
    patience: int = 3
    corpora: tuple[str, ...] = (MULTI_DOMAIN, BEAUTY)
    # Training reviews used (None: all): the quick recipe's budget.
    train_limit: int | None = None
    max_minutes: float | None = None
    seed: int = 13
    threads: int = 1


FULL = TrainConfig()
# `make setup` and CI: 80 steps on 1,280 reviews cut to 128 tokens, every
# core (a fixed number of steps, not a time budget, so that every machine
# gets the same model).
QUICK = TrainConfig(max_tokens=128, head_tokens=32, epochs=1, learning_rate=8e-5, evaluations_per_epoch=1,
                    train_limit=1280, threads=os.cpu_count() or 1)


@dataclass
class TrainResult:
    steps: int = 0
    epochs_done: float = 0.0
    seconds: float = 0.0
    losses: list = field(default_factory=list)
    valid_history: list = field(default_factory=list)
    best_valid_accuracy: float = -1.0
    best_step: int = 0
    stopped: str = ""


def batches_by_length(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar length: less padding, so far less compute on
    CPU, while each epoch still sees a new mix."""
    order = rng.permutation(len(lengths))
    pool = batch_size * 50
    batches = []
    for start in range(0, len(order), pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def predict(model, tokenizer: rc.ReviewTokenizer, texts: list[str], batch_size: int = 64,
            progress: str | None = None) -> np.ndarray:
    """P(positive) from the torch model, in length order."""
    import torch
    from tqdm import tqdm

    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.empty(len(texts), dtype=np.float32)
    model.eval()
    starts = range(0, len(texts), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc=progress, disable=progress is None, leave=False):
            chunk = order[start : start + batch_size]
            ids, mask = tokenizer([texts[i] for i in chunk])
            out[chunk] = model(torch.from_numpy(ids), torch.from_numpy(mask))[:, 0].numpy()
    return out


def train(frame: pd.DataFrame, config: TrainConfig, out: Path, source_dir: Path | None = None):
    """Fine-tune on the TRAIN part, early-stopping on the multi-domain VALID
    slice. Resumes from out/checkpoint.pt; returns the best model and the run."""
    import torch
    from tqdm import tqdm
    from transformers import get_linear_schedule_with_warmup

    source_dir = source_dir or export.pretrained_model_dir()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = rc.ReviewTokenizer(source_dir, config.max_tokens, config.head_tokens)

    train_rows = training_examples(frame, TRAIN, config.corpora)
    if config.train_limit is not None and len(train_rows) > config.train_limit:
        # Stratified by corpus and label, so a small budget keeps the balance.
        train_rows = train_rows.groupby(["corpus", "label"]).sample(
            frac=config.train_limit / len(train_rows), random_state=config.seed)
    valid_rows = training_examples(frame, VALID, (MULTI_DOMAIN,))
    if config.train_limit is not None:
        valid_rows = valid_rows.sample(n=min(len(valid_rows), config.train_limit // 4), random_state=config.seed)
    labels = torch.tensor(train_rows.label.to_numpy(), dtype=torch.float32)
    # Class-balanced weights: All_Beauty is 94% positive, and the model
    # should not learn that prior.
    positive_share = float(labels.mean())
    weights = torch.where(labels > 0, 0.5 / positive_share, 0.5 / (1 - positive_share))
    log.info("training on %d reviews (%s), validating on %d; %.0f%% positive",
             len(train_rows), "+".join(config.corpora), len(valid_rows), 100 * positive_share)

    model = build_model(source_dir)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "LayerNorm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "LayerNorm" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.learning_rate)
    steps_per_epoch = math.ceil(len(train_rows) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_fraction * total_steps), total_steps)
    evaluate_every = max(1, steps_per_epoch // config.evaluations_per_epoch)

    result = TrainResult()
    checkpoint_path = out / CHECKPOINT_FILE
    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, weights_only=False)
        if state["config"] != asdict(config):
            raise ValueError(f"{checkpoint_path} was written with another configuration: "
                             f"remove it or pick another --out")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        result = TrainResult(**state["result"])
        log.info("resuming at step %d of %d", result.steps, total_steps)

    def save_checkpoint() -> None:
        with paths.replacing(checkpoint_path) as tmp:
            torch.save({"config": asdict(config), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "result": asdict(result)}, tmp)

    def validate() -> bool:
        """Validation accuracy; saves the best weights. True: stop early."""
        probabilities = predict(model, tokenizer, valid_rows.text.tolist(), progress="validation")
        accuracy = float(((probabilities >= 0.5) == valid_rows.label.to_numpy()).mean())
        result.valid_history.append({"step": result.steps, "accuracy": round(accuracy, 4)})
        if accuracy > result.best_valid_accuracy:
            result.best_valid_accuracy, result.best_step = accuracy, result.steps
            torch.save(model.state_dict(), out / BEST_FILE)
        log.info("step %d: validation accuracy %.4f (best %.4f at step %d)", result.steps, accuracy,
                 result.best_valid_accuracy, result.best_step)
        since_best = sum(1 for h in result.valid_history if h["step"] > result.best_step)
        return since_best >= config.patience

    started = time.monotonic() - result.seconds
    bodies = train_rows.body.tolist()
    full = train_rows.text.tolist()
    stop = ""
    progress = tqdm(total=total_steps, initial=result.steps, desc="train-reviews", unit="step")
    for epoch in range(result.steps // steps_per_epoch, config.epochs):
        # The epoch's texts and batch order depend only on the seed and the
        # epoch, so a resumed run continues exactly where it stopped.
        rng = np.random.default_rng([config.seed, epoch])
        use_title = rng.random(len(full)) >= config.title_dropout
        texts = [t if keep else b for t, b, keep in zip(full, bodies, use_title)]
        ids_all, mask_all = tokenizer(texts)
        lengths = mask_all.sum(axis=1)
        for batch_number, batch in enumerate(batches_by_length(lengths, config.batch_size, rng)):
            if epoch * steps_per_epoch + batch_number < result.steps:
                continue
            model.train()
            width = int(lengths[batch].max())
            ids = torch.from_numpy(ids_all[batch, :width])
            mask = torch.from_numpy(mask_all[batch, :width])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                model.logits(ids, mask), labels[batch], weight=weights[batch])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            result.steps += 1
            result.losses.append(round(loss.item(), 4))
            progress.update(1)
            progress.set_postfix(loss=f"{np.mean(result.losses[-50:]):.3f}")
            result.seconds = time.monotonic() - started
            out_of_time = config.max_minutes is not None and result.seconds > 60 * config.max_minutes
            if result.steps % evaluate_every == 0 or result.steps % steps_per_epoch == 0 or out_of_time:
                if validate():
                    stop = "early stop: no better validation accuracy in " f"{config.patience} passes"
                result.epochs_done = result.steps / steps_per_epoch
                result.seconds = time.monotonic() - started
                save_checkpoint()
            if out_of_time and not stop:
                stop = f"time budget of {config.max_minutes} minutes"
            if stop:
                break
        if stop:
            break
    progress.close()
    result.stopped = stop or f"{config.epochs} epochs"
    result.epochs_done = result.steps / steps_per_epoch
    if not result.valid_history or result.valid_history[-1]["step"] != result.steps:
        validate()
    save_checkpoint()
    model.load_state_dict(torch.load(out / BEST_FILE, weights_only=True))
    model.eval()
    log.info("training done (%s) after %d steps, %.0f s; best validation accuracy %.4f at step %d",
             result.stopped, result.steps, result.seconds, result.best_valid_accuracy, result.best_step)
    return model, result


def export_classifier(model, config: TrainConfig, version_dir: Path, info: dict,
                      source_dir: Path | None = None) -> Path:
    """The fine-tuned model as ONNX (fp32 and int8), its tokenizer and
    classifier.json (moved in last: it marks a complete export).

    Everything is written to a staging folder first and then moved into
    `version_dir` file by file, so a Triton (re)loading the version meanwhile
    sees old or new files, never half-written ones."""
    from transformers import AutoTokenizer

    source_dir = source_dir or export.pretrained_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(source_dir))
    staging = version_dir.parent / f".{version_dir.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    fp32 = export.export_onnx(model.eval(), tokenizer, staging, rc.POSITIVE_PROBABILITY)
    export.save_tokenizer(source_dir, tokenizer, staging)
    int8 = export.quantize_int8(fp32, staging / "model.int8.onnx")
    metadata = {
        "dimension": 1,
        "source": str(source_dir),
        "max_tokens": config.max_tokens,
        "head_tokens": config.head_tokens,
        "opset": export.OPSET,
        "weights": export.weights_metadata(fp32, int8),
        **info,
    }
    (staging / rc.METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    version_dir.mkdir(parents=True, exist_ok=True)
    for name in (fp32.name, int8.name, rc.enc.TOKENIZER_FILE, rc.METADATA_FILE):
        (staging / name).replace(version_dir / name)
    staging.rmdir()
    log.info("exported the review classifier to %s", version_dir)
    return version_dir


# -- evaluation ---------------------------------------------------------------------

def accuracy_report(probabilities: np.ndarray, rows: pd.DataFrame) -> dict:
    """Accuracy overall and per domain, and per class (All_Beauty is 94% positive)."""
    predicted = probabilities >= 0.5
    correct = predicted == rows.label.to_numpy().astype(bool)
    report = {"accuracy": round(float(correct.mean()), 4), "reviews": int(len(rows))}
    labels = rows.label.to_numpy()
    for name, value in (("positive", 1), ("negative", 0)):
        report[f"{name}_recall"] = round(float(correct[labels == value].mean()), 4) if (labels == value).any() else None
    domains = rows.domain.to_numpy()
    if len(set(domains)) > 1:
        report["domains"] = {d: round(float(correct[domains == d].mean()), 4) for d in sorted(set(domains))}
    return report


def classify_distinct(classify, texts: list[str]) -> np.ndarray:
    """classify(texts), asking once per distinct text (All_Beauty holds each
    review about four times)."""
    distinct = list(dict.fromkeys(texts))
    probabilities = np.asarray(classify(distinct))
    index = {text: i for i, text in enumerate(distinct)}
    return probabilities[[index[t] for t in texts]]


def evaluate(frame: pd.DataFrame, classifiers: dict, body_only: bool = False) -> dict:
    """Held-out accuracy of each classifier (name -> classify(texts) -> P(positive))
    on both corpora: every held-out review, copies included, as the data has them."""
    results = {}
    for corpus in (MULTI_DOMAIN, BEAUTY):
        rows = frame[(frame.part == TEST) & (frame.corpus == corpus)]
        variants = {"title+body": rows.text.tolist()}
        if body_only:
            variants["body"] = rows.body.tolist()
        for variant, texts in variants.items():
            for name, classify in classifiers.items():
                started = time.monotonic()
                report = accuracy_report(classify_distinct(classify, texts), rows)
                report["seconds"] = round(time.monotonic() - started, 1)
                results.setdefault(corpus, {}).setdefault(variant, {})[name] = report
                log.info("%s %s %s: accuracy %.4f", corpus, variant, name, report["accuracy"])
    return results


def aspect_report(frame: pd.DataFrame, classify) -> dict:
    """How the aspects fare on the held-out reviews (distinct bodies, both
    corpora): per aspect, the share of reviews naming it, how often it was
    praised, criticised or only mentioned, and how often a clear praise or
    criticism agrees with the review's stars. No corpus labels aspects, so
    the agreement is a proxy: a 5-star review may still criticise the price."""
    rows = frame[frame.part == TEST]
    rows = rows.loc[~rows.body.map(normalised).duplicated()]
    results = reviews.opinions_of_reviews(rows.body.tolist(), classify)
    by_aspect: dict[str, dict] = {}
    for label, opinions in zip(rows.label.to_numpy(), results):
        for opinion in opinions.aspects:
            entry = by_aspect.setdefault(opinion.aspect, {"reviews": 0, reviews.PRAISED: 0, reviews.CRITICISED: 0,
                                                          reviews.MENTIONED: 0, "agree": 0})
            entry["reviews"] += 1
            entry[opinion.polarity] += 1
            entry["agree"] += int(opinion.polarity == (reviews.PRAISED if label else reviews.CRITICISED))
    report = {}
    for aspect, e in sorted(by_aspect.items(), key=lambda kv: -kv[1]["reviews"]):
        clear = e[reviews.PRAISED] + e[reviews.CRITICISED]
        report[aspect] = {"share_of_reviews": round(e["reviews"] / len(rows), 4), "reviews": e["reviews"],
                          "praised": e[reviews.PRAISED], "criticised": e[reviews.CRITICISED],
                          "mentioned": e[reviews.MENTIONED],
                          "agreement_with_stars": round(e["agree"] / clear, 4) if clear else None}
    return {"reviews": len(rows), "with_an_aspect": round(float(np.mean([bool(r.aspects) for r in results])), 4),
            "aspects": report}


def classifiers_of(version_dir: Path | None, threads: int, precisions: tuple[str, ...] = ("fp32", "int8")) -> dict:
    found = {}
    if version_dir is not None:
        for precision in precisions:
            found[f"fine-tuned {precision}"] = rc.OnnxReviewClassifier(version_dir, precision, threads)
    found["lexicon"] = reviews.lexicon_classify
    return found


def split_summary(frame: pd.DataFrame) -> dict:
    counts = frame.groupby(["corpus", "part"]).size().unstack(fill_value=0)
    return {"salt": SPLIT_SALT, "held_out_fraction": HELD_OUT_FRACTION, "valid_fraction": VALID_FRACTION,
            "reviews": {corpus: {part: int(n) for part, n in row.items()} for corpus, row in counts.iterrows()}}


def print_results(results: dict) -> None:
    print(f"{'corpus':<14} {'text':<11} {'classifier':<16} {'accuracy':>8} {'pos rec':>8} {'neg rec':>8}  per domain")
    for corpus, variants in results.items():
        for variant, by_name in variants.items():
            for name, r in by_name.items():
                domains = " ".join(f"{d.split('_')[0]}={a:.3f}" for d, a in r.get("domains", {}).items())
                print(f"{corpus:<14} {variant:<11} {name:<16} {r['accuracy']:8.4f} "
                      f"{r['positive_recall']:8.4f} {r['negative_recall']:8.4f}  {domains}")


def plot_results(results: dict, path: Path) -> None:
    """Held-out accuracy per domain (and All_Beauty), each classifier a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for corpus, variants in results.items():
        for name, report in variants["title+body"].items():
            per = report.get("domains") or {BEAUTY_DOMAIN: report["accuracy"]}
            if corpus == MULTI_DOMAIN:
                per = {**per, "multi-domain (all)": report["accuracy"]}
            for domain, accuracy in per.items():
                groups.setdefault(domain, {})[name] = accuracy
    names = list(next(iter(results.values()))["title+body"])
    domains = list(groups)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, name in enumerate(names):
        values = [groups[d].get(name, np.nan) for d in domains]
        bars = ax.bar(np.arange(len(domains)) + i * width, values, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(0.9, color="grey", linestyle="--", linewidth=0.8, label="target 0.90 (multi-domain)")
    ax.set_xticks(np.arange(len(domains)) + width * (len(names) - 1) / 2)
    ax.set_xticklabels([d.replace("_&_", " & ").replace("_", " ") for d in domains], fontsize=8)
    ax.set_ylim(0.5, 1.0)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Review sentiment on the held-out split: fine-tuned MiniLM vs lexicon")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- commands -----------------------------------------------------------------------

def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=paths.reviews_data_dir(),
                        help="the reviews folder (default: ../shared/data/reviews)")
    parser.add_argument("--repo", type=Path, default=paths.MODEL_REPO, help="Triton model repository")
    parser.add_argument("--threads", type=int, help="torch / onnxruntime threads (default: 1; --quick: every core)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--plot", type=Path, help="also draw accuracy per domain as a PNG here")


def report(results: dict, args, extra: dict) -> None:
    print_results(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**extra, "results": results}, indent=2))
    if args.plot:
        plot_results(results, args.plot)


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recsys train-reviews", description=(
        "Fine-tune MiniLM for review sentiment on the training part of the review corpora, export it "
        "(ONNX fp32 + int8) to model_repo/review_sentiment/<version>/ and report held-out accuracy "
        "beside the lexicon baseline."))
    add_common_arguments(parser)
    parser.add_argument("--quick", action="store_true",
                        help="the setup/CI recipe: 80 steps on 1,280 reviews cut to 128 tokens, every core")
    parser.add_argument("--out", type=Path, help="checkpoints (default: var/reviews/full or var/reviews/quick); "
                        "a run resumes from its checkpoint")
    parser.add_argument("--version", type=int, default=1, help="model version folder to export into")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--head-tokens", type=int)
    parser.add_argument("--max-minutes", type=float)
    parser.add_argument("--multi-domain-only", action="store_true", help="do not train on All_Beauty")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    config = QUICK if args.quick else FULL
    if args.threads:
        config = replace(config, threads=args.threads)
    for name in ("epochs", "learning_rate", "max_tokens", "head_tokens", "max_minutes"):
        if getattr(args, name) is not None:
            config = replace(config, **{name: getattr(args, name)})
    if args.multi_domain_only:
        config = replace(config, corpora=(MULTI_DOMAIN,))
    out = args.out or paths.REPO_ROOT / "var" / "reviews" / ("quick" if args.quick else "full")
    started = time.monotonic()
    try:
        frame = load_reviews(args.data)
    except FileNotFoundError as error:
        print(f"recsys train-reviews: {error}", file=sys.stderr)
        return 2
    model, result = train(frame, config, out)
    version_dir = args.repo / rc.MODEL_NAME / str(args.version)
    info = {"training": {"config": asdict(config), **{k: v for k, v in asdict(result).items() if k != "losses"},
                         "first_losses": result.losses[:20], "last_losses": result.losses[-20:]},
            "split": split_summary(frame)}
    export_classifier(model, config, version_dir, info)
    export.copy_backend_code(args.repo / rc.MODEL_NAME, version_dir)
    # The quick recipe measures what Triton serves (int8) and the lexicon only.
    precisions = ("int8",) if args.quick else ("fp32", "int8")
    results = evaluate(frame, classifiers_of(version_dir, config.threads, precisions), body_only=not args.quick)
    extra = {"command": "recsys train-reviews " + " ".join(argv if argv is not None else sys.argv[1:]),
             "version_dir": str(version_dir), "wall_seconds": round(time.monotonic() - started, 1),
             **info}
    (out / RESULTS_FILE).write_text(json.dumps({**extra, "results": results}, indent=2))
    report(results, args, extra)
    print(f"exported to {version_dir} in {extra['wall_seconds']:.0f} s")
    return 0


def evaluate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recsys evaluate-reviews", description=(
        "Held-out accuracy of the exported review classifier (fp32 and int8) and of the lexicon baseline "
        "on the multi-domain set (per domain) and All_Beauty."))
    add_common_arguments(parser)
    parser.add_argument("--version", type=int, help="model version (default: the latest exported)")
    parser.add_argument("--lexicon-only", action="store_true")
    parser.add_argument("--body-only", action="store_true", help="also evaluate on review bodies without titles")
    parser.add_argument("--aspects", action="store_true",
                        help="also report aspect mentions and their polarity on the held-out reviews")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    version_dir = None
    try:
        if not args.lexicon_only:
            version_dir = (args.repo / rc.MODEL_NAME / str(args.version) if args.version
                           else rc.latest_version_dir(args.repo))
            if not (version_dir / rc.METADATA_FILE).is_file():
                raise FileNotFoundError(f"{version_dir} holds no exported review classifier")
        frame = load_reviews(args.data)
    except FileNotFoundError as error:
        print(f"recsys evaluate-reviews: {error}", file=sys.stderr)
        return 2
    results = evaluate(frame, classifiers_of(version_dir, args.threads or 1), body_only=args.body_only)
    extra = {"command": "recsys evaluate-reviews " + " ".join(argv if argv is not None else sys.argv[1:]),
             "version_dir": str(version_dir), "split": split_summary(frame)}
    if version_dir is not None:
        extra["training"] = rc.metadata(version_dir).get("training")
    if args.aspects:
        # Clauses are short: the served precision reads them fast.
        classifiers = classifiers_of(version_dir, args.threads or 1, ("int8",))
        for name, classify in classifiers.items():
            extra.setdefault("aspects", {})[name] = aspect_report(frame, classify)
            print_aspects(name, extra["aspects"][name])
    report(results, args, extra)
    return 0


def print_aspects(name: str, report: dict) -> None:
    print(f"\naspects by {name}: {report['with_an_aspect']:.0%} of {report['reviews']} held-out reviews name one")
    print(f"{'aspect':<20} {'reviews':>8} {'praised':>8} {'critic.':>8} {'mention':>8} {'agree':>7}")
    for aspect, a in report["aspects"].items():
        agree = "-" if a["agreement_with_stars"] is None else f"{a['agreement_with_stars']:.2f}"
        print(f"{aspect:<20} {a['reviews']:>8} {a['praised']:>8} {a['criticised']:>8} {a['mentioned']:>8} {agree:>7}")


def fit_lexicon(frame: pd.DataFrame) -> dict:
    """reviews.LEXICON_SLOPE and LEXICON_LENGTH_BIAS: logistic regression of the
    label on the lexicon score and sqrt(word count), no intercept, fitted on
    the multi-domain TRAIN part (balanced)."""
    from sklearn.linear_model import LogisticRegression

    rows = training_examples(frame, TRAIN, (MULTI_DOMAIN,))
    features = np.array([[reviews.lexicon_score(t), math.sqrt(reviews.word_count(t))] for t in rows.text])
    fit = LogisticRegression(fit_intercept=False).fit(features, rows.label.to_numpy())
    return {"slope": round(float(fit.coef_[0, 0]), 3), "length_bias": round(float(fit.coef_[0, 1]), 3),
            "train_accuracy": round(float(fit.score(features, rows.label.to_numpy())), 4), "reviews": len(rows)}


if __name__ == "__main__":
    if sys.argv[1:2] != ["fit-lexicon"]:
        sys.exit("usage: python -m training.reviews fit-lexicon [--data DIR]")
    fit_parser = argparse.ArgumentParser(prog="python -m training.reviews fit-lexicon")
    fit_parser.add_argument("--data", type=Path, default=paths.reviews_data_dir())
    print(json.dumps(fit_lexicon(load_reviews(fit_parser.parse_args(sys.argv[2:]).data))))
