"""The library under the services and training, one layer per folder, highest
first: rpc, ranking, signals, store, index, models, data, then errors.py.
A layer imports only the layers below it (pyproject.toml's import-linter
contracts; docs/architecture.md)."""
