"""BG/NBD purchases with Gamma-Gamma spend ("buy till you die" models).

The churn and lifetime-value baseline of `recsys train-value`, and the
posterior the served value models build on (recsys_core/signals/value.py).

BG/NBD: Fader, Hardie & Lee (2005), "Counting your customers" the easy way,
Marketing Science 24(2). Gamma-Gamma: Fader, Hardie & Lee (2005), RFM and CLV:
using iso-value curves for customer base analysis, JMR 42(4); and Fader &
Hardie (2013), "The Gamma-Gamma model of monetary value".

Implemented here with scipy because the `lifetimes` package does not run with
pandas 3. A customer is summarised as in the papers: x repeat transactions
(transactions beyond the first), t_x the time of the last one and T the time
of the cutoff, both measured from the first transaction; m_x the mean value
of the repeat transactions. Time is in whatever unit the caller uses (days
here); the parameters r, alpha then carry that unit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize, special


def _positive_params(log_params: np.ndarray) -> np.ndarray:
    return np.exp(np.clip(log_params, -30, 30))


def _maximise(loss, start: np.ndarray) -> np.ndarray:
    """Minimise `loss` over log parameters: L-BFGS-B for speed, then
    Nelder-Mead from there, which does not trust the numerical gradient near
    the optimum (the papers fit with a spreadsheet's Solver)."""
    quick = optimize.minimize(loss, start, method="L-BFGS-B")
    polished = optimize.minimize(loss, quick.x, method="Nelder-Mead",
                                 options={"maxiter": 400 * len(start), "xatol": 1e-5, "fatol": 1e-9})
    return _positive_params(polished.x if polished.fun <= quick.fun else quick.x)


def _summary(x, t_x, T) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, t_x, T = (np.asarray(v, dtype=np.float64) for v in (x, t_x, T))
    if np.any(x < 0) or np.any(t_x < 0) or np.any(t_x > T + 1e-9) or np.any((x == 0) & (t_x != 0)):
        raise ValueError("BG/NBD needs x >= 0, 0 <= t_x <= T, and t_x = 0 when x = 0")
    return x, t_x, T


@dataclass(frozen=True)
class BGNBD:
    r: float
    alpha: float
    a: float
    b: float

    @staticmethod
    def log_likelihood(params, x, t_x, T) -> np.ndarray:
        """Each customer's log-likelihood (FHL 2005, equation 6)."""
        return BGNBD._log_likelihood(params, *_summary(x, t_x, T))

    @staticmethod
    def _log_likelihood(params, x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
        r, alpha, a, b = params
        common = special.gammaln(r + x) - special.gammaln(r) + r * np.log(alpha) \
            + special.betaln(a, b + x) - special.betaln(a, b)
        stayed = -(r + x) * np.log(alpha + T)
        repeat = x > 0
        # The second term exists only for repeat buyers: they may have dropped
        # out right after their last transaction.
        dropped = np.where(
            repeat,
            np.log(a) - np.log(np.where(repeat, b + x - 1, 1.0)) - (r + x) * np.log(alpha + t_x),
            -np.inf,
        )
        return common + np.logaddexp(stayed, dropped)

    @classmethod
    def fit(cls, x, t_x, T) -> "BGNBD":
        """Maximum likelihood (Nelder-Mead on log parameters, as in the papers' spreadsheets' Solver)."""
        x, t_x, T = _summary(x, t_x, T)
        if len(x) < 10:
            raise ValueError(f"BG/NBD needs at least 10 customers to fit, got {len(x)}")

        def loss(log_params):
            value = -cls._log_likelihood(_positive_params(log_params), x, t_x, T).mean()
            return value if np.isfinite(value) else 1e300

        return cls(*_maximise(loss, np.log([1.0, max(float(T.mean()), 1.0), 1.0, 1.0])))

    @property
    def params(self) -> tuple[float, float, float, float]:
        return self.r, self.alpha, self.a, self.b

    def p_alive(self, x, t_x, T) -> np.ndarray:
        """P(still active at T | x, t_x, T) (FHL 2005, equation 11)."""
        r, alpha, a, b = self.params
        x, t_x, T = _summary(x, t_x, T)
        repeat = x > 0
        log_ratio = np.log(a) - np.log(np.where(repeat, b + x - 1, 1.0)) + (r + x) * (np.log(alpha + T) - np.log(alpha + t_x))
        return np.where(repeat, 1.0 / (1.0 + np.exp(np.minimum(log_ratio, 700))), 1.0)

    def expected_purchases(self, t: float, x, t_x, T) -> np.ndarray:
        """E[Y(t) | x, t_x, T]: expected transactions in (T, T + t] (FHL 2005, equation 10)."""
        r, alpha, a, b = self.params
        x, t_x, T = _summary(x, t_x, T)
        if abs(a - 1) < 1e-9:
            raise ValueError("E[Y(t)] has a removable singularity at a = 1; not handled")
        z = t / (alpha + T + t)
        hyper = special.hyp2f1(r + x, b + x, a + b + x - 1, z)
        bracket = 1 - np.exp((r + x) * (np.log(alpha + T) - np.log(alpha + T + t))) * hyper
        return (a + b + x - 1) / (a - 1) * bracket * self.p_alive(x, t_x, T)

    def p_no_purchase(self, t: float, x, t_x, T) -> np.ndarray:
        """P(no transaction in (T, T + t] | x, t_x, T): the customer is gone, or
        alive with a rate from the posterior Gamma(r + x, alpha + T) and
        buys nothing (dropping out happens only right after a purchase)."""
        r, alpha, _, _ = self.params
        x, t_x, T = _summary(x, t_x, T)
        alive = self.p_alive(x, t_x, T)
        quiet_if_alive = np.exp((r + x) * (np.log(alpha + T) - np.log(alpha + T + t)))
        return 1 - alive + alive * quiet_if_alive


@dataclass(frozen=True)
class GammaGamma:
    p: float
    q: float
    gamma: float

    @staticmethod
    def log_likelihood(params, x, m_x) -> np.ndarray:
        """Log density of the mean spend m_x of x transactions (Fader & Hardie 2013, equation 3)."""
        p, q, gamma = params
        x, m_x = np.asarray(x, dtype=np.float64), np.asarray(m_x, dtype=np.float64)
        px = p * x
        return (special.gammaln(px + q) - special.gammaln(px) - special.gammaln(q) + q * np.log(gamma)
                + (px - 1) * np.log(m_x) + px * np.log(x) - (px + q) * np.log(gamma + m_x * x))

    @classmethod
    def fit(cls, x, m_x) -> "GammaGamma":
        """Maximum likelihood on repeat customers (x > 0, m_x > 0), as the model requires."""
        x, m_x = np.asarray(x, dtype=np.float64), np.asarray(m_x, dtype=np.float64)
        if np.any(x <= 0) or np.any(m_x <= 0):
            raise ValueError("Gamma-Gamma is fitted on customers with x > 0 repeat transactions of mean value m_x > 0")
        if len(x) < 10:
            raise ValueError(f"Gamma-Gamma needs at least 10 customers to fit, got {len(x)}")

        def loss(log_params):
            value = -cls.log_likelihood(_positive_params(log_params), x, m_x).mean()
            return value if np.isfinite(value) else 1e300

        return cls(*_maximise(loss, np.log([1.0, 2.0, max(float(np.mean(m_x)), 1e-3)])))

    @property
    def mean_spend(self) -> float:
        """E(M) of a customer we know nothing about (needs q > 1)."""
        return self.p * self.gamma / (self.q - 1) if self.q > 1 else float("nan")

    def expected_spend(self, x, m_x) -> np.ndarray:
        """E(M | x, m_x): a weighted average of the population mean and the
        customer's own mean (Fader & Hardie 2013, equation 5). Customers
        without a usable repeat mean (x = 0 or m_x <= 0) get the population mean."""
        x, m_x = np.asarray(x, dtype=np.float64), np.asarray(m_x, dtype=np.float64)
        usable = (x > 0) & (m_x > 0)
        own = self.p * (self.gamma + np.where(usable, m_x, 0) * x) / (self.p * x + self.q - 1)
        return np.where(usable, own, self.mean_spend)


@dataclass(frozen=True)
class BTYD:
    """BG/NBD and Gamma-Gamma fitted on one customer base at one cutoff.

    Summaries: x repeat purchase days, t_x and T in days, m_x the mean value
    of the repeat purchase days (NaN where unknown)."""
    bgnbd: BGNBD
    gamma_gamma: GammaGamma

    @classmethod
    def fit(cls, x, t_x, T, m_x) -> "BTYD":
        """BG/NBD on every customer (it needs no outcomes); Gamma-Gamma on the
        repeat buyers with a positive mean repeat spend."""
        x, m_x = np.asarray(x, dtype=np.float64), np.asarray(m_x, dtype=np.float64)
        repeat = (x > 0) & (np.nan_to_num(m_x) > 0)
        return cls(BGNBD.fit(x, t_x, T), GammaGamma.fit(x[repeat], m_x[repeat]))

    def p_no_purchase(self, days: float, x, t_x, T) -> np.ndarray:
        return self.bgnbd.p_no_purchase(days, x, t_x, T)

    def expected_spend(self, days: float, x, t_x, T, m_x) -> np.ndarray:
        """Expected purchases in the next `days` times the expected value of one."""
        spend_per_purchase = self.gamma_gamma.expected_spend(x, np.nan_to_num(np.asarray(m_x, dtype=np.float64)))
        return self.bgnbd.expected_purchases(days, x, t_x, T) * spend_per_purchase

    def describe(self) -> dict:
        return {"bgnbd": dict(zip(("r", "alpha", "a", "b"), map(float, self.bgnbd.params))),
                "gamma_gamma": {"p": float(self.gamma_gamma.p), "q": float(self.gamma_gamma.q),
                                "gamma": float(self.gamma_gamma.gamma)}}
