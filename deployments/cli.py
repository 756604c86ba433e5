"""`msa-serve`: the command line.

    msa-serve generate "prompt"      stream one completion (chat-templated unless --raw)
    msa-serve chat                   interactive chat
    msa-serve make-tiny-model DIR    write a tiny random MSA checkpoint (tests, demos);
                                     --arch minimax-m3 for MiniMax-M3's released layout
    msa-serve export-tokenizer DIR   write the model's tokenizer as a Hugging Face directory
    msa-serve bench-engine           offline throughput / prefix-cache benchmark of the engine
    msa-serve up                     the whole serving stack locally (Redis, Ray Serve, HTTP, gRPC)
    msa-serve client chat "hi"       talk to a running server over gRPC
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from deployments.config import DEFAULT_SERVE_CONFIG
from worker.errors import MSAServeError


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="checkpoint dir or .gguf (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--kv-cache-memory", default=None, help="e.g. 512MiB, 2GiB")
    parser.add_argument("--topk", type=int, default=None, help="override the model's MSA topk")
    _add_parallel_args(parser)


def _add_parallel_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tensor-parallel-size", type=int, default=None,
                        help="GPUs (processes) one model replica spans")
    parser.add_argument("--expert-parallel", action="store_true", default=None,
                        help="deal whole MoE experts out to the ranks")


def _parallel_overrides(args) -> dict:
    overrides = {"tensor_parallel_size": args.tensor_parallel_size,
                 "expert_parallel": args.expert_parallel}
    return {key: value for key, value in overrides.items() if value is not None}


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)


def _engine(args):
    from worker.config import EngineConfig
    from worker.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                  kv_cache_memory=args.kv_cache_memory, topk=args.topk,
                                  **_parallel_overrides(args)))


def _sampling(args):
    from worker.wire import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def _stream(engine, prompt, params) -> str:
    """Prints a request's text as it is generated; returns the whole text."""
    request_id = engine.add_request(prompt, params)
    text = ""
    while engine.has_unfinished_requests:
        for out in engine.step():
            if out.request_id == request_id:
                sys.stdout.write(out.delta)
                sys.stdout.flush()
                text = out.text
    sys.stdout.write("\n")
    return text


def cmd_generate(args) -> None:
    engine = _engine(args)
    prompt = args.prompt
    if not args.raw:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    _stream(engine, prompt, _sampling(args))


def cmd_chat(args) -> None:
    engine = _engine(args)
    params = _sampling(args)
    history = []
    print(f"Chatting with {engine.model_name}. Empty line or Ctrl-D to quit.", flush=True)
    while True:
        try:
            user = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not user.strip():
            return
        history.append({"role": "user", "content": user})
        prompt = engine.tokenizer.apply_chat_template(history)
        try:
            answer = _stream(engine, prompt, params)
        except MSAServeError as exc:  # e.g. the conversation outgrew the context
            print(f"error: {exc}", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": answer})


def cmd_make_tiny_model(args) -> None:
    from worker.tiny_model import make_m3_checkpoint, make_tiny_checkpoint

    if args.arch == "minimax-m3":
        if args.vision:
            sys.exit("error: the tiny MiniMax-M3 always carries its vision tower's weights; "
                     "drop --vision")
        path = make_m3_checkpoint(args.dir, seed=args.seed, topk=args.topk or 3,
                                  fp8_layout=args.fp8)
        weights = f", FP8 weights ({args.fp8} scales)" if args.fp8 else ""
        print(f"wrote a tiny MiniMax-M3 checkpoint (released layout, sharded{weights}) to {path}")
        return
    if args.fp8:
        sys.exit("error: --fp8 writes the released MiniMax-M3 layout; add --arch minimax-m3")
    path = make_tiny_checkpoint(args.dir, seed=args.seed, topk=args.topk or 4,
                                vision=args.vision)
    print(f"wrote a tiny MSA checkpoint to {path}")


def cmd_export_tokenizer(args) -> None:
    from worker.checkpoint import inspect_model

    info = inspect_model(args.model)
    directory = Path(args.dir)
    info.tokenizer.save(directory, info.config.max_position_embeddings)
    print(f"wrote {info.name}'s tokenizer (tokenizer.json, tokenizer_config.json with its chat "
          f"template) to {directory}")


def cmd_bench_engine(args) -> None:
    from deployments.bench_engine import run_engine_benchmark

    run_engine_benchmark(_engine(args), num_requests=args.num_requests,
                         prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens)


def cmd_up(args) -> None:
    from deployments.local import up

    overrides = {"model": args.model} if args.model is not None else {}
    up(args.config, engine_overrides=overrides | _parallel_overrides(args),
       http_port=args.http_port, grpc_port=args.grpc_port, http_host=args.host)


def cmd_client(args) -> None:
    import grpc

    from deployments.client import MSAServeClient

    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature,
                "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed, "n": args.n,
                "regex": args.regex, "json_schema": (json.loads(args.json_schema.read_text())
                                                     if args.json_schema else None)}
    with MSAServeClient(args.target, api_key=args.api_key, timeout_s=args.timeout) as client:
        try:
            if args.action == "models":
                print("\n".join(client.list_models()))
            elif args.action == "health":
                print("ok" if client.health() else "unhealthy")
            elif args.action == "chat":
                media = ([{"image": Path(p).read_bytes()} for p in args.image]
                         + [{"video": Path(p).read_bytes()} for p in args.video])
                content = media + [{"text": args.text}] if media else args.text
                reply = client.chat([{"role": "user", "content": content}], **sampling)
                print("\n".join(_samples([c.message.content for c in reply.choices])))
            elif (args.n or 1) > 1:  # the samples' pieces interleave: each printed whole
                texts: dict[int, str] = {}
                for piece in client.generate(args.text, **sampling):
                    texts[piece.index] = texts.get(piece.index, "") + piece.text
                print("\n".join(_samples([texts[i] for i in sorted(texts)])))
            else:
                for piece in client.generate(args.text, **sampling):
                    sys.stdout.write(piece.text)
                    sys.stdout.flush()
                print()
        except grpc.RpcError as exc:
            print(f"msa-serve client: {exc.code().name}: {exc.details()}", file=sys.stderr)
            sys.exit(1)


def _samples(texts: list[str]) -> list[str]:
    """One sample as it is; several each under a header naming its index."""
    if len(texts) == 1:
        return texts
    return [f"--- sample {index} ---\n{text}" for index, text in enumerate(texts)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msa-serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="stream one completion")
    p.add_argument("prompt")
    p.add_argument("--raw", action="store_true", help="no chat template")
    _add_engine_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat")
    _add_engine_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("make-tiny-model", help="write a tiny random MSA checkpoint")
    p.add_argument("dir")
    p.add_argument("--arch", choices=("msa", "minimax-m3"), default="msa",
                   help="msa: our own layout; minimax-m3: MiniMax-M3's released layout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--topk", type=int, default=None, help="MSA blocks kept per query "
                                                           "(default 4; 3 for minimax-m3)")
    p.add_argument("--vision", action="store_true", help="with a vision tower (msa)")
    p.add_argument("--fp8", nargs="?", const="block", choices=("block", "mxfp8"), default=None,
                   help="minimax-m3: e4m3 weights with fp32 block scales (block, the default) "
                        "or MXFP8 e8m0 group-32 scales")
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("export-tokenizer", help="write the model's tokenizer as a Hugging Face "
                                                "tokenizer directory (for lm-eval, aiperf, ...)")
    p.add_argument("dir")
    p.add_argument("--model", default=None,
                   help="checkpoint dir or .gguf (default: embedded SmolLM2-135M-Instruct)")
    p.set_defaults(func=cmd_export_tokenizer)

    p = sub.add_parser("bench-engine", help="offline engine throughput and prefix-cache TTFT")
    _add_engine_args(p)
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--output-tokens", type=int, default=64)
    p.set_defaults(func=cmd_bench_engine)

    p = sub.add_parser("up", help="serve locally: redis-server + Ray Serve (HTTP and gRPC)")
    p.add_argument("--config", default=str(DEFAULT_SERVE_CONFIG),
                   help="a Ray Serve config file (default: deployments/serve_config.yaml)")
    p.add_argument("--model", default=None, help="override the config's model path")
    p.add_argument("--host", default=None, help="HTTP bind address (default: the config's, "
                                                 "127.0.0.1; 0.0.0.0 inside a container)")
    p.add_argument("--http-port", type=int, default=None)
    p.add_argument("--grpc-port", type=int, default=None)
    _add_parallel_args(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("client", help="call a running server over gRPC")
    p.add_argument("action", choices=["generate", "chat", "models", "health"])
    p.add_argument("text", nargs="?", default="")
    p.add_argument("--target", default="127.0.0.1:9000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds (gRPC deadline)")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="chat: send this image before the text (repeatable; vision models)")
    p.add_argument("--video", action="append", default=[], metavar="FILE",
                   help="chat: send this video before the text (repeatable; vision models)")
    p.add_argument("-n", type=int, default=None, help="this many samples (default 1)")
    p.add_argument("--json-schema", type=Path, default=None, metavar="FILE",
                   help="the reply must be JSON valid under the schema in FILE")
    p.add_argument("--regex", default=None, help="the reply must match this regex")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_client)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        args.func(args)
    except MSAServeError as exc:
        print(f"msa-serve: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
