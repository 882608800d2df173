"""Load test of `loraplex serve`: N requests from K clients over loopback, batched vs one request at a time.

    python benchmarks/serve_load.py runs/<run> [--requests 32] [--clients 8] [--max-tokens 32] [--max-batch-size 8]
    python benchmarks/serve_load.py runs/<run> --minutes 10 --clients 8     (soak: see serve_soak.py)

The server runs in this process on a free 127.0.0.1 port, twice: with --max-batch-size, then with 1. Requests
cycle over the base and every adapter (greedy chat completions of a fixed length: `ignore_eos` is not an OpenAI
field, so answers may stop early; tokens/s counts the tokens actually generated). Prints p50/p95 latency,
tokens/s, errors per mode and the ratio batched / one at a time. Sends only loopback traffic, a bounded number
of requests, and stops by itself (each request times out after --timeout seconds).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from common import cpu_line

QUESTIONS = ["Repeat the word apple.", "What is two plus three?", "请重复这个词：河流。", "Name a colour.",
             "Write the date 2024-05-01 in words.", "Say hello."]


def one_request(url: str, model: str, question: str, max_tokens: int, timeout: float) -> tuple[float, int, str | None]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}],
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/chat/completions", data=body,
                                     headers={"content-type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read())
        return time.perf_counter() - started, answer["usage"]["completion_tokens"], None
    except (urllib.error.URLError, OSError, KeyError, ValueError) as exc:
        return time.perf_counter() - started, 0, f"{type(exc).__name__}: {exc}"


def load(run_dir: str, batch: int, args) -> dict:
    from loraplex.serving import app, start_in_thread

    asgi = app(run_dir, max_batch_size=batch, max_tokens_limit=max(args.max_tokens, 1))
    models = list(asgi.state.engine.entries)
    url, stop = start_in_thread(asgi)
    try:
        one_request(url, models[0], "warm up", 2, args.timeout)
        jobs = [(models[i % len(models)], QUESTIONS[i % len(QUESTIONS)]) for i in range(args.requests)]
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(lambda job: one_request(url, *job, args.max_tokens, args.timeout), jobs))
        wall = time.perf_counter() - started
        stats = dict(asgi.state.engine.stats)
    finally:
        stop()
    latencies = sorted(r[0] for r in results if r[2] is None)
    tokens = sum(r[1] for r in results)
    errors = [r[2] for r in results if r[2] is not None]

    def quantile(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    return {"max_batch_size": batch, "requests": len(results), "clients": args.clients, "wall_s": wall,
            "p50_s": statistics.median(latencies) if latencies else float("nan"), "p95_s": quantile(0.95),
            "tokens": tokens, "tokens_per_s": tokens / wall, "errors": len(errors), "first_error": errors[:1],
            "batches": stats["batches"] - 1, "largest_batch": stats["largest_batch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run folder (runs/<run>)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run fastest on one)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--minutes", type=float, help="soak instead: keep --clients busy this long (serve_soak.py)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(cpu_line(), flush=True)
    if args.minutes:
        from serve_soak import run_soak

        summary = run_soak(args.run, args)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
        return
    rows = [load(args.run, args.max_batch_size, args), load(args.run, 1, args)]
    print(f"{'batch':>5} {'requests':>8} {'clients':>7} {'wall s':>7} {'p50 s':>7} {'p95 s':>7} {'tokens':>6} "
          f"{'tok/s':>7} {'errors':>6} {'batches':>7} {'largest':>7}")
    for r in rows:
        print(f"{r['max_batch_size']:>5} {r['requests']:>8} {r['clients']:>7} {r['wall_s']:>7.2f} {r['p50_s']:>7.3f} "
              f"{r['p95_s']:>7.3f} {r['tokens']:>6} {r['tokens_per_s']:>7.1f} {r['errors']:>6} {r['batches']:>7} "
              f"{r['largest_batch']:>7}")
    ratio = rows[0]["tokens_per_s"] / max(rows[1]["tokens_per_s"], 1e-9)
    print(f"tokens/s batched (max {args.max_batch_size}) / one at a time: {ratio:.2f}x; "
          f"p50 latency {rows[0]['p50_s'] / max(rows[1]['p50_s'], 1e-9):.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"runs": rows, "ratio_tokens_per_s": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
