"""Shoppers' events, durably: the EventStore interface, its SQLite and Redis
backends, and opening the one a configuration selects."""
