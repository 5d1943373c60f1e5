"""Benchmark: the `openai` backend's concurrent requests against the same calls made one at a time.

400 chat requests to the fake OpenAI-compatible server (tests/fake_openai_server.py), each
answered after 100 ms, as a hosted API or a busy vLLM server would: first through
`pipeline.backends` at concurrency 32, then with the plain `openai` client one call after
another, the way the Self-Instruct and Stanford Alpaca scripts call the API. The last line is
the ratio of requests per second; 32x is the ceiling.

    python bench/bench_client.py [--requests 400] [--latency 0.1] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.backends import BackendOptions, Request, make_client  # noqa: E402

MAX_TOKENS = 64  # the fake server ignores it; sent so the calls look like real ones


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Write instruction number {i}."}]


def concurrent_run(base_url: str, n: int, concurrency: int) -> float:
    client = make_client(BackendOptions(backend="openai", base_url=base_url, model="fake-model",
                                        concurrency=concurrency))
    requests = (Request(str(i), messages=tuple(messages(i)), max_tokens=MAX_TOKENS) for i in range(n))
    start = time.perf_counter()
    answered = sum(response.error is None for response in client.stream(requests))
    elapsed = time.perf_counter() - start
    client.close()
    assert answered == n, f"only {answered} of {n} answered"
    return elapsed


def sequential_run(base_url: str, n: int) -> float:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="not-needed")
    start = time.perf_counter()
    for i in range(n):
        client.chat.completions.create(model="fake-model", messages=messages(i), max_tokens=MAX_TOKENS)
    elapsed = time.perf_counter() - start
    client.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--latency", type=float, default=0.1, help="seconds the server takes per answer")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    # The server runs in its own process, as a real one would: in this one it would compete
    # with the client for the interpreter lock and the benchmark would measure both.
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_openai_server.py"), "--port", "0",
                               "--latency", str(args.latency)], stdout=subprocess.PIPE, text=True)
    try:
        base_url = re.search(r"http://\S+/v1", server.stdout.readline()).group(0)
        fast = concurrent_run(base_url, args.requests, args.concurrency)
        print(f"pipeline.backends, concurrency {args.concurrency}: {args.requests / fast:7.1f} requests/s "
              f"({fast:.1f} s)", flush=True)
        slow = sequential_run(base_url, args.requests)
        print(f"one after another:                {args.requests / slow:7.1f} requests/s ({slow:.1f} s)")
    finally:
        server.terminate()
        server.wait()
    print(f"concurrent vs sequential: {slow / fast:.1f}x")


if __name__ == "__main__":
    main()
