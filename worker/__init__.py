"""Model replica internals: model, paged KV cache, scheduler and engine."""
