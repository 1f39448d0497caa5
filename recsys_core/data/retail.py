"""The UCI Online Retail invoices as the platform reads them: loading both
public files (or the bundled subset) in one schema, cleaning, and the
catalogue items and purchase events they become. Churn and value training
(training/value.py), the embedding service (catalogue) and the
profile service (events) all read the retailer through here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from recsys_core.data import paths

BUNDLED_RETAIL_DIR = paths.BUNDLED_RETAIL_DIR
SHARED_RETAIL_DIR = paths.REPO_ROOT.parent / "shared" / "data" / "online-retail"
# The bundled subset: both files' lines in one schema, already spliced.
TRANSACTIONS_FILE = "transactions.parquet"
# The public files, oldest first, and how their columns map to ours.
SHARED_COLUMNS = {"StockCode": "stock_code", "Description": "description", "Quantity": "quantity",
                  "InvoiceDate": "invoice_date", "Country": "country"}
RAW_FILES = (
    ("online_retail_II_2009-12_2010-12.parquet",
     {**SHARED_COLUMNS, "Invoice": "invoice", "Price": "unit_price", "Customer ID": "customer_id"}),
    ("online_retail_2010-12_2011-12.parquet",
     {**SHARED_COLUMNS, "InvoiceNo": "invoice", "UnitPrice": "unit_price", "CustomerID": "customer_id"}),
)
COLUMNS = ("invoice", "stock_code", "description", "quantity", "invoice_date", "unit_price", "customer_id", "country")
NON_PRODUCT_CODES = frozenset({
    "POST", "DOT", "C2",            # postage, dotcom postage, carriage
    "M", "D", "B", "S",             # manual, discount, bad-debt adjustment, samples
    "BANK CHARGES", "AMAZONFEE", "CRUK",  # fees and commissions
    "PADS",                          # 0.001 filler lines "to match all cushions"
})
NON_PRODUCT_PREFIXES = ("ADJUST", "TEST")
RETAIL_CATEGORY = "Online_Retail"
ITEM_PREFIX = "retail-"
USER_PREFIX = "retail-"

class RetailDataError(ValueError):
    pass


# --- loading and cleaning -------------------------------------------------

def load_transactions(data_dir: Path) -> pd.DataFrame:
    """Every invoice line of a directory, in one schema (COLUMNS): the two
    public files spliced where the newer begins, or the bundled subset."""
    data_dir = Path(data_dir)
    bundled = data_dir / TRANSACTIONS_FILE
    if bundled.is_file():
        lines = pd.read_parquet(bundled)
        missing = [c for c in COLUMNS if c not in lines.columns]
        if missing:
            raise RetailDataError(f"{bundled} lacks columns {missing}")
        return lines[list(COLUMNS)]
    raw = [data_dir / name for name, _ in RAW_FILES]
    if not all(path.is_file() for path in raw):
        raise RetailDataError(
            f"{data_dir} holds neither {TRANSACTIONS_FILE} nor the two Online Retail files "
            f"({', '.join(name for name, _ in RAW_FILES)})")
    parts = []
    for path, (_, renames) in zip(raw, RAW_FILES):
        frame = pd.read_parquet(path).rename(columns=renames)
        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            raise RetailDataError(f"{path} lacks columns {missing}")
        frame["invoice_date"] = pd.to_datetime(frame["invoice_date"])
        parts.append(frame[list(COLUMNS)])
    older, newer = parts
    # The files overlap in December 2010 with the same lines: keep each day once.
    older = older[older.invoice_date < newer.invoice_date.min()]
    return pd.concat([older, newer], ignore_index=True)


def is_product(stock_codes: pd.Series) -> pd.Series:
    codes = stock_codes.str.strip().str.upper()
    return ~codes.isin(NON_PRODUCT_CODES) & ~codes.str.startswith(NON_PRODUCT_PREFIXES)


def clean(lines: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Customers' product lines with an amount (quantity x price, negative
    for a cancellation), and what was dropped on the way."""
    report = {"lines": len(lines)}
    lines = lines[lines.customer_id.notna()]
    report["without_customer_id"] = report["lines"] - len(lines)
    product = is_product(lines.stock_code)
    report["non_product_lines"] = int((~product).sum())
    lines = lines[product]
    priced = lines.unit_price > 0
    report["price_zero_or_less"] = int((~priced).sum())
    lines = lines[priced].copy()
    lines["stock_code"] = lines.stock_code.str.strip()
    lines["cancelled"] = lines.invoice.str.startswith("C")
    # A cancellation's quantity is negative in the files; the sign is forced
    # so that the invoice prefix alone decides what a line is.
    lines["amount"] = np.where(lines.cancelled, -1, 1) * lines.quantity.abs() * lines.unit_price
    report["kept_lines"] = len(lines)
    report["cancelled_lines"] = int(lines.cancelled.sum())
    report["customers"] = int(lines.customer_id.nunique())
    return lines.reset_index(drop=True), report


def retail_items_and_events(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The retail data for the platform: (a) catalogue items in the
    amazon-2014 items schema (item_id "retail-<StockCode>", category
    Online_Retail, title = the description most often used for the code) and
    (b) purchase events, one per product line (user_id "retail-<CustomerID>",
    item_id, category, timestamp in unix seconds, amount = quantity x price,
    negative for cancellations, order_id = invoice number), oldest first."""
    lines, _ = clean(load_transactions(data_dir))
    return retail_items(lines), retail_events(lines)


def retail_items(lines: pd.DataFrame) -> pd.DataFrame:
    described = lines[lines.description.notna() & (lines.description.str.strip() != "")]
    titles = (described.assign(description=described.description.str.strip())
              .groupby(["stock_code", "description"]).size().reset_index(name="n")
              .sort_values(["stock_code", "n", "description"], ascending=[True, False, True])
              .drop_duplicates("stock_code").set_index("stock_code").description)
    codes = np.sort(lines.stock_code.unique())
    return pd.DataFrame({
        "item_id": [ITEM_PREFIX + code for code in codes],
        "category": RETAIL_CATEGORY,
        "title": [titles.get(code, code) for code in codes],
        "brand": "", "description": "", "category_path": "", "generated_keywords": "",
    })


def retail_events(lines: pd.DataFrame) -> pd.DataFrame:
    events = pd.DataFrame({
        "user_id": USER_PREFIX + lines.customer_id.astype("int64").astype(str),
        "item_id": ITEM_PREFIX + lines.stock_code,
        "category": RETAIL_CATEGORY,
        # The invoice clock is the shop's local time; taken as UTC.
        "timestamp": lines.invoice_date.astype("datetime64[s]").astype("int64"),
        "amount": lines.amount.round(4),
        "order_id": lines.invoice,
    })
    return events.sort_values(["user_id", "timestamp", "order_id"], kind="stable").reset_index(drop=True)
