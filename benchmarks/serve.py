# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The HTTP server (scripts/serve.py) batched vs one request at a time: requests/s and latency at 1, 8, 32 clients.

    python -m benchmarks.serve                                                   # a small random model (default)
    python -m benchmarks.serve --checkpoint_dir checkpoints/SmolLM2-135M-Instruct  # the real model

Two real servers in the same run on the same machine, on the same folder: one with dynamic batching
(``--max_batch_size`` requests within ``--batch_timeout`` seconds answered in one reader call), one with
``--max_batch_size 1``. For each number of concurrent clients (threads, each sending one request after another),
each server answers the same ``--requests`` (question, context) pairs — four questions per context, in a row, as a
reading app asks them — after a warm-up; the two servers take turns, ``--rounds`` times, and the fastest turn
counts. The table shows requests/s and the median and 95th percentile latency; every
answer (text, offsets, p_na) must be the same from both servers, or the run fails. The default random model makes
the HTTP and queueing overhead large next to the model; a real model shows what batching buys when the model is
the cost.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch

from benchmarks.utils import describe_machine, print_table, write_results
from lit_qa.checkpoints.folder import save_checkpoint
from lit_qa.errors import LitQAError, run_cli
from lit_qa.models.config import Config
from lit_qa.models.model import GPT

REPO = Path(__file__).resolve().parents[1]
CONTEXTS = [
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France. "
    "They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, under their leader "
    "Rollo, agreed to swear fealty to King Charles III of West Francia.",
    "The Amazon rainforest covers much of the Amazon basin of South America. This basin encompasses seven million "
    "square kilometres, of which five and a half million square kilometres are covered by the rainforest. The "
    "region includes territory belonging to nine nations; the majority of the forest is contained within Brazil.",
    "Victoria is the second most populous state of Australia. Its capital and largest city is Melbourne, which was "
    "founded in 1835. The state was separated from New South Wales in 1851 and became a state of the Commonwealth "
    "in 1901. Gold was discovered near Ballarat in the same year it became a colony.",
    "The University of Chicago is a private research university in Chicago, Illinois. It was founded in 1890 by the "
    "American Baptist Education Society with a donation from the oil magnate John D. Rockefeller. Its main campus "
    "is in the Hyde Park neighborhood, seven miles south of downtown.",
]
QUESTIONS = ["Who gave their name to Normandy?", "When was it founded?", "Which country holds the majority?",
             "Who was the leader?", "Where is the main campus?", "What was discovered?", "What is the capital?",
             "How large is the basin?"]  # fmt: skip
# A small random model with a real byte-level tokenizer: the shape of a tiny LLaMA, fast on a CPU.
SMALL = dict(name="serve-bench", block_size=512, vocab_size=1024, n_layer=4, n_head=8, n_query_groups=4, n_embd=256,
             intermediate_size=688)  # fmt: skip


def small_random_checkpoint(root: Path) -> Path:
    """A random `SMALL` model with a byte-level BPE tokenizer trained on the benchmark's texts, as a lit checkpoint
    folder in ``root/small``."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    texts = CONTEXTS + QUESTIONS + ["### Context: ### Question: ### Answer: unanswerable Unanswerable"]
    tokenizer.train_from_iterator(texts * 10, trainer=trainer)
    (root / "tokenizer").mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(root / "tokenizer" / "tokenizer.json"))
    (root / "tokenizer" / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))  # fmt: skip
    torch.manual_seed(0)
    config = Config(**SMALL)
    files = {name: root / "tokenizer" / name for name in ("tokenizer.json", "tokenizer_config.json")}
    return save_checkpoint(root / "small", config, GPT(config).state_dict(), extra_files=files)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """scripts/serve.py in a subprocess (its own process group, killed whole on exit), waited on until healthy."""

    def __init__(self, folder: Path, max_batch_size: int, batch_timeout: float, flags: dict[str, str], log: Path):
        self.port = free_port()
        args = [sys.executable, str(REPO / "scripts/serve.py"), "--path", str(folder), "--port", str(self.port),
                "--max_batch_size", str(max_batch_size), "--batch_timeout", str(batch_timeout),
                *(f"--{name}={value}" for name, value in flags.items())]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.log = log
        with open(log, "w") as out:
            self.process = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}/predict"

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LitQAError(f"the server exited; its log: {self.log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.3)
        raise LitQAError(f"the server was not healthy in {timeout_s} s; its log: {self.log}")

    def stop(self) -> None:
        """SIGTERM to the server's group, then SIGKILL to whatever of it is left (an HTTP process may still be waiting
        on open connections)."""
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=15)


def ask(url: str, pair: tuple[str, str]) -> dict[str, Any]:
    body = json.dumps({"question": pair[0], "context": pair[1]}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def load_test(url: str, pairs: list[tuple[str, str]], clients: int) -> tuple[dict[str, float], list[dict]]:
    """``clients`` threads share ``pairs``, each sending one request after another; the pairs' answers, in order,
    and requests/s, p50 and p95 latency (ms)."""
    answers: list[dict | None] = [None] * len(pairs)
    latencies: list[float] = []
    errors: list[BaseException] = []
    next_index, lock = [0], threading.Lock()

    def client() -> None:
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= len(pairs):
                return
            start = time.perf_counter()
            try:
                answers[i] = ask(url, pairs[i])
            except Exception as e:  # noqa: BLE001 - reported after the run
                errors.append(e)
                return
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise LitQAError(f"{len(errors)} requests failed, the first: {errors[0]}")
    ordered = sorted(latencies)
    stats = {"requests_per_s": len(pairs) / wall, "p50_ms": 1000 * statistics.median(ordered),
             "p95_ms": 1000 * ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]}  # fmt: skip
    return stats, answers


def same_answers(a: list[dict], b: list[dict]) -> bool:
    """Text, offsets and abstaining equal; p_na equal to 1e-5 (batched float sums differ in the last bits)."""
    for x, y in zip(a, b, strict=True):
        if (x["answer"], x["start"], x["end"], x["abstained"]) != (y["answer"], y["start"], y["end"], y["abstained"]):
            return False
        if (x["no_answer_probability"] is None) != (y["no_answer_probability"] is None):
            return False
        if x["no_answer_probability"] is not None and abs(x["no_answer_probability"] - y["no_answer_probability"]) > 1e-5:
            return False
    return True


def main(
    checkpoint_dir: Path | None = None,
    clients: tuple[int, ...] = (1, 8, 32),
    requests: int = 64,
    rounds: int = 2,
    max_batch_size: int = 32,
    batch_timeout: float = 0.05,
    device: str = "cpu",
    precision: str = "32-true",
    max_new_tokens: int = 8,
    out: Path = Path("out/benchmarks/serve.json"),
) -> dict[str, Any]:
    """Print requests/s and p50/p95 latency of a batched and an unbatched server at each client count; write JSON.

    Args:
        checkpoint_dir: A folder scripts/serve.py serves (a LoRA, adapter or full checkpoint); None: a small random
            model built in a temporary folder.
        clients: Numbers of concurrent clients.
        requests: Requests per client count and server (the same pairs for both servers).
        rounds: Turns of each server at each client count; the fastest counts (requests/s and its latencies).
        max_batch_size: The batched server's ``--max_batch_size`` (the other has 1).
        batch_timeout: The batched server's ``--batch_timeout``.
        device, precision, max_new_tokens: As scripts/serve.py's flags.
        out: Where to write the JSON results.
    """
    # --timeout: a long queue is what is measured here, not refused (a request waiting longer than it gets 504).
    flags = {"device": device, "precision": precision, "max_new_tokens": str(max_new_tokens), "na_threshold": "0.5",
             "timeout": "900"}  # fmt: skip
    pairs = [(QUESTIONS[(i + c) % len(QUESTIONS)], CONTEXTS[c]) for i in range(requests)
             for c in [i // 4 % len(CONTEXTS)]]  # fmt: skip
    warm_up = pairs[: 2 * max_batch_size]
    results: dict[str, dict[int, dict[str, float]]] = {"batched": {}, "unbatched": {}}
    answers: dict[str, dict[int, list[dict]]] = {"batched": {}, "unbatched": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = checkpoint_dir or small_random_checkpoint(Path(tmp))
        # Both servers up at once (an idle one waits on its queue): the two take turns at each client count, so a
        # change in a shared machine's load falls on both alike; the best of ``rounds`` turns counts.
        servers = {}
        try:
            for name, batch in (("batched", max_batch_size), ("unbatched", 1)):
                servers[name] = Server(folder, batch, batch_timeout if batch > 1 else 0.0, flags, Path(tmp) / name)
            for server in servers.values():
                server.wait_healthy(300)
                load_test(server.url, warm_up, max_batch_size)
            for n in clients:
                for turn in range(rounds):
                    for name in (("batched", "unbatched") if turn % 2 == 0 else ("unbatched", "batched")):
                        stats, got = load_test(servers[name].url, pairs, n)
                        print(f"{name}, {n} clients, turn {turn + 1}: {stats['requests_per_s']:.1f} req/s", flush=True)
                        answers[name][n] = got
                        if stats["requests_per_s"] > results[name].get(n, {}).get("requests_per_s", 0.0):
                            results[name][n] = stats
        finally:
            for server in servers.values():
                server.stop()
    reference = answers["unbatched"][clients[0]]
    identical = all(same_answers(reference, got) for runs in answers.values() for got in runs.values())
    rows = []
    for n in clients:
        for name in ("batched", "unbatched"):
            r = results[name][n]
            rows.append({"clients": n, "server": name, "max_batch_size": max_batch_size if name == "batched" else 1,
                         "requests/s": r["requests_per_s"], "p50 ms": r["p50_ms"], "p95 ms": r["p95_ms"],
                         "batched/unbatched": results["batched"][n]["requests_per_s"]
                         / results["unbatched"][n]["requests_per_s"] if name == "batched" else ""})  # fmt: skip
    print_table(rows)
    print(f"answers identical across servers and client counts: {identical}")
    payload = {"machine": describe_machine(), "model": str(checkpoint_dir or f"random {SMALL}"), "device": device,
               "precision": precision, "max_new_tokens": max_new_tokens, "requests": requests,
               "batch_timeout": batch_timeout, "rounds": rounds, "rows": rows, "answers_identical": identical}  # fmt: skip
    write_results(out, payload)
    if not identical:
        raise LitQAError("the batched and unbatched servers answered differently")
    return payload


if __name__ == "__main__":
    run_cli(main)
