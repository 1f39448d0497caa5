"""Churn and lifetime value: features, cleaning, BG/NBD + Gamma-Gamma, a small
real training run on the bundled Online Retail subset, and the served forecast."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, stats

from recsys_core.data import retail
from recsys_core.signals.btyd import BGNBD, BTYD, GammaGamma
from training import value as offline
from recsys_core.store.events import PURCHASE, RATING, VIEW, StoredEvent
from recsys_core.signals.value import (
    CHURN_HORIZON_DAYS, DAY, FEATURES, SeasonCalendar, ShopperHistory, ValueModel, ValueModelError, btyd_columns,
    design, features, retail_stored_events,
)

FIRST_DAY = 15_000  # 2011-01-26


def at(day: int, hour: int = 10) -> int:
    return (FIRST_DAY + day) * DAY + hour * 3600


def line(day: int, item: str, amount: float | None, order: str | None = None, type_: int = PURCHASE) -> StoredEvent:
    return StoredEvent("u", item, "Online_Retail", type_, at(day), amount=amount, order_id=order)


@pytest.fixture
def shopper_events() -> list[StoredEvent]:
    return [
        line(0, "a", 10.0, "1"), line(0, "b", 5.0, "1"),
        line(10, "c", 20.0, "2"),
        line(12, "a", -5.0, "C3"),           # cancels part of order 1
        line(30, "d", 15.0, "4"),
        line(31, "e", 99.0, type_=VIEW),      # a view is not a purchase
        line(45, "f", 40.0, "5"),             # after as_of: unseen
    ]


def test_features_of_a_hand_made_shopper(shopper_events):
    found = features(shopper_events, as_of=(FIRST_DAY + 40) * DAY)
    v = found.values
    assert set(v) == set(FEATURES) and found.has_amounts
    assert v["recency_days"] == 10 and v["tenure_days"] == 40
    assert v["purchase_days"] == 3 and v["purchase_days_90d"] == 3
    assert v["mean_gap_days"] == 15 and v["last_gap_days"] == 20
    assert v["recency_over_mean_gap"] == pytest.approx(10 / 15)
    assert v["purchase_days_per_30d"] == pytest.approx(30 * 3 / 40)
    assert v["distinct_items"] == 4                        # a, b, c, d; the cancelled a counts once
    assert v["lines_per_purchase_day"] == pytest.approx(4 / 3)
    assert v["cancelled_line_share"] == pytest.approx(1 / 5)
    assert v["purchase_days_next_90d_last_year"] == 0
    # Money: 50 bought, 5 cancelled.
    assert v["net_spend"] == pytest.approx(45.0)
    assert v["mean_spend_per_purchase_day"] == pytest.approx(50 / 3)
    assert v["max_spend_per_purchase_day"] == pytest.approx(20.0)
    assert v["cancelled_amount_share"] == pytest.approx(0.1)
    # BG/NBD summary: 2 repeat days, last at day 30, T = 40; repeat mean (20 + 15) / 2 net of 10% cancelled.
    assert (v["x"], v["t_x"], v["T"]) == (2, 30, 40)
    assert v["m_x"] == pytest.approx(17.5 * 0.9)


def test_cancellations_are_never_purchases(shopper_events):
    only_a_cancellation = [line(5, "a", -30.0, "C9")]
    assert features(only_a_cancellation, as_of=at(10)) is None
    history = ShopperHistory(shopper_events + [line(50, "g", 10.0, "6"), line(51, "c", -30.0, "C7")])
    bought, spend = history.outcome((FIRST_DAY + 48) * DAY, 10)
    assert bought and spend == 0.0, "a refund larger than the window's purchases floors net spend at 0"
    assert history.outcome((FIRST_DAY + 11) * DAY, 5) == (False, 0.0), "a window with only a cancellation is churn"
    assert history.outcome((FIRST_DAY + 40) * DAY, 10) == (True, 40.0)


def test_shoppers_without_amounts_get_churn_features_only(shopper_events):
    bought = [e for e in shopper_events if e.type == PURCHASE and e.amount > 0]
    no_money = [replace(e, amount=None, order_id=None, type=RATING if i % 2 else PURCHASE) for i, e in enumerate(bought)]
    found = features(no_money, as_of=(FIRST_DAY + 40) * DAY)
    assert not found.has_amounts
    assert found.values["purchase_days"] == 3 and found.values["recency_days"] == 10
    assert found.values["cancelled_line_share"] == 0
    assert math.isnan(found.values["net_spend"]) and math.isnan(found.values["m_x"])
    undated = [replace(e, ts=None) for e in no_money]
    assert features(undated, as_of=(FIRST_DAY + 40) * DAY) is None, "without timestamps there is no recency"


def test_design_logs_counts_and_zeroes_undefined_values():
    values = {"purchase_days": np.array([0.0, math.e - 1]), "net_spend": np.array([-(math.e - 1), np.nan]),
              "btyd_logit_no_purchase": np.array([-2.5, 3.0])}
    matrix = design(values, ("purchase_days", "net_spend", "btyd_logit_no_purchase"))
    assert np.allclose(matrix, [[0.0, -1.0, -2.5], [1.0, 0.0, 3.0]])


# --- cleaning ---------------------------------------------------------------

def raw_lines(**columns) -> pd.DataFrame:
    return pd.DataFrame(columns)


def test_load_splices_the_two_public_files_where_the_newer_begins(tmp_path):
    (older_name, _), (newer_name, _) = retail.RAW_FILES
    older = raw_lines(Invoice=["1", "2", "3"], StockCode=["10001", "10002", "10003"], Description=["x", "y", "z"],
                      Quantity=[1, 2, 3],
                      InvoiceDate=["2010-11-30 10:00:00", "2010-12-01 09:00:00", "2010-12-02 09:00:00"],
                      Price=[1.0, 2.0, 3.0], **{"Customer ID": [1.0, 2.0, 3.0]}, Country=["UK"] * 3)
    newer = raw_lines(InvoiceNo=["2", "3", "4"], StockCode=["10002", "10003", "10004"], Description=["y", "z", "w"],
                      Quantity=[2, 3, 4],
                      InvoiceDate=pd.to_datetime(["2010-12-01 09:00:00", "2010-12-02 09:00:00", "2010-12-03 09:00:00"]),
                      UnitPrice=[2.0, 3.0, 4.0], CustomerID=[2.0, 3.0, 4.0], Country=["UK"] * 3)
    older.to_parquet(tmp_path / older_name)
    newer.to_parquet(tmp_path / newer_name)
    lines = retail.load_transactions(tmp_path)
    assert list(lines.columns) == list(retail.COLUMNS)
    assert lines.invoice.tolist() == ["1", "2", "3", "4"], "the overlapping days come once, from the newer file"


def test_load_names_what_is_missing(tmp_path):
    with pytest.raises(retail.RetailDataError, match="neither transactions.parquet nor"):
        retail.load_transactions(tmp_path)


def test_cleaning_keeps_customers_product_lines_and_signs_cancellations():
    lines = raw_lines(
        invoice=["1", "1", "1", "C2", "3", "4", "5", "6"],
        stock_code=["85123A", "POST", "M", "85123A", "22423 ", "ADJUST2", "22000", "22001"],
        description=["HEART", "POSTAGE", "Manual", "HEART", "CAKE STAND", "Adjustment", "FREE", "NOBODY"],
        quantity=[2, 1, 1, -1, 1, 1, 1, 1],
        invoice_date=pd.to_datetime(["2011-01-01"] * 8),
        unit_price=[2.5, 18.0, 5.0, 2.5, 12.75, 100.0, 0.0, 1.0],
        customer_id=[7.0, 7.0, 7.0, 7.0, 8.0, 8.0, 8.0, np.nan],
        country=["UK"] * 8,
    )
    kept, report = retail.clean(lines)
    assert report == {"lines": 8, "without_customer_id": 1, "non_product_lines": 3, "price_zero_or_less": 1,
                      "kept_lines": 3, "cancelled_lines": 1, "customers": 2}
    assert kept.amount.tolist() == [5.0, -2.5, 12.75]
    assert kept.stock_code.tolist() == ["85123A", "85123A", "22423"]
    items = retail.retail_items(kept)
    assert items.item_id.tolist() == ["retail-22423", "retail-85123A"]
    assert items.title.tolist() == ["CAKE STAND", "HEART"] and set(items.category) == {"Online_Retail"}
    events = retail.retail_events(kept)
    assert events.user_id.tolist() == ["retail-7", "retail-7", "retail-8"]
    assert events.order_id.tolist() == ["1", "C2", "3"]
    assert events.timestamp.iloc[0] == pd.Timestamp("2011-01-01").timestamp()


# --- BG/NBD and Gamma-Gamma -------------------------------------------------

CDNOW = BGNBD(r=0.243, alpha=4.414, a=0.793, b=2.426)


def test_bgnbd_conditional_expectation_matches_the_published_cdnow_figure():
    # Fader, Hardie & Lee (2005) with their CDNOW parameters (time in weeks):
    # a customer with 2 repeat purchases, the last at 30.43, observed for 38.86
    # weeks, makes 1.226 purchases in the next 39 weeks.
    assert float(CDNOW.expected_purchases(39, 2, 30.43, 38.86)) == pytest.approx(1.226, abs=5e-4)


def test_bgnbd_likelihood_and_quiet_probability_match_numerical_integration():
    """The closed forms against the model's definition, integrated numerically
    over the Gamma(r, alpha) purchase rates and Beta(a, b) dropout probabilities."""
    r, alpha, a, b = CDNOW.params
    x, t_x, T, t = 3, 20.0, 35.0, 10.0

    def over_rates(f):
        return integrate.quad(lambda lam: f(lam) * stats.gamma.pdf(lam, r, scale=1 / alpha), 0, np.inf, epsabs=1e-14)[0]

    def over_dropout(f):
        return integrate.quad(lambda p: f(p) * stats.beta.pdf(p, a, b), 0, 1, epsabs=1e-14)[0]

    # Still active after x repeat purchases, or gone right after the last one.
    active = over_dropout(lambda p: (1 - p) ** x)
    gone = over_dropout(lambda p: p * (1 - p) ** (x - 1)) * over_rates(lambda lam: lam ** x * math.exp(-lam * t_x))
    quiet_until_T = over_rates(lambda lam: lam ** x * math.exp(-lam * T))
    quiet_until_T_plus_t = over_rates(lambda lam: lam ** x * math.exp(-lam * (T + t)))
    likelihood = active * quiet_until_T + gone
    assert float(BGNBD.log_likelihood(CDNOW.params, x, t_x, T)) == pytest.approx(math.log(likelihood), rel=1e-6)
    no_purchase = (active * quiet_until_T_plus_t + gone) / likelihood
    assert float(CDNOW.p_no_purchase(t, x, t_x, T)) == pytest.approx(no_purchase, rel=1e-6)
    assert float(CDNOW.p_alive(x, t_x, T)) == pytest.approx(active * quiet_until_T / likelihood, rel=1e-6)


def simulate_bgnbd(model: BGNBD, customers: int, T: float, horizon: float, rng: np.random.Generator):
    """The BG/NBD story: Poisson purchases at rate lambda, and after each repeat
    purchase the customer leaves with probability p."""
    rates = rng.gamma(model.r, 1 / model.alpha, customers)
    dropout = rng.beta(model.a, model.b, customers)
    x, t_x, future = np.zeros(customers), np.zeros(customers), np.zeros(customers)
    for i in range(customers):
        clock = 0.0
        while True:
            clock += rng.exponential(1 / rates[i])
            if clock > T + horizon:
                break
            if clock <= T:
                x[i], t_x[i] = x[i] + 1, clock
            else:
                future[i] += 1
            if rng.random() < dropout[i]:
                break
    return x, t_x, np.full(customers, T), future


def test_bgnbd_fit_recovers_simulated_parameters_and_forecasts_their_future():
    truth = BGNBD(r=0.5, alpha=10.0, a=0.8, b=3.0)
    x, t_x, T, future = simulate_bgnbd(truth, 4000, T=100.0, horizon=50.0, rng=np.random.default_rng(3))
    fitted = BGNBD.fit(x, t_x, T)
    assert fitted.r == pytest.approx(truth.r, rel=0.15) and fitted.alpha == pytest.approx(truth.alpha, rel=0.25)
    assert fitted.a == pytest.approx(truth.a, rel=0.3) and fitted.b == pytest.approx(truth.b, rel=0.4)
    assert fitted.expected_purchases(50.0, x, t_x, T).sum() == pytest.approx(future.sum(), rel=0.06)
    assert (1 - fitted.p_no_purchase(50.0, x, t_x, T)).sum() == pytest.approx((future > 0).sum(), rel=0.06)


def test_gamma_gamma_density_posterior_mean_and_fit():
    model = GammaGamma(p=6.25, q=3.74, gamma=15.44)   # the published CDNOW fit
    x = 3
    total, _ = integrate.quad(lambda m: math.exp(GammaGamma.log_likelihood((model.p, model.q, model.gamma), x, m)), 0, np.inf)
    assert total == pytest.approx(1.0, abs=1e-6)
    # E(M | x, m_x) = E[p / nu] under the posterior nu ~ Gamma(p x + q, gamma + x m_x).
    m_x = 40.0
    shape, rate = model.p * x + model.q, model.gamma + x * m_x
    posterior_mean, _ = integrate.quad(lambda nu: model.p / nu * stats.gamma.pdf(nu, shape, scale=1 / rate), 0, np.inf)
    assert float(model.expected_spend(x, m_x)) == pytest.approx(posterior_mean, rel=1e-6)
    assert float(model.expected_spend(0, 0.0)) == pytest.approx(model.mean_spend)

    rng = np.random.default_rng(5)
    counts = rng.integers(1, 8, 5000)
    nu = rng.gamma(model.q, 1 / model.gamma, 5000)
    means = rng.gamma(model.p * counts, 1 / (counts * nu))   # mean of `counts` Gamma(p, nu) values
    fitted = GammaGamma.fit(counts, means)
    assert fitted.p == pytest.approx(model.p, rel=0.15) and fitted.q == pytest.approx(model.q, rel=0.15)
    assert fitted.mean_spend == pytest.approx(model.mean_spend, rel=0.1)


def test_calibration_error_and_top_decile_definitions():
    probabilities = np.array([0.05, 0.05, 0.95, 0.95, 0.55, 0.55])
    outcomes = np.array([0, 0, 1, 1, 1, 0])
    assert offline.expected_calibration_error(probabilities, outcomes) == pytest.approx((2 * 0.05 + 2 * 0.05 + 2 * 0.05) / 6)
    predicted = np.array([100.0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 50])
    actual = np.array([50.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 200])
    errors = offline.top_decile_errors(predicted, actual)
    assert errors["by_predicted"] == pytest.approx((150 - 250) / 250)
    assert errors["by_actual"] == pytest.approx((150 - 250) / 250)
    elsewhere = np.ones(20)
    elsewhere[5] = 100.0
    errors = offline.top_decile_errors(elsewhere, actual)
    assert errors["by_actual"] == pytest.approx((2 - 250) / 250)
    assert errors["by_predicted"] == pytest.approx((101 - 50) / 50), "ties keep their order"


def test_seasonal_index_compares_a_window_with_its_year_and_forecasts_from_a_year_back():
    # Two years of a shop selling 1 a day, 3 a day from day 270 to 359 of each year.
    days = np.arange(730)
    daily = np.where((days % 365 >= 270) & (days % 365 < 360), 3.0, 1.0)
    season = SeasonCalendar.of(days * DAY, daily)
    year_mean_90d = (275 + 90 * 3) * 90 / 365
    assert season.index(270 * DAY, season.end) == pytest.approx(270 / year_mean_90d)
    assert season.index(100 * DAY, season.end) == pytest.approx(90 / year_mean_90d)
    busy = 365 + 270
    assert season.forecast_index(busy * DAY) == pytest.approx(season.index(270 * DAY, busy * DAY))
    assert season.forecast_index((busy + 365) * DAY) == pytest.approx(270 / year_mean_90d), "past the calendar: a year further back"
    assert season.index(700 * DAY, season.end) == 1.0, "a window past the calendar's end is not known"
    assert season.index(300 * DAY, 320 * DAY) == 1.0, "nor one that ends after what is known"


# --- a real run on the bundled subset -----------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`recsys train-value` on the bundled 400-customer subset (tens of seconds)."""
    out = tmp_path_factory.mktemp("value")
    assert offline.train_value_main(["--out", str(out), "--plots", str(out), "--json"]) == 0
    return json.loads((out / "report.json").read_text()), out


def test_training_on_the_bundled_subset_beats_trivial_baselines(trained):
    report, out = trained
    assert report["cleaning"]["customers"] > 350
    churn = report["churn"]
    assert churn["model"]["roc_auc"] > max(0.7, churn["recency_only"]["roc_auc"])
    assert 0 <= churn["model"]["ece"] < 0.2
    assert report["spend_12m"]["model"]["spearman"] > 0.4
    assert report["spend_3m"]["model"]["spearman"] > report["spend_3m"]["last_90d"]["spearman"]
    assert set(report["targets"]) == {"churn_roc_auc_at_least_0.80", "spend_3m_beats_bgnbd_gg", "spend_12m_beats_bgnbd_gg"}
    for png in ("value_churn_reliability.png", "value_spend_deciles.png"):
        assert (out / png).stat().st_size > 10_000


def test_served_forecast_reads_the_training_features(trained):
    report, out = trained
    model = ValueModel.load(out)
    assert model.version == report["model_version"]
    events = retail.retail_events(retail.clean(retail.load_transactions(retail.BUNDLED_RETAIL_DIR))[0])
    cutoffs = offline.choose_cutoffs(events)
    histories = offline.shopper_histories(events)
    frame = offline.snapshot(histories, cutoffs.churn_test, cutoffs.data_end)
    frame = frame.assign(**btyd_columns(frame, model.btyd))
    expected_churn = offline.predict(model.models["churn"], frame)
    expected_12m = offline.predict(model.models["spend_12m"], frame)
    expected_3m = offline.predict(model.models["spend_3m"], frame)
    assert {"season", "purchase"} <= model.models["spend_3m"].keys()
    spend_if_buying = offline.predict({k: v for k, v in model.models["spend_3m"].items() if k != "purchase"}, frame)
    assert expected_3m == pytest.approx((1 - expected_churn) * spend_if_buying, rel=1e-9), "P(buy) x spend if buying"
    shoppers = {e.user_id: [] for e in retail_stored_events(events)}
    for event in retail_stored_events(events):
        shoppers[event.user_id].append(event)
    for i in (0, len(frame) // 2, len(frame) - 1):
        forecast = model.forecast(shoppers[frame.user_id[i]], cutoffs.churn_test)
        assert forecast.churn_probability == pytest.approx(expected_churn[i], rel=1e-9)
        assert forecast.expected_spend_12m == pytest.approx(expected_12m[i], rel=1e-9)
        assert forecast.expected_spend_3m == pytest.approx(expected_3m[i], rel=1e-9)
        assert forecast.churn_horizon_days == CHURN_HORIZON_DAYS and forecast.as_of == cutoffs.churn_test


def churn_by(model: ValueModel, name: str, events: list[StoredEvent], as_of: int) -> float:
    values = {key: np.asarray([v]) for key, v in features(events, as_of).values.items()}
    values.update(btyd_columns(values, model.btyd))
    return float(offline.predict(model.models[name], pd.DataFrame(values).assign(as_of=as_of))[0])


def test_served_forecast_without_amounts_has_churn_from_review_histories_but_no_spend(trained):
    _, out = trained
    model = ValueModel.load(out)
    loyal = [StoredEvent("amz", f"i{d}", "Beauty", PURCHASE, at(d)) for d in range(0, 200, 14)]
    lapsed = [StoredEvent("amz", f"i{d}", "Beauty", PURCHASE, at(d * 10)) for d in range(6)]
    as_of = at(200, 0)
    steady, gone = model.forecast(loyal, as_of), model.forecast(lapsed, as_of)
    assert steady.expected_spend_3m is None and steady.expected_spend_12m is None
    assert 0 < steady.churn_probability < gone.churn_probability < 1
    assert steady.churn_probability == pytest.approx(churn_by(model, "churn_without_amounts", loyal, as_of), rel=1e-9)
    with_money = [replace(e, amount=20.0, order_id=e.item_id) for e in loyal]
    forecast = model.forecast(with_money, as_of)
    assert forecast.churn_probability == pytest.approx(churn_by(model, "churn", with_money, as_of), rel=1e-9), \
        "a shopper with amounts is a retail customer"
    assert forecast.churn_probability != pytest.approx(steady.churn_probability, abs=1e-6)
    assert forecast.expected_spend_3m > 0 and forecast.expected_spend_12m > 0
    assert model.forecast(loyal, at(0, 0)) is None, "nothing bought before as_of"


def test_churn_of_review_histories_beats_recency_out_of_time_in_every_category(trained):
    report, _ = trained
    history = report["churn_without_amounts"]
    assert set(history["categories"]) == {"Beauty", "Office_Products", "Sports_and_Outdoors"}, "Toys has no dates"
    for category, figures in history["categories"].items():
        assert figures["shoppers"] > 100, category
        assert figures["model"]["roc_auc"] > figures["recency_only"]["roc_auc"], category
        assert figures["model"]["ece"] < 0.15, category


def test_history_snapshots_leave_out_shoppers_the_5_core_filter_still_binds():
    """Fewer than 5 events before the cutoff: the benchmark's filter says they come back."""
    few = ShopperHistory([StoredEvent("a", f"i{d}", "Beauty", PURCHASE, at(d)) for d in range(4)])
    enough = ShopperHistory([StoredEvent("b", f"i{d}", "Beauty", PURCHASE, at(d)) for d in range(5)])
    frame = offline.snapshot({"a": few, "b": enough}, at(10), at(200), offline.HISTORY_MIN_EVENTS)
    assert list(frame.user_id) == ["b"]
    assert list(offline.snapshot({"a": few, "b": enough}, at(10), at(200)).user_id) == ["a", "b"]


def test_value_model_errors_are_clear(tmp_path, trained, capsys):
    with pytest.raises(ValueModelError, match="recsys train-value"):
        ValueModel.load(tmp_path / "nowhere")
    _, out = trained
    artifact = ValueModel.load(out).artifact
    with pytest.raises(ValueModelError, match="other features"):
        ValueModel({**artifact, "features": artifact["features"][:-1]})
    for part in ("season", "purchase"):
        older = {name: {k: v for k, v in model.items() if k != part} for name, model in artifact["models"].items()}
        with pytest.raises(ValueModelError, match="predates the two-part seasonal"):
            ValueModel({**artifact, "models": older})
    without = {name: model for name, model in artifact["models"].items() if name != "churn_without_amounts"}
    with pytest.raises(ValueModelError, match="predates the churn model of shoppers without amounts"):
        ValueModel({**artifact, "models": without})
    assert offline.train_value_main(["--data", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert offline.train_value_main(["--histories", str(tmp_path), "--out", str(tmp_path)]) == 2
    few = tmp_path / "few"
    few.mkdir()
    pd.DataFrame({"user_id": ["a"] * 6, "item_id": [f"i{d}" for d in range(6)], "category": "Beauty",
                  "seq": range(6), "timestamp": [float(at(d * 30)) for d in range(6)], "rating": math.nan}
                 ).to_csv(few / "interactions.csv.gz", index=False)
    assert offline.train_value_main(["--histories", str(few), "--out", str(tmp_path)]) == 2
    assert "too few dated review histories" in capsys.readouterr().err


def test_btyd_bundle_fits_both_models():
    rng = np.random.default_rng(11)
    x, t_x, T, _ = simulate_bgnbd(BGNBD(0.5, 10.0, 0.8, 3.0), 600, 100.0, 1.0, rng)
    m_x = np.where(x > 0, rng.gamma(4.0, 10.0, len(x)), np.nan)
    btyd = BTYD.fit(x, t_x, T, m_x)
    spend = btyd.expected_spend(90.0, x, t_x, T, m_x)
    assert np.all(spend >= 0) and np.corrcoef(spend, x)[0, 1] > 0.5


def test_cached_profiles_forecast_at_the_moving_clock(trained, tmp_path):
    """Another shopper's later event moves the category's clock; a cached
    profile's forecast follows it instead of keeping the time it was cached at."""
    from services.profile.profiles import VALUE_REFRESH_SECONDS, IncomingEvent, ItemInfo, ProfileBook
    from recsys_core.store.sqlite_store import SQLiteEventStore

    class Catalogue:
        def lookup(self, item_ids, timeout):
            return {i: ItemInfo("Beauty", np.eye(4, dtype=np.float32)[int(i[1:]) % 4]) for i in item_ids}

    book = ProfileBook(SQLiteEventStore(tmp_path / "events.sqlite3"), Catalogue(), 200, 100, 100,
                       value_model=ValueModel.load(trained[1]))

    def bought(user, day, item="i0"):
        return IncomingEvent(user_id=user, item_id=item, type=PURCHASE, timestamp=at(day), rating=0.0,
                             review_text="", idempotency_key="", amount=20.0, order_id=f"{user}-{day}")

    book.ingest([bought("loyal", d, f"i{d % 4}") for d in range(0, 200, 14)], 1.0)
    first = book.profile("loyal", 1.0).value
    assert first.as_of == at(196)
    assert book.profile("loyal", 1.0) is book.profile("loyal", 1.0), "unchanged profiles come from the cache"
    cached = book.profile("loyal", 1.0)
    book.ingest([bought("other", 196, "i1")], 1.0)
    assert book.profile("loyal", 1.0) is cached, "the clock has not moved"
    book.ingest([bought("other", 300, "i1")], 1.0)
    later = book.profile("loyal", 1.0).value
    assert later.as_of == at(300) and later.as_of - first.as_of >= VALUE_REFRESH_SECONDS
    assert later.churn_probability > first.churn_probability, "a hundred quiet days make churn likelier"
    assert book.profile("loyal", 1.0).value is later
