"""The tools users already point at an OpenAI-compatible server, run unchanged against the
shipped stack (the config `msa-serve up` serves, the default model, this machine):

- lm-evaluation-harness, `local-completions` given only `model` and `base_url`: a
  multiple-choice task and a rolling-perplexity task. Its tokenizer is the server's own
  (`/tokenizer_info`, `/tokenize`, `/detokenize`): nothing comes from a model hub.
- aiperf, chat and completions, streaming, token counts from the server's usage, per chunk on
  chat (`--per-chunk-usage`: aiperf sends `continuous_usage_stats` there only).
- guidellm, its OpenAI HTTP backend on synthetic prompts, which sends
  `continuous_usage_stats` by default.

Each tool runs from its own virtual environment under `.tools/`, made on first use with the
pinned version below, as a user would install it: none of them is a dependency of msa-serve.
The tools that make synthetic prompts load a tokenizer directory, written by
`msa-serve export-tokenizer`.

lm-eval's tasks read local data made at run time from the Python Language Reference's topics
as CPython ships them for `help()` (`pydoc_data.topics`, PSF License 2.0):
- `msa_cloze`: a passage, then which of four sentences comes next (the true one and three
  drawn from elsewhere in the text);
- `msa_reference_ppl`: whole topics scored by rolling log-likelihood (lm-eval's wikitext
  form: word and byte perplexity, bits per byte).

Usage: python -m bench.openai_tools [--tools lm-eval,aiperf,guidellm]
Writes bench/results/openai_tools_cpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import markdown_table, write_results  # noqa: E402
from deployments.config import ServeConfigFile  # noqa: E402
from deployments.local import Endpoints, local_stack  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOOLS_DIR = ROOT / ".tools"
# venv name -> (pip requirement, the console script it installs)
TOOLS = {"lm-eval": ("lm-eval[api]==0.4.13", "lm_eval"),
         "aiperf": ("aiperf==0.13.0", "aiperf"),
         "guidellm": ("guidellm==0.8.1", "guidellm")}
# guidellm needs torch (through transformers): the build msa-serve already runs on is installed
# first, so pip does not fetch a second one with its CUDA libraries.
FIRST = {"guidellm": [f"torch=={torch.__version__.split('+')[0]}"]}
# The tools must not reach for a hub: a run that needs one fails instead of hanging on retries.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def tool(name: str) -> Path:
    """The tool's console script, installing its pinned version into .tools/<name> first."""
    requirement, script = TOOLS[name]
    venv = TOOLS_DIR / name
    executable = venv / "bin" / script
    if not executable.exists():
        print(f"installing {requirement} into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        for packages in (FIRST.get(name, []), [requirement]):
            if packages:
                subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *packages],
                               check=True)
    return executable


@dataclass
class ToolRun:
    name: str
    command: list[str]
    returncode: int
    seconds: float
    output: str


def run_tool(name: str, command: list[str], cwd: Path, timeout_s: float,
             offline: bool = True) -> ToolRun:
    print(f"$ {' '.join(command)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout_s,
                          env=os.environ | (OFFLINE if offline else {}))
    output = done.stdout + done.stderr
    (cwd / f"{name.replace(' ', '-')}.log").write_text(output)
    print(output[-3000:], flush=True)
    return ToolRun(name, command, done.returncode, time.perf_counter() - start, output)


# -- lm-eval tasks with local data -------------------------------------------------------------

def reference_topics() -> list[str]:
    import pydoc_data.topics

    return [pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics)]


def cloze_items(count: int, context_chars: int, seed: int = 0) -> list[dict]:
    """Four-way next-sentence items: `context` ends where a sentence ends, `choices` hold the
    sentence that follows and three from elsewhere in the text, `answer` the true one's index."""
    text = re.sub(r"\s+", " ", "\n\n".join(reference_topics()))
    ends = [m.end() for m in re.finditer(r"[.!?] (?=[A-Z])", text)]
    sentences = [text[a:b].strip() for a, b in zip(ends, ends[1:])]
    sized = [i for i, s in enumerate(sentences) if 30 <= len(s) <= 200]
    rng = random.Random(seed)
    items = []
    for index in rng.sample([i for i in sized if ends[i] >= context_chars], count):
        others = [sentences[j] for j in rng.sample([j for j in sized if abs(j - index) > 50], 3)]
        answer = rng.randrange(4)
        choices = others[:answer] + [sentences[index]] + others[answer:]
        items.append({"context": text[ends[index] - context_chars:ends[index]].strip(),
                      "choices": choices, "answer": answer})
    return items


def write_tasks(directory: Path, cloze_count: int, context_chars: int,
                ppl_topics: int) -> list[str]:
    """lm-eval task files (YAML) and their JSON-lines data in `directory`; the task names."""
    directory.mkdir(parents=True, exist_ok=True)
    cloze = directory / "cloze.jsonl"
    cloze.write_text("".join(json.dumps(item) + "\n"
                             for item in cloze_items(cloze_count, context_chars)))
    topics = [t for t in reference_topics() if 2000 <= len(t) <= 8000]
    ppl = directory / "reference.jsonl"
    ppl.write_text("".join(json.dumps({"text": t}) + "\n" for t in topics[:ppl_topics]))
    common = "dataset_path: json\ntest_split: train\n"
    (directory / "msa_cloze.yaml").write_text(
        f"task: msa_cloze\n{common}dataset_kwargs:\n  data_files: {cloze}\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (directory / "msa_reference_ppl.yaml").write_text(
        f"task: msa_reference_ppl\n{common}dataset_kwargs:\n  data_files: {ppl}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
        "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n"
        "  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    return ["msa_cloze", "msa_reference_ppl"]


def lm_eval(endpoints: Endpoints, tasks: list[str], task_dir: Path, out_dir: Path,
            extra_model_args: str = "", log_samples: bool = False) -> tuple[ToolRun, dict]:
    """Runs lm-eval's local-completions client; (the run, its results JSON)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    model_args = f"model={endpoints.model},base_url={endpoints.http}/v1/completions"
    command = [str(tool("lm-eval")), "--model", "local-completions", "--model_args",
               model_args + extra_model_args, "--tasks", ",".join(tasks),
               "--include_path", str(task_dir), "--output_path", str(out_dir)]
    run = run_tool("lm-eval", command + (["--log_samples"] if log_samples else []),
                   out_dir.parent, timeout_s=3600)
    found = sorted(out_dir.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    return run, json.loads(found[-1].read_text()) if found and run.returncode == 0 else {}


def aiperf(endpoints: Endpoints, endpoint_type: str, tokenizer_dir: Path,
           work: Path) -> ToolRun:
    artifacts = work / f"aiperf-{endpoint_type}"
    shutil.rmtree(artifacts, ignore_errors=True)
    # aiperf asks for continuous_usage_stats on the chat endpoint only.
    per_chunk = ["--per-chunk-usage"] if endpoint_type == "chat" else []
    command = [str(tool("aiperf")), "profile", "--model", endpoints.model,
               "--url", endpoints.http, "--endpoint-type", endpoint_type, "--streaming",
               "--use-server-token-count", *per_chunk, "--tokenizer", str(tokenizer_dir),
               "--synthetic-input-tokens-mean", "64", "--output-tokens-mean", "32",
               "--request-count", "8", "--concurrency", "2",
               "--artifact-dir", str(artifacts), "--ui-type", "none"]
    # aiperf's offline mode looks a tokenizer path up as a hub repo id and fails: run it online
    # (nothing is fetched for a local directory).
    return run_tool(f"aiperf {endpoint_type}", command, work, timeout_s=900, offline=False)


def guidellm(endpoints: Endpoints, tokenizer_dir: Path, work: Path) -> ToolRun:
    (work / "guidellm.json").unlink(missing_ok=True)
    command = [str(tool("guidellm")), "run",
               "--backend", f"kind=openai_http,target={endpoints.http},model={endpoints.model}",
               "--tokenizer", f"kind=hf_auto,model={tokenizer_dir}",
               "--data", "kind=synthetic_text,prompt_tokens=64,output_tokens=32",
               "--profile", "kind=synchronous", "--constraint", "kind=max_requests,count=8",
               "--output", f"kind=json,path={work / 'guidellm.json'}",
               "--disable-console-interactive"]
    return run_tool("guidellm", command, work, timeout_s=900)


def export_tokenizer(directory: Path) -> Path:
    subprocess.run([sys.executable, "-m", "deployments.cli", "export-tokenizer", str(directory)],
                   check=True, cwd=ROOT)
    return directory


def lm_eval_rows(run: ToolRun, results: dict) -> list[list[str]]:
    if not results:
        return [["lm-eval", "local-completions", "failed", f"{run.seconds:.0f}",
                 _last_line(run.output)]]
    # local-completions says which tokenizer it settled on: the server's, or a hub download.
    tokenizer = "server's tokenizer" if "remote tokenizer" in run.output else "hub tokenizer"
    rows = []
    for task, figures in results["results"].items():
        shown = ", ".join(f"{key.split(',')[0]} {value:.3f}" for key, value in figures.items()
                          if isinstance(value, float) and "stderr" not in key)
        rows.append(["lm-eval", f"local-completions ({tokenizer}): {task}", "ok",
                     f"{run.seconds:.0f}", shown])
    return rows


def aiperf_figures(run: ToolRun, artifact_dir: Path) -> str:
    export = artifact_dir / "profile_export_aiperf.json"
    if run.returncode != 0 or not export.exists():
        return _last_line(run.output)
    d = json.loads(export.read_text())
    errors = (d.get("error_request_count") or {}).get("avg", 0)
    return (f"{d['request_count']['avg']:.0f} requests, {errors:.0f} errors; TTFT avg "
            f"{d['time_to_first_token']['avg']:.0f} ms, ITL avg "
            f"{d['inter_token_latency']['avg']:.0f} ms, output "
            f"{d['output_token_throughput']['avg']:.1f} tok/s, output tokens "
            f"{d['output_sequence_length']['avg']:.0f} per request (server usage)")


def guidellm_figures(run: ToolRun, export: Path) -> str:
    if run.returncode != 0 or not export.exists():
        return _last_line(run.output)
    benchmark = json.loads(export.read_text())["benchmarks"][0]
    m = benchmark["metrics"]
    body = json.loads(benchmark["requests"]["successful"][0]["request_args"])["body"]
    return (f"{m['request_totals']['successful']} requests, {m['request_totals']['errored']} "
            f"errors; TTFT median {m['time_to_first_token_ms']['successful']['median']:.0f} ms, "
            f"ITL median {m['inter_token_latency_ms']['successful']['median']:.0f} ms, output "
            f"{m['output_tokens_per_second']['successful']['mean']:.1f} tok/s; it sent "
            f"stream_options {json.dumps(body.get('stream_options'))}")


def _last_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:160].replace("|", "/") if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tools", default="lm-eval,aiperf,guidellm")
    parser.add_argument("--cloze-items", type=int, default=20)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/msa-openai-tools"))
    args = parser.parse_args()
    chosen = args.tools.split(",")
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    for name in chosen:
        tool(name)
    tokenizer_dir = export_tokenizer(work / "tokenizer")
    config_file = ServeConfigFile.load()
    rows = []
    with local_stack(config_file, config_file.app_config(), on_free_ports=True) as endpoints:
        if "lm-eval" in chosen:
            tasks = write_tasks(work / "tasks", args.cloze_items, context_chars=1500,
                                ppl_topics=4)
            rows += lm_eval_rows(*lm_eval(endpoints, tasks, work / "tasks", work / "lm-eval"))
        for endpoint_type in ("chat", "completions") if "aiperf" in chosen else ():
            run = aiperf(endpoints, endpoint_type, tokenizer_dir, work)
            usage = "per-chunk usage" if endpoint_type == "chat" else "server usage"
            rows.append(["aiperf", f"{endpoint_type}, streaming, {usage}",
                         "ok" if run.returncode == 0 else "failed", f"{run.seconds:.0f}",
                         aiperf_figures(run, work / f"aiperf-{endpoint_type}")])
        if "guidellm" in chosen:
            run = guidellm(endpoints, tokenizer_dir, work)
            rows.append(["guidellm", "openai_http, chat, synthetic, synchronous",
                         "ok" if run.returncode == 0 else "failed", f"{run.seconds:.0f}",
                         guidellm_figures(run, work / "guidellm.json")])
    versions = ", ".join(TOOLS[name][0] for name in chosen)
    write_results("openai_tools_cpu", "OpenAI-compatible tools against msa-serve, unchanged",
                  markdown_table(["tool", "run", "result", "seconds", "figures"], rows),
                  f"Tools: {versions}, each in its own venv under .tools/. Server: the shipped "
                  "deployments/serve_config.yaml (what `msa-serve up` serves), default model, "
                  "CPU. lm-eval was given only model and base_url; its tokenizer is the "
                  "server's. Tasks and their data: bench/openai_tools.py's docstring.")


if __name__ == "__main__":
    main()
