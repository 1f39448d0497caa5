"""What is read from a shopper's events: interests and drift, churn and
lifetime value, co-purchases, review opinions."""
