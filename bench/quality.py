"""What sparse serving costs in quality: perplexity of the default model (SmolLM2-135M-Instruct,
derived indexer) served with MSA at topk 16 against the same model dense, on long real texts.

Both runs score every token of the same text through the engine's prompt log-probabilities
(`SamplingParams.prompt_logprobs`, what `echo` and lm-eval's log-likelihood tasks read). Dense
is the same engine with topk raised to cover every block. Below topk x 128 = 2,048 tokens MSA
selects every block and equals dense, so the table also gives the perplexity of the tokens past
position 2,048 alone: where the selection is really sparse.

Texts (offline on any machine that runs this project):
- "Python reference": the Python Language Reference's topics as CPython ships them for
  `help()` (`pydoc_data.topics`, sorted by topic; PSF License 2.0).
- "GNU GPL v3": the licence's text (`/usr/share/common-licenses/GPL-3` on Debian and Ubuntu;
  verbatim copies may be distributed). Skipped with a note where the file is absent.

Usage: python -m bench.quality [--lengths 4096 8191]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import markdown_table, write_results  # noqa: E402
from worker.config import EngineConfig  # noqa: E402
from worker.engine.llm_engine import LLMEngine  # noqa: E402
from worker.wire import BLOCK_SIZE, SamplingParams  # noqa: E402

SPARSE_TOPK = 16
DENSE_FROM = SPARSE_TOPK * BLOCK_SIZE  # before this many tokens sparse equals dense
GPL_PATH = Path("/usr/share/common-licenses/GPL-3")
SCORE = SamplingParams(max_tokens=0, prompt_logprobs=0)


def texts() -> dict[str, str]:
    import pydoc_data.topics

    found = {"Python reference": "\n\n".join(pydoc_data.topics.topics[name]
                                             for name in sorted(pydoc_data.topics.topics))}
    if GPL_PATH.exists():
        found["GNU GPL v3"] = GPL_PATH.read_text()
    return found


def perplexity(logprobs: list[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs))


def score(engine: LLMEngine, ids: list[int]) -> tuple[list[float], float]:
    """(the log-probability of tokens 1.. of `ids`, seconds)."""
    start = time.perf_counter()
    out = engine.generate([ids], SCORE, use_tqdm=False)[0]
    return [lp.logprob for lp in out.prompt_logprobs], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8191],
                        help="tokens scored from each text's start (the context is 8,192)")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()
    longest = max(args.lengths)
    engines = {
        mode: LLMEngine(EngineConfig(device="cpu", dtype="float32", topk=topk,
                                     max_model_len=longest + 1))
        for mode, topk in (("dense", -(-longest // BLOCK_SIZE)), ("sparse", SPARSE_TOPK))}
    tokenizer = engines["sparse"].tokenizer
    corpus = texts()
    rows, skipped = [], []
    runs = [(name, length) for name in corpus for length in args.lengths]
    for name, length in tqdm(runs, desc="scoring", unit="text"):
        ids = tokenizer.encode(corpus[name])
        if len(ids) < length:
            skipped.append(f"{name} has {len(ids)} tokens, fewer than {length}: not scored "
                           f"at {length}.")
            continue
        ids = ids[:length]
        scored = {mode: score(engine, ids) for mode, engine in engines.items()}
        dense, sparse = scored["dense"][0], scored["sparse"][0]
        # Entry i scores token i + 1: tokens past DENSE_FROM are entries DENSE_FROM - 1 on.
        tail = DENSE_FROM - 1
        line = [name, length]
        for part in (slice(None), slice(tail, None)):
            d, s = perplexity(dense[part]), perplexity(sparse[part])
            line += [f"{d:.3f}", f"{s:.3f}", f"{(s / d - 1):+.2%}"]
        line += [f"{scored['dense'][1]:.0f}", f"{scored['sparse'][1]:.0f}"]
        rows.append(line)
    header = ["text", "tokens", "dense ppl", "sparse ppl", "sparse vs dense",
              f"dense ppl past {DENSE_FROM}", f"sparse ppl past {DENSE_FROM}",
              "sparse vs dense (past)", "dense s", "sparse s"]
    notes = (f"SmolLM2-135M-Instruct (the default model), fp32 on CPU, derived indexer. Sparse: "
             f"MSA topk {SPARSE_TOPK} blocks of {BLOCK_SIZE} tokens; dense: topk covering the "
             f"whole text. Perplexity over every scored token, then over the tokens past "
             f"position {DENSE_FROM} (before it MSA selects every block). 'sparse vs dense' is "
             f"the sparse perplexity's excess over dense (lower is better). Texts and licences: "
             f"bench/quality.py's docstring. " + " ".join(skipped))
    write_results("quality_cpu", "Sparse serving's quality: perplexity, MSA topk 16 vs dense",
                  markdown_table(header, rows), notes, args.out_dir)


if __name__ == "__main__":
    main()
