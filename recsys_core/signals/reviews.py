"""Preferences from review text: a review's overall sentiment and the aspects
it praises or criticises.

`opinions(review_text, classify)` splits a review into clauses, finds the
aspects each clause talks about (ASPECTS: a term list per aspect), and asks
`classify` for P(positive) of the whole review and of each clause that names
an aspect. `classify(list[str]) -> np.ndarray` is any classifier: the
fine-tuned MiniLM served by Triton (recsys_core.models.review_classifier), or the
lexicon baseline `lexicon_classify` in this module. A shopper's reviews add
up with `preferences`.

gRPC-free and torch-free: the profile service and offline evaluation share it.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

Classify = Callable[[list[str]], np.ndarray]

# A clause must lean this far from 0.5 to count as praise or criticism; in
# between it only mentions the aspect ("I bought it for the scent").
PRAISE_THRESHOLD = 0.65
CRITICISM_THRESHOLD = 0.35
POSITIVE_THRESHOLD = 0.5
MAX_REVIEW_CHARS = 20_000


def review_text(title: str | None, body: str | None) -> str:
    """One text of a review's title and body, as the classifier reads it: the
    title first, as a sentence of its own."""
    title = (title or "").strip()
    body = (body or "").strip()
    if not title:
        return body
    if not body:
        return title
    return f"{title}{'' if title[-1] in '.!?' else '.'} {body}"


# -- aspects --------------------------------------------------------------------------

# What shoppers praise or criticise, across beauty, books, DVDs, electronics
# and kitchen goods. Terms are lower-case words or phrases matched on word
# boundaries; a phrase wins over the words inside it ("cheaply made" is quality,
# "cheap" alone is price). A term belongs to one aspect only.
ASPECTS: dict[str, tuple[str, ...]] = {
    "scent": (
        "scent", "scents", "scented", "unscented", "smell", "smells", "smelled", "smelling", "smelly",
        "fragrance", "fragrances", "fragrant", "odor", "odour", "odors", "aroma", "perfume", "perfumes",
        "perfumy", "stink", "stinks", "stinky",
    ),
    "size/fit": (
        "size", "sizes", "sized", "sizing", "fit", "fits", "fitting", "too small", "too big", "too large",
        "too tight", "too loose", "tiny", "huge", "bulky", "compact", "dimensions", "length", "width",
        "oversized", "travel size", "full size",
    ),
    "price/value": (
        "price", "priced", "pricey", "pricing", "cost", "costs", "costly", "expensive", "inexpensive",
        "cheap", "cheaper", "cheapest", "value", "bargain", "deal", "money", "worth", "overpriced",
        "affordable", "bucks", "dollars", "waste of money", "for the money", "price point",
    ),
    "quality/durability": (
        "quality", "durable", "durability", "sturdy", "flimsy", "broke", "broken", "breaks", "break",
        "cracked", "cracks", "fell apart", "falls apart", "well made", "well-made", "poorly made",
        "cheaply made", "made cheaply", "cheaply", "cheap plastic", "cheap material", "cheap materials",
        "construction", "build quality", "defective", "lasted", "lasts",
        "long lasting", "long-lasting", "wear out", "wore out", "stopped working", "quit working",
        "died", "dies", "reliable", "reliability", "rust", "rusted", "leaks", "leaked", "leaking",
    ),
    "packaging": (
        "packaging", "package", "packaged", "box", "boxes", "bottle", "bottles", "container", "jar",
        "tube", "pump", "dispenser", "cap", "lid", "seal", "sealed", "wrapper", "wrapping",
    ),
    "shipping/delivery": (
        "shipping", "shipped", "ship", "delivery", "delivered", "arrived", "arrival", "arrives",
        "seller", "vendor", "came quickly", "on time", "in the mail", "backordered",
    ),
    "texture/feel": (
        "texture", "greasy", "sticky", "smooth", "smoothly", "creamy", "oily", "thick", "thin", "runny",
        "lather", "lathers", "silky", "gritty", "grainy", "absorbs", "absorbed", "residue", "soft",
        "softer", "rough", "lightweight", "heavy", "consistency",
    ),
    "ease of use": (
        "easy to use", "easy", "easier", "easily", "difficult", "hard to use", "user friendly",
        "user-friendly", "intuitive", "instructions", "setup", "set up", "install", "installation",
        "assemble", "assembly", "controls", "buttons", "convenient", "inconvenient", "complicated",
        "simple to use", "manual",
    ),
    "effectiveness": (
        "works", "worked", "working", "effective", "ineffective", "results", "result", "performance",
        "performs", "does the job", "did the job", "did nothing", "does nothing", "no difference",
        "made a difference", "difference", "helped", "helps", "improved",
    ),
    "skin/hair effect": (
        "skin", "hair", "scalp", "moisturizing", "moisturising", "moisturizes", "hydrating", "dry",
        "dries", "drying", "irritation", "irritated", "irritating", "itchy", "itching", "itches",
        "rash", "breakout", "breakouts", "broke out", "acne", "dandruff", "frizz", "frizzy", "shine",
        "shiny", "sensitive skin", "burning", "burned", "allergic",
    ),
    "appearance/design": (
        "look", "looks", "looked", "color", "colors", "colour", "colours", "design", "designed",
        "style", "stylish", "pretty", "beautiful", "ugly", "attractive", "finish", "shade", "shades",
        "elegant", "gorgeous",
    ),
    "sound": (
        "sound", "sounds", "audio", "volume", "speaker", "speakers", "bass", "noise", "noisy",
        "quiet", "loud", "static", "headphones", "earbuds",
    ),
    "battery/power": (
        "battery", "batteries", "battery life", "charge", "charging", "charger", "recharge",
        "rechargeable", "power", "powered", "cord",
    ),
    "picture/screen": (
        "picture", "pictures", "image", "images", "video", "screen", "display", "resolution",
        "widescreen", "transfer", "remastered",
    ),
    "cleaning": (
        "clean", "cleans", "cleaned", "cleaning", "cleanup", "clean up", "dishwasher", "wash",
        "washing", "stain", "stains", "stained", "scrub", "nonstick", "non-stick",
    ),
    "story/content": (
        "story", "stories", "plot", "characters", "character", "ending", "writing", "written",
        "author", "narrative", "storyline", "chapters", "chapter", "dialogue", "script", "pages",
        "boring", "predictable", "page turner", "page-turner", "read", "reading",
    ),
    "acting/cast": (
        "acting", "actor", "actors", "actress", "cast", "performances", "director", "directed",
        "directing", "role", "roles",
    ),
    "customer service": (
        "customer service", "customer support", "support", "warranty", "refund", "refunded",
        "replacement", "returned", "return", "returning", "exchange", "sent it back",
    ),
}


def _term_pattern(terms: Iterable[str]) -> re.Pattern:
    # Longest first, so a phrase is taken before the words inside it.
    alternatives = sorted(set(terms), key=len, reverse=True)
    return re.compile(r"(?<![\w-])(" + "|".join(re.escape(t) for t in alternatives) + r")(?![\w-])")


def _aspect_of_term() -> dict[str, str]:
    owner: dict[str, str] = {}
    for aspect, terms in ASPECTS.items():
        for term in terms:
            if term in owner:
                raise ValueError(f"aspect term {term!r} is in both {owner[term]!r} and {aspect!r}")
            owner[term] = aspect
    return owner


ASPECT_OF_TERM = _aspect_of_term()
_ASPECT_PATTERN = _term_pattern(ASPECT_OF_TERM)


def aspects_in(text: str) -> list[str]:
    """The aspects `text` names, in order of first mention, each once."""
    found = (ASPECT_OF_TERM[m.group(1)] for m in _ASPECT_PATTERN.finditer(text.lower()))
    return list(dict.fromkeys(found))


# -- sentences and clauses -------------------------------------------------------------

# Reviewers often write in lower case, so any . ! ? before a space ends a
# sentence (abbreviations excepted), and so does a line break.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\s*[\r\n]+\s*")
_ABBREVIATION = re.compile(r"(?:\b(?:mr|mrs|ms|dr|st|vs|etc|e\.g|i\.e|approx|no|oz|lb|lbs|fl|inc|jr|sr)\.|\b[a-z]\.)$",
                           re.IGNORECASE)
# Contrast splits a sentence into clauses that often disagree ("smells great
# but dries my skin"): each clause gets its own sentiment.
_CONTRAST = re.compile(r"\s*(?:[,;:]\s*|\s)(?=\b(?:but|however|although|though|except|yet|whereas)\b)|\s*;\s*",
                       re.IGNORECASE)
MIN_CLAUSE_CHARS = 3


def sentences(text: str) -> list[str]:
    """`text` split into sentences: after . ! ? and at line breaks, not
    after common abbreviations."""
    pieces: list[str] = []
    carry = ""
    for piece in _SENTENCE_END.split(text.strip()):
        piece = (carry + " " + piece).strip() if carry else piece.strip()
        carry = ""
        if _ABBREVIATION.search(piece):
            carry = piece
            continue
        if piece:
            pieces.append(piece)
    if carry:
        pieces.append(carry)
    return pieces


def clauses(text: str) -> list[str]:
    """Sentences, each further split before contrastive conjunctions (but,
    however, although, ...) and at semicolons."""
    out = []
    for sentence in sentences(text):
        out.extend(c.strip() for c in _CONTRAST.split(sentence) if len(c.strip()) >= MIN_CLAUSE_CHARS)
    return out


# -- opinions ---------------------------------------------------------------------------

PRAISED, CRITICISED, MENTIONED = "praised", "criticised", "mentioned"


@dataclass(frozen=True)
class AspectOpinion:
    aspect: str
    # PRAISED, CRITICISED or MENTIONED (neither clearly).
    polarity: str
    # P(positive) of the clauses naming the aspect, averaged.
    positive_probability: float
    # The clause that says it most clearly.
    evidence: str


@dataclass(frozen=True)
class ReviewOpinions:
    positive_probability: float
    aspects: tuple[AspectOpinion, ...]

    @property
    def positive(self) -> bool:
        return self.positive_probability >= POSITIVE_THRESHOLD

    def polarity_of(self, aspect: str) -> str | None:
        return next((a.polarity for a in self.aspects if a.aspect == aspect), None)


def _polarity(probability: float) -> str:
    if probability >= PRAISE_THRESHOLD:
        return PRAISED
    if probability <= CRITICISM_THRESHOLD:
        return CRITICISED
    return MENTIONED


def check_review(text, field: str = "review_text") -> str:
    if not isinstance(text, str):
        raise TypeError(f"{field}: expected str, got {type(text).__name__}")
    if len(text) > MAX_REVIEW_CHARS:
        raise ValueError(f"{field}: is over {MAX_REVIEW_CHARS} characters ({len(text)})")
    return text


def opinions_of_reviews(texts: Sequence[str], classify: Classify) -> list[ReviewOpinions]:
    """`opinions` of many reviews with one call of `classify` (one round trip
    to a served model): every review, then every clause that names an aspect."""
    texts = [check_review(t, f"review_texts[{i}]") for i, t in enumerate(texts)]
    per_review: list[list[tuple[str, list[str]]]] = []
    queries: list[str] = list(texts)
    for text in texts:
        found = [(c, aspects_in(c)) for c in clauses(text)]
        found = [(c, a) for c, a in found if a]
        per_review.append(found)
        queries.extend(c for c, _ in found)
    if not queries:
        return []
    probabilities = np.asarray(classify(queries), dtype=np.float64).reshape(-1)
    if len(probabilities) != len(queries):
        raise ValueError(f"classify returned {len(probabilities)} probabilities for {len(queries)} texts")
    results = []
    cursor = len(texts)
    for review, found in enumerate(per_review):
        by_aspect: dict[str, list[tuple[float, str]]] = {}
        for clause, aspects in found:
            for aspect in aspects:
                by_aspect.setdefault(aspect, []).append((float(probabilities[cursor]), clause))
            cursor += 1
        aspect_opinions = []
        for aspect, said in by_aspect.items():
            probability = float(np.mean([p for p, _ in said]))
            evidence = max(said, key=lambda pc: abs(pc[0] - 0.5))[1]
            aspect_opinions.append(AspectOpinion(aspect, _polarity(probability), round(probability, 4), evidence))
        results.append(ReviewOpinions(round(float(probabilities[review]), 4), tuple(aspect_opinions)))
    return results


def opinions(review_text: str, classify: Classify) -> ReviewOpinions:
    """Overall sentiment of a review and, per aspect it names, whether it
    praises or criticises it."""
    (result,) = opinions_of_reviews([review_text], classify)
    return result


@dataclass(frozen=True)
class AspectCount:
    aspect: str
    praised: int
    criticised: int
    mentioned: int

    @property
    def total(self) -> int:
        return self.praised + self.criticised + self.mentioned


@dataclass(frozen=True)
class Preferences:
    """What a shopper's reviews say: how many were positive or negative, the
    aspects they care about (most written about first) and which items they
    reviewed negatively."""
    reviews: int
    positive: int
    negative: int
    aspects: tuple[AspectCount, ...]
    disliked_item_ids: tuple[str, ...]


def preferences(reviewed: Sequence[tuple[str, ReviewOpinions]]) -> Preferences:
    """Add up (item_id, opinions) of a shopper's reviews."""
    counts: dict[str, Counter] = {}
    for _, review in reviewed:
        for opinion in review.aspects:
            counts.setdefault(opinion.aspect, Counter())[opinion.polarity] += 1
    aspects = sorted(
        (AspectCount(a, c[PRAISED], c[CRITICISED], c[MENTIONED]) for a, c in counts.items()),
        key=lambda a: (-a.total, -(a.praised + a.criticised), a.aspect),
    )
    negative = [item for item, review in reviewed if not review.positive]
    return Preferences(
        reviews=len(reviewed),
        positive=sum(1 for _, r in reviewed if r.positive),
        negative=len(negative),
        aspects=tuple(aspects),
        disliked_item_ids=tuple(dict.fromkeys(negative)),
    )


# -- the lexicon baseline ----------------------------------------------------------------

# A small hand-written opinion lexicon for product reviews: general evaluative
# words plus what reviewers of these domains say (returned it, stopped
# working, page turner). 2 marks strong words. No lexicon is downloaded.
_STRONG_POSITIVE = """
love loved loves lovely excellent exceptional outstanding superb perfect perfectly amazing amazed awesome
fantastic wonderful terrific brilliant best favorite favourite masterpiece phenomenal flawless incredible
gorgeous stunning delightful superior magnificent must-have
"""
_POSITIVE = """
good great nice fine fun funny pleasant pleased pleasing happy glad satisfied satisfying enjoy enjoyed
enjoyable enjoying like liked likes recommend recommended worth worthwhile useful helpful handy easy
easily effective efficient works worked working solid sturdy durable reliable reliably quality comfortable
comfy beautiful beautifully pretty cute elegant stylish attractive impressive impressed clever smart
interesting fascinating engaging entertaining compelling captivating gripping insightful informative
thoughtful moving touching powerful inspiring inspirational charming classic hilarious witty fresh
fast quick quickly smooth smoothly soft silky clean cleans crisp clear clearly bright vibrant rich
delicious yummy tasty refreshing gentle lightweight convenient versatile affordable inexpensive bargain
value well-made well-written well-done heartwarming beloved pleasure pleasantly thrilled excited
exciting glowing healthy shiny softer smoother stronger better improved improvement improves accurate
precise sharp responsive quiet fabulous lasting long-lasting recommendable wow success successful
hooked adore adored adorable appreciate appreciated gift joy happier keeper top-notch bonus plus
superbly nicely correctly properly favorably generous unique original realistic believable
"""
_STRONG_NEGATIVE = """
awful terrible horrible horrid worst waste wasted garbage junk crap useless worthless pathetic disgusting
disappointing disappointed disappointment refund returned defective broken broke unusable unwatchable
unreadable dreadful atrocious abysmal trash lousy rubbish scam ripoff rip-off hate hated hates avoid
nightmare unacceptable poorly
"""
_NEGATIVE = """
bad poor poorer cheap cheaply flimsy fragile mediocre boring bored dull tedious slow weak annoying annoyed
frustrating frustrated frustration problem problems issue issues fail fails failed failure faulty
flawed flaw flaws mistake error errors wrong confusing confused difficult hard complicated unclear
uncomfortable painful hurt hurts itchy itch itching irritated irritation irritating rash burn burned
burning itches sticky greasy oily gritty smelly stinks stink stinky harsh dry dries drying damaged damage
leak leaks leaked leaking crack cracked cracks rust rusted rusty noisy loud overpriced expensive pricey
mess messy sloppy cheesy predictable shallow silly stupid ridiculous lame pointless meaningless bland
clumsy awkward ugly unfortunately unfortunate sadly lacking lacks lacked missing unhappy upset sorry
regret regretted return returning replace replaced replacement complaint complain complained warning
beware misleading misled overrated overdone dated drags dragged tired repetitive stale cliche cliched
shoddy inferior substandard inaccurate unreliable unstable wobbly rough scratched scratches dent dented
dies died dead quit stopped unfinished incomplete unbearable painfully fake weird strange odd excessive
irrelevant incoherent amateurish juvenile preachy sucks sucked trouble troubles hassle barely
"""
_PHRASES = {
    # Multi-word expressions: scored as a whole, before their words.
    "waste of money": -3, "waste of time": -3, "not worth": -2, "don't buy": -3, "do not buy": -3,
    "don't waste": -3, "do not waste": -3, "save your money": -3, "stay away": -3, "sent it back": -2,
    "sent back": -2, "stopped working": -2, "quit working": -2, "fell apart": -2, "falls apart": -2,
    "piece of junk": -3, "piece of crap": -3, "no longer works": -2, "doesn't work": -2, "does not work": -2,
    "didn't work": -2, "did not work": -2, "not recommend": -3, "wouldn't recommend": -3, "would not recommend": -3,
    "can't recommend": -3, "cannot recommend": -3, "one star": -2, "two stars": -1, "1 star": -2,
    "zero stars": -3, "0 stars": -3, "give it zero": -3, "want my money back": -3, "money back": -1,
    "not impressed": -2, "not happy": -2, "not good": -2, "not great": -1, "too bad": -1,
    "highly recommend": 3, "highly recommended": 3, "would recommend": 2, "definitely recommend": 3,
    "five stars": 2, "5 stars": 2, "4 stars": 1, "four stars": 1, "well worth": 2, "worth every penny": 3,
    "works great": 2, "works well": 2, "works perfectly": 3, "page turner": 2, "page-turner": 2,
    "couldn't put it down": 3, "could not put it down": 3, "can't put it down": 3, "must read": 2,
    "must have": 2, "no complaints": 2, "no problems": 2, "no problem": 1, "no issues": 2,
    "can't go wrong": 2, "cannot go wrong": 2, "can't beat": 2, "can not beat": 2, "second to none": 2,
    "thumbs up": 2, "thumbs down": -2, "buy again": 2, "buy another": 1, "will repurchase": 2,
    "not bad": 1, "not disappointed": 2, "never disappointed": 2, "not too bad": 1, "nothing special": -2,
    "nothing new": -1, "fell asleep": -2, "not funny": -2, "not work": -2, "no good": -2,
    "return it": -2, "returned it": -2, "returning it": -2, "broke after": -2,
}
_NEGATORS = frozenset("""
not no never neither nor without hardly barely nothing nobody none cannot cant dont doesnt didnt isnt
wasnt arent werent wont wouldnt couldnt shouldnt havent hasnt hadnt aint
""".split())
_INTENSIFIERS = frozenset("""
very really extremely so absolutely totally highly super incredibly truly completely utterly quite
especially exceptionally particularly
""".split())
_CONTRAST_WORDS = frozenset({"but", "however", "although", "though", "yet"})
NEGATION_SCOPE = 3


def _word_scores() -> dict[str, float]:
    scores: dict[str, float] = {}
    for words, score in ((_POSITIVE, 1.0), (_STRONG_POSITIVE, 2.0), (_NEGATIVE, -1.0), (_STRONG_NEGATIVE, -2.0)):
        for word in words.split():
            if word in scores:
                raise ValueError(f"lexicon word {word!r} listed twice")
            scores[word] = score
    return scores


WORD_SCORES = _word_scores()
_TOKEN = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*|[,:]")
_LEXICON_SENTENCE = re.compile(r"[.!?;]+|\n")
_PHRASE_PATTERN = _term_pattern(_PHRASES)
_PUNCTUATION = frozenset(",:")
# P(positive) = sigmoid(SLOPE * score + LENGTH_BIAS * sqrt(words)). Reviews
# use positive words even when they are negative ("I wanted to love this"),
# the more so the longer they are, so a score of 0 leans negative in a long
# review and stays neutral in a short clause. Fitted (logistic regression on
# score and sqrt(words), no intercept) on the multi-domain training part, never
# the held-out part: `python -m training.reviews fit-lexicon`
# (0.82 accuracy there, as with a constant bias).
LEXICON_SLOPE = 0.44
LEXICON_LENGTH_BIAS = -0.088


def lexicon_score(text: str) -> float:
    """Sum of the lexicon's phrase and word scores, with negation (a negator
    flips the next three words, up to punctuation), intensifiers (x1.5) and
    contrast (in a sentence with "but", what follows counts 1.5 times and
    what precedes it half)."""
    lowered = text.lower().replace("’", "'")
    total = float(sum(_PHRASES[m.group(1)] for m in _PHRASE_PATTERN.finditer(lowered)))
    # Phrases become a comma, so their words are not counted again and no
    # negation reaches across them.
    lowered = _PHRASE_PATTERN.sub(" , ", lowered)
    for sentence in _LEXICON_SENTENCE.split(lowered):
        parts: list[list[float]] = [[]]
        negated_for, boost = 0, 1.0
        for token in _TOKEN.findall(sentence):
            token = token.replace("'", "")
            if token in _PUNCTUATION:
                negated_for, boost = 0, 1.0
            elif token in _CONTRAST_WORDS:
                parts.append([])
                negated_for, boost = 0, 1.0
            elif token in _NEGATORS:
                negated_for = NEGATION_SCOPE
            elif token in _INTENSIFIERS:
                boost = 1.5
            else:
                score = WORD_SCORES.get(token)
                if score is not None:
                    score *= boost
                    # A negated opinion is weaker than its opposite: "not
                    # great" is not "terrible".
                    parts[-1].append(-0.7 * score if negated_for else score)
                    boost = 1.0
                negated_for = max(negated_for - 1, 0)
        if len(parts) == 1:
            total += sum(parts[0])
        else:
            total += 0.5 * sum(sum(p) for p in parts[:-1]) + 1.5 * sum(parts[-1])
    return total


def lexicon_classify(texts: list[str]) -> np.ndarray:
    """The lexicon baseline as a classifier: P(positive) per text."""
    scores = np.array([lexicon_score(t) for t in texts], dtype=np.float64)
    lengths = np.array([word_count(t) for t in texts], dtype=np.float64)
    logits = LEXICON_SLOPE * scores + LEXICON_LENGTH_BIAS * np.sqrt(lengths)
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


def word_count(text: str) -> int:
    return len(_WORD.findall(text))


_WORD = re.compile(r"\w+")
