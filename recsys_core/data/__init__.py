"""Data sets: the amazon-2014 schema and its loading, UCI Online Retail, and
where bundled data, models and caches live."""
