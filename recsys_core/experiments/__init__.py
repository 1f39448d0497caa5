"""A/B experiments: arms and who is in which, and what each arm's exposures led to."""
