"""Scoring a shopper's candidates: the function the ranking service serves and
offline evaluation measures, and its default weights."""
