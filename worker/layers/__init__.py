"""Layers the model families share: norms, rotary embeddings, paged attention with the
index branch, and mixture-of-experts routing."""
