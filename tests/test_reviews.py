"""Preferences from review text: aspects, clauses, the lexicon baseline and
opinions on real review sentences; the held-out split; a tiny fine-tuning
run and its export; the exported classifier served by a real Triton."""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest

from recsys_core import errors
from recsys_core.data import paths
from recsys_core.models import review_classifier as rc
from recsys_core.signals import reviews

# Real reviews from the corpora (training part), as their writers wrote them.
SHAMPOO_COMPLAINT = (
    "No change my scalp still itches like crazy. It doesnt lather at all so its very hard to move around "
    "the hair and scalp. It does smell good and my hair feels clean."
)
SOAP_PRAISE = (
    "Excellent Product. Long lasting, high quality soap, wide spectrum of scents... Leaves skin incredibly "
    "soft and fragrant. Pricey, but worth every penny"
)
MOVIE_PAN = (
    "Unbelieble bluff. I read some good reviews about this movie. In adition, I respect french's cinema, they "
    "usually gives us interested and unconventional movies. So, I bought \"Spanish Apartment\". A big "
    "dissapointment. Hughe one.  It's candid, it's \"naive\", it's boring, with poor ideas, poor acting, very "
    "predictable. There's a lot of good movies around you, don't waste your time in this one"
)
PHONE_PRAISE = (
    "Nice Phone. I was looking for a basic cordless phone with out an answering machine and this one is great. "
    "It has good reception and I like the size of it. This phone is just what I was looking for."
)
PITCHER_PAN = (
    "Keep away from it. I had one a few months ago.  When I filled in water, the water just passed the filter "
    "quickly. I was not sure if the water is filtered.  One day, I wanted to clean it.  I put it in hot water "
    "for about 10 minutes.  The pitcher was out of shape and I had to discard it.  I believe the pitcher was "
    "made from cheap materials."
)


# -- aspects, sentences and clauses -------------------------------------------------------

@pytest.mark.parametrize("sentence, expected", [
    ("Works great when flat ironing my hair and it smells great!", ["effectiveness", "skin/hair effect", "scent"]),
    ("These lather up nicely.", ["texture/feel"]),
    ("I believe the pitcher was made from cheap materials.", ["quality/durability"]),
    ("Fabulous and cheaper than down in Disney World", ["price/value"]),
    ("It has good reception and I like the size of it.", ["size/fit"]),
    ("The acting is wooden, the script is very lame, and worst of all, the action isn't very exciting.",
     ["acting/cast", "story/content"]),
    ("I have had it for about 3 months now and the battery is great.", ["battery/power"]),
    ("I'm certain that my hubby will enjoy this product due to the size,smell and the fact that many can use "
     "this Olive oil & Lavender bar.", ["size/fit", "scent"]),
    ("A big dissapointment.", []),
])
def test_aspects_in_real_sentences(sentence, expected):
    assert reviews.aspects_in(sentence) == expected


def test_every_aspect_term_belongs_to_one_aspect():
    terms = [t for ts in reviews.ASPECTS.values() for t in ts]
    assert len(terms) == len(set(terms))
    assert all(t == t.lower().strip() and t for t in terms)
    # Words in a phrase do not hide the phrase: "cheaply made" is quality, "cheap" price.
    assert reviews.aspects_in("so cheaply made") == ["quality/durability"]
    assert reviews.aspects_in("so cheap") == ["price/value"]


def test_sentences_and_clauses_of_a_real_review():
    assert reviews.sentences(SOAP_PRAISE) == [
        "Excellent Product.",
        "Long lasting, high quality soap, wide spectrum of scents...",
        "Leaves skin incredibly soft and fragrant.",
        "Pricey, but worth every penny",
    ]
    assert reviews.clauses("It does smell good but it dries my hair; the bottle leaks.") == [
        "It does smell good", "but it dries my hair", "the bottle leaks.",
    ]
    assert reviews.sentences("Mr. Smith wrote it. i loved it") == ["Mr. Smith wrote it.", "i loved it"]
    assert reviews.sentences("") == []


def test_review_text_puts_the_title_first_as_a_sentence():
    assert reviews.review_text("Nice Phone", "It works.") == "Nice Phone. It works."
    assert reviews.review_text("Wow!", "It works.") == "Wow! It works."
    assert reviews.review_text("", "It works.") == "It works."
    assert reviews.review_text("Only a title", None) == "Only a title"


# -- the lexicon baseline ---------------------------------------------------------------

def test_lexicon_negation_contrast_and_phrases():
    score = reviews.lexicon_score
    assert score("good") > 0 > score("not good")
    assert score("not useful") > score("useless"), "a negated opinion is weaker than its opposite"
    assert score("It looks nice but it broke after a week") < 0, "what follows 'but' weighs more"
    assert score("Waste of money") < score("money") == 0
    assert score("no problems at all, works great") > 0
    assert score("very good") > score("good")
    assert score("This is not a great product") < 0


def test_lexicon_orders_real_reviews():
    p = reviews.lexicon_classify([SOAP_PRAISE, PHONE_PRAISE, MOVIE_PAN, PITCHER_PAN])
    assert p.dtype == np.float32 and p.shape == (4,)
    assert min(p[:2]) > 0.5 > max(p[2:])


# -- opinions ---------------------------------------------------------------------------

def test_opinions_with_the_lexicon_on_a_real_review():
    result = reviews.opinions(SHAMPOO_COMPLAINT, reviews.lexicon_classify)
    assert not result.positive
    assert result.polarity_of("texture/feel") == reviews.CRITICISED
    # One opinion word is too little for the lexicon to call a clause clear praise.
    assert result.polarity_of("scent") == reviews.MENTIONED
    assert result.polarity_of("skin/hair effect") is not None
    assert result.polarity_of("price/value") is None
    criticised = {a.aspect: a for a in result.aspects}["texture/feel"]
    assert "lather" in criticised.evidence


def test_opinions_ask_the_classifier_once_for_every_review_and_clause():
    calls = []

    def lexicon_counting_calls(texts):
        calls.append(list(texts))
        return reviews.lexicon_classify(texts)

    results = reviews.opinions_of_reviews([SOAP_PRAISE, MOVIE_PAN, "ok"], lexicon_counting_calls)
    assert len(calls) == 1
    assert calls[0][:3] == [SOAP_PRAISE, MOVIE_PAN, "ok"]
    assert [r.positive for r in results[:2]] == [True, False]
    assert results[2].aspects == ()
    assert results[1].polarity_of("acting/cast") == reviews.CRITICISED


def test_preferences_add_up_a_shoppers_reviews():
    reviewed = [
        ("B001", reviews.opinions(SOAP_PRAISE, reviews.lexicon_classify)),
        ("B002", reviews.opinions(SHAMPOO_COMPLAINT, reviews.lexicon_classify)),
        ("B003", reviews.opinions(PITCHER_PAN, reviews.lexicon_classify)),
    ]
    summary = reviews.preferences(reviewed)
    assert (summary.reviews, summary.positive, summary.negative) == (3, 1, 2)
    assert summary.disliked_item_ids == ("B002", "B003")
    by_aspect = {a.aspect: a for a in summary.aspects}
    assert by_aspect["skin/hair effect"].total == 2, "soap (skin) and shampoo (scalp, hair)"
    quality = by_aspect["quality/durability"]
    assert (quality.total, quality.criticised) == (2, 1), "soap (high quality) and pitcher (cheap materials)"
    totals = [a.total for a in summary.aspects]
    assert totals == sorted(totals, reverse=True), "most written-about aspect first"
    assert reviews.preferences([]).reviews == 0


def test_opinions_reject_bad_input():
    with pytest.raises(TypeError, match="review_texts\\[0\\]: expected str"):
        reviews.opinions(None, reviews.lexicon_classify)
    with pytest.raises(ValueError, match="over 20000 characters"):
        reviews.opinions("great " * 5000, reviews.lexicon_classify)
    with pytest.raises(ValueError, match="returned 1 probabilities for 2 texts"):
        reviews.opinions("It smells great.", lambda texts: np.array([0.9]))


# -- tokenisation: head and tail --------------------------------------------------------

def test_long_reviews_keep_their_head_and_tail(exported_encoder):
    tokenizer = rc.ReviewTokenizer(exported_encoder, max_tokens=16, head_tokens=4)
    long_review = "alpha beta gamma delta " + "filler " * 40 + "omega final words here"
    ids, mask = tokenizer([long_review, "short one"])
    assert ids.shape == (2, 16) and mask[0].sum() == 16 and mask[1].sum() == 4
    full = rc.enc.load_tokenizer(exported_encoder, max_tokens=None).encode(long_review).ids
    assert ids[0].tolist() == full[:5] + full[-11:], "[CLS] + 4 head tokens, then the last 11 up to [SEP]"
    short = rc.enc.load_tokenizer(exported_encoder, max_tokens=None).encode("short one").ids
    assert ids[1, :4].tolist() == short and ids[1, 4:].tolist() == [0] * 12
    with pytest.raises(ValueError, match="head_tokens"):
        rc.keep_head_and_tail(ids, mask, 16, 15)


# -- the split and a tiny training run ---------------------------------------------------

@pytest.fixture(scope="module")
def review_frame():
    from training import reviews as offline

    data_dir = paths.reviews_data_dir()
    if not (data_dir / offline.MULTI_DOMAIN_FILE).is_file():
        message = f"the review corpora are not at {data_dir}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return offline.load_reviews(data_dir)


def test_split_is_stratified_deterministic_and_keeps_copies_together(review_frame):
    from training import reviews as offline

    frame = review_frame
    md = frame[frame.corpus == offline.MULTI_DOMAIN]
    assert len(md) == 8000
    shares = md.groupby(["domain", "label"]).part.value_counts(normalize=True).unstack()
    assert shares[offline.TEST].between(0.19, 0.21).all()
    assert shares[offline.VALID].between(0.09, 0.11).all()
    beauty = frame[frame.corpus == offline.BEAUTY]
    assert set(beauty.rating) == {1, 2, 4, 5}, "3 stars dropped"
    assert not beauty.title.str.fullmatch(offline.GENERATED_TITLE).any(), "no rating-generated titles"
    # Copies of a body are all on one side.
    bodies = frame.body.map(offline.normalised)
    assert (frame.groupby(bodies).part.nunique() == 1).all()
    # Row order does not matter.
    shuffled = md.sample(frac=1.0, random_state=7)
    assert (offline.split_reviews(shuffled).sort_index() == md.part.sort_index()).all()


def test_tiny_fine_tuning_lowers_the_loss_and_exports_what_it_learned(review_frame, tmp_path):
    """CI's training smoke run: six steps on 32 reviews; the ONNX export
    gives the torch model's probabilities."""
    from training import reviews as offline

    config = replace(offline.QUICK, train_limit=32, epochs=3, max_tokens=48, head_tokens=16, learning_rate=1e-4,
                     evaluations_per_epoch=1, patience=10, threads=1)
    model, result = offline.train(review_frame, config, tmp_path / "run")
    steps_per_epoch = result.steps // config.epochs
    assert result.steps == 3 * steps_per_epoch == 6 and result.stopped == "3 epochs"
    first, last = np.mean(result.losses[:steps_per_epoch]), np.mean(result.losses[-steps_per_epoch:])
    assert last < first - 0.05, f"loss {first:.3f} -> {last:.3f}"
    assert (tmp_path / "run" / offline.CHECKPOINT_FILE).is_file()

    version_dir = offline.export_classifier(model, config, tmp_path / "repo" / rc.MODEL_NAME / "1", {})
    texts = [SOAP_PRAISE, MOVIE_PAN, "ok", PITCHER_PAN * 3]
    tokenizer = rc.ReviewTokenizer(version_dir, config.max_tokens, config.head_tokens)
    expected = offline.predict(model, tokenizer, texts)
    fp32 = rc.OnnxReviewClassifier(version_dir, "fp32")
    np.testing.assert_allclose(fp32(texts), expected, atol=1e-4)
    assert np.abs(rc.OnnxReviewClassifier(version_dir, "int8")(texts) - expected).max() < 0.1
    assert rc.latest_version_dir(tmp_path / "repo") == version_dir


# -- the exported classifier on a real Triton --------------------------------------------

@pytest.fixture(scope="module")
def served(exported_review_classifier, triton_server):
    with rc.TritonReviewClassifier(triton_server.grpc_url) as classifier:
        yield classifier


@pytest.mark.integration
def test_served_model_scores_positive_reviews_above_negative_ones(served, exported_review_classifier):
    assert served.version == exported_review_classifier.name
    assert served.fingerprint == f"triton:{rc.MODEL_NAME}:{served.version}"
    p = served.classify([SOAP_PRAISE, PHONE_PRAISE, MOVIE_PAN, PITCHER_PAN])
    assert p.dtype == np.float32 and p.shape == (4,)
    assert min(p[:2]) > 0.5 > max(p[2:])
    # The same weights in process (the config serves int8) give the same numbers.
    local = rc.OnnxReviewClassifier(exported_review_classifier, precision=served.precision)
    np.testing.assert_allclose(p, local([SOAP_PRAISE, PHONE_PRAISE, MOVIE_PAN, PITCHER_PAN]), atol=0.02)


@pytest.mark.integration
def test_served_batches_beyond_max_batch_size_come_back_in_order(served, exported_review_classifier):
    texts = [SOAP_PRAISE, MOVIE_PAN] * (served.max_batch_size + 5) + ["great", "awful"]
    p = served(texts)
    assert p.shape == (len(texts),)
    assert (p[0:-2:2] > 0.5).all() and (p[1:-2:2] < 0.5).all()
    assert p[-2] > p[-1]
    assert served([]).shape == (0,)


@pytest.mark.integration
def test_opinions_through_triton(served):
    result = reviews.opinions(
        "Smells wonderful, I love the scent. But the pump broke after two days and it leaks everywhere.", served)
    assert result.polarity_of("scent") == reviews.PRAISED
    assert result.polarity_of("packaging") == reviews.CRITICISED
    assert result.polarity_of("quality/durability") == reviews.CRITICISED


@pytest.mark.integration
def test_served_model_rejects_bad_input(served, triton_server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with pytest.raises(TypeError, match="single string"):
        served.classify("one review")
    with pytest.raises(TypeError, match="texts\\[1\\]: expected str"):
        served.classify(["fine", 3])
    with pytest.raises(errors.DeadlineExceeded):
        served.classify([PITCHER_PAN] * 100, timeout=1e-4)
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
        not_utf8 = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
        not_utf8.set_data_from_numpy(np.array([[b"\xff\xfe broken"]], dtype=np.object_))
        with pytest.raises(InferenceServerException, match="cannot decode as UTF-8"):
            client.infer(rc.MODEL_NAME, [not_utf8])
        numbers = grpcclient.InferInput("TEXT", [1, 1], "FP32")
        numbers.set_data_from_numpy(np.array([[1.0]], dtype=np.float32))
        with pytest.raises(InferenceServerException, match="(?i)data-type|datatype|expected"):
            client.infer(rc.MODEL_NAME, [numbers])
        with pytest.raises(InferenceServerException):
            client.infer(rc.MODEL_NAME, [not_utf8], model_version="99")
