"""The engine core: a request's Sequence, the BlockManager of KV pages, the Scheduler, the
ModelRunner (with its sampler, CUDA graphs and vision-encoder cache), the LLMEngine loop and
the AsyncLLMEngine that serves it to asyncio callers."""
