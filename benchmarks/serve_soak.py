"""Soak test of `loraplex serve` (`serve_load.py --minutes M`): K clients keep the server busy for M minutes.

Each client loops until the time is up: a chat request for the base, an adapter or `auto` (in turn), a short or a
long prompt, a small or a large max_tokens, sometimes streamed; one request in eight is abandoned mid-answer (a
stream closed after its first chunks, or a non-streamed request whose client times out), which must cancel its
generation. Per minute it prints requests, server errors (HTTP 5xx, a broken stream, anything but the abandoned
requests), resident memory of the process (server and clients share it) and p50 latency of completed requests.
Loopback only; it stops by itself.
"""
from __future__ import annotations

import http.client
import json
import random
import statistics
import threading
import time
from urllib.parse import urlparse

QUESTIONS = ["Repeat the word apple.", "What is two plus three?", "请重复这个词：河流。", "Name a colour.",
             "Say hello.", "東京は日本の首都ですか？"]
LONG = " ".join(["Here is some context that makes the prompt long."] * 12)  # ~600 tokens at one byte a token
ABANDON_EVERY = 8


def resident_mib() -> float:
    with open("/proc/self/statm", encoding="ascii") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def one_request(url, model: str, question: str, max_tokens: int, stream: bool, abandon: bool,
                timeout: float) -> tuple[str, float]:
    """("ok" | "abandoned" | "error: ...", seconds)."""
    parsed = urlparse(url)
    started = time.perf_counter()
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=0.3 if abandon and not stream else timeout)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                       "temperature": 0.7, "stream": stream})
    try:
        conn.request("POST", f"{parsed.path}/chat/completions", body=body, headers={"content-type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return f"error: HTTP {response.status} {response.read()[:200]!r}", time.perf_counter() - started
        if not stream:
            answer = json.loads(response.read())
            outcome = "ok" if answer["choices"][0]["finish_reason"] else "error: no finish"
            return outcome, time.perf_counter() - started
        lines = 0
        for raw in response:
            line = raw.decode().strip()
            lines += bool(line)
            if abandon and lines >= 3:
                return "abandoned", time.perf_counter() - started
            if line.startswith("data: {\"error\""):
                return f"error: {line[:200]}", time.perf_counter() - started
            if line == "data: [DONE]":
                return "ok", time.perf_counter() - started
        return ("abandoned" if abandon else "error: stream ended without [DONE]"), time.perf_counter() - started
    except TimeoutError:
        return ("abandoned" if abandon else "error: timeout"), time.perf_counter() - started
    except (OSError, ValueError, KeyError) as exc:
        return f"error: {type(exc).__name__}: {exc}", time.perf_counter() - started
    finally:
        conn.close()


def soak(url: str, models: list[str], minutes: float, clients: int, timeout: float) -> list[dict]:
    started = time.monotonic()
    deadline = started + minutes * 60
    records: list[tuple[float, str, float]] = []  # (seconds since start, outcome, latency)
    lock = threading.Lock()

    def client(index: int) -> None:
        rng = random.Random(index)
        count = 0
        while time.monotonic() < deadline:
            count += 1
            question = rng.choice(QUESTIONS) + (" " + LONG if rng.random() < 0.3 else "")
            outcome, seconds = one_request(url, models[(index + count) % len(models)], question,
                                           rng.choice([4, 16, 48]), rng.random() < 0.5,
                                           (index * 31 + count) % ABANDON_EVERY == 0, timeout)
            with lock:
                records.append((time.monotonic() - started, outcome, seconds))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    minutes_seen: list[dict] = []
    for minute in range(1, int(-(-minutes // 1)) + 1):
        time.sleep(max(0.0, min(started + minute * 60, deadline) - time.monotonic()))
        with lock:
            rows = [r for r in records if minute - 1 <= r[0] / 60 < minute]
        done = sorted(r[2] for r in rows if r[1] == "ok")
        minutes_seen.append({"minute": minute, "requests": len(rows), "ok": len(done),
                             "abandoned": sum(r[1] == "abandoned" for r in rows),
                             "errors": [r[1] for r in rows if r[1].startswith("error")],
                             "p50_s": statistics.median(done) if done else float("nan"), "rss_mib": resident_mib()})
        m = minutes_seen[-1]
        print(f"minute {minute}: {m['requests']} requests, {m['abandoned']} abandoned, {len(m['errors'])} errors, "
              f"p50 {m['p50_s']:.3f} s, RSS {m['rss_mib']:.0f} MiB", flush=True)
    for thread in threads:
        thread.join(timeout=timeout)
    return minutes_seen


def run_soak(run_dir: str, args) -> dict:
    from loraplex.serving import app, start_in_thread

    asgi = app(run_dir, max_batch_size=args.max_batch_size, max_tokens_limit=64)
    models = list(asgi.state.engine.entries) + ["auto"]
    url, stop = start_in_thread(asgi)
    try:
        per_minute = soak(url, models, args.minutes, args.clients, args.timeout)
        stats = dict(asgi.state.engine.stats)
        healthy = asgi.state.engine.alive
    finally:
        stop()
    first, last = per_minute[0], per_minute[-1]
    summary = {"minutes": args.minutes, "clients": args.clients, "models": models, "per_minute": per_minute,
               "errors": sum(len(m["errors"]) for m in per_minute), "engine": stats, "worker_alive": healthy,
               "rss_end_over_minute_1": last["rss_mib"] / first["rss_mib"],
               "p50_last_over_first": last["p50_s"] / first["p50_s"]}
    print(f"{sum(m['requests'] for m in per_minute)} requests ({sum(m['abandoned'] for m in per_minute)} abandoned, "
          f"{stats['cancelled']} cancelled by the server), {summary['errors']} errors; RSS end / minute 1 "
          f"{summary['rss_end_over_minute_1']:.3f}; p50 last / first minute {summary['p50_last_over_first']:.3f}")
    return summary
