"""Item vectors: the per-category FAISS index and the on-disk embedding cache."""
