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

Multiple choice (`--multiple-choice`): the same comparison through lm-eval's own
`local-completions` client against the served stack, sparse then dense: `msa_cloze` items
(bench/openai_tools.py) whose passages are long enough that MSA is sparse where the choices are
scored. Reports accuracy, how often the two pick the same choice, and how far their choices'
log-likelihoods move. Writes bench/results/quality_choice_cpu.md.

Usage: python -m bench.quality [--lengths 4096 8191] | --multiple-choice [--items 4]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
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
DENSE_TOPK = 8192 // BLOCK_SIZE  # every block of the default model's 8,192-token context
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


def choice_logliks(out_dir: Path) -> list[list[float]]:
    """Each item's choice log-likelihoods, in item order, from lm-eval's logged samples."""
    samples = sorted(out_dir.rglob("samples_msa_cloze_*.jsonl"), key=lambda p: p.stat().st_mtime)
    rows = [json.loads(line) for line in samples[-1].read_text().splitlines()]
    return [[float(resp[0]) for resp in row["filtered_resps"]]
            for row in sorted(rows, key=lambda r: r["doc_id"])]


def score_choices(tasks: Path, out_dir: Path, topk: int) -> None:
    """lm-eval's msa_cloze against the shipped stack serving the default model at `topk`."""
    from bench.openai_tools import lm_eval
    from deployments.config import ServeConfigFile
    from deployments.local import local_stack

    config_file = ServeConfigFile.load()
    # Both cores for the one replica: each choice is a whole long prefill (echo is never served
    # from the prefix cache).
    app = config_file.app_config().with_model({"topk": topk}, cpu_threads=os.cpu_count())
    with local_stack(config_file, app, on_free_ports=True) as endpoints:
        # lm-eval keeps the last 2,047 tokens of a request by default: let it send them all.
        run, results = lm_eval(endpoints, ["msa_cloze"], tasks, out_dir, ",max_length=8192",
                               log_samples=True)
    if not results:
        raise SystemExit(f"lm-eval failed at topk {topk}:\n{run.output[-2000:]}")


def multiple_choice(args) -> None:
    from bench.openai_tools import write_tasks
    from worker.checkpoint import inspect_model

    work = Path("/tmp/msa-quality-choice")
    tasks = work / "tasks"
    if not args.report_only:
        write_tasks(tasks, args.items, context_chars=args.context_chars, ppl_topics=0)
        for mode, topk in (("sparse", SPARSE_TOPK), ("dense", DENSE_TOPK)):
            score_choices(tasks, work / mode, topk)
    logliks = {mode: choice_logliks(work / mode) for mode in ("sparse", "dense")}
    items = [json.loads(line) for line in (tasks / "cloze.jsonl").read_text().splitlines()]
    answers = [item["answer"] for item in items]
    tokenizer = inspect_model(None).tokenizer
    passage_tokens = [len(tokenizer.encode(item["context"], add_special_tokens=False))
                      for item in items]
    picks = {mode: [max(range(len(ll)), key=ll.__getitem__) for ll in rows]
             for mode, rows in logliks.items()}
    moved = [abs(s - d) for sparse_row, dense_row in zip(logliks["sparse"], logliks["dense"])
             for s, d in zip(sparse_row, dense_row)]
    rows = [[mode, f"{sum(p == a for p, a in zip(picks[mode], answers)) / len(answers):.3f}"]
            for mode in ("dense", "sparse")]
    agree = sum(s == d for s, d in zip(picks["sparse"], picks["dense"])) / len(answers)
    notes = (f"{len(answers)} msa_cloze items (four choices) with passages of "
             f"{args.context_chars} characters ({min(passage_tokens)}-{max(passage_tokens)} "
             f"tokens: MSA keeps {SPARSE_TOPK} of their {min(passage_tokens) // BLOCK_SIZE + 1}-"
             f"{max(passage_tokens) // BLOCK_SIZE + 1} blocks where the choices are scored), "
             f"scored by lm-eval 0.4.13's local-completions client (max_length 8192) against the "
             f"shipped stack on CPU, the default model with MSA topk {SPARSE_TOPK} and dense. "
             f"Sparse and dense pick the same choice on {agree:.0%} of items; a choice's "
             f"log-likelihood moves by {statistics.mean(moved):.4f} nats on average "
             f"(at most {max(moved):.4f}).")
    write_results("quality_choice_cpu", "Sparse serving's quality: multiple choice through "
                  "lm-eval, MSA topk 16 vs dense",
                  markdown_table(["attention", "accuracy"], rows), notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8191],
                        help="tokens scored from each text's start (the context is 8,192)")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--multiple-choice", action="store_true",
                        help="the lm-eval multiple-choice comparison instead of perplexity")
    parser.add_argument("--items", type=int, default=4)
    parser.add_argument("--context-chars", type=int, default=15000)
    parser.add_argument("--report-only", action="store_true",
                        help="report the last --multiple-choice run's logged samples again")
    args = parser.parse_args()
    if args.multiple_choice:
        multiple_choice(args)
        return
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
