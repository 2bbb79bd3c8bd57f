# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The HTTP server (scripts/serve.py, lit_qa/evaluation/serving.py): a real server in a subprocess on a tiny random
checkpoint with a saved threshold answers concurrent clients exactly as the `Reader` does in this process, refuses
malformed requests with a 4xx and a one-line reason, and keeps answering after them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import REPO, make_tiny_checkpoint
from test_evaluation import sample_questions
from test_reader import PREPARED, save_threshold

from lit_qa.evaluation.reader import Reader
from lit_qa.evaluation.serving import BadRequest, check_request

THRESHOLD = 0.5
FLAGS = dict(device="cpu", precision="32-true", max_new_tokens=4)
MAX_CONTEXT_CHARS = 2000
MAX_QUESTIONS = 5
START_TIMEOUT_S = 45  # a loaded 2-core machine: imports, two spawned processes and the model's loading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes, timeout: float = 20) -> tuple[int, dict]:
    """POST ``body`` as JSON; (status, decoded JSON) whatever the status."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny random full checkpoint, fine-tuned in name: prompt settings and a saved threshold."""
    root = tmp_path_factory.mktemp("serve")
    full = shutil.copytree(make_tiny_checkpoint(root), root / "full")
    (full / "prepare_config.json").write_text(json.dumps(PREPARED))
    save_threshold(full, THRESHOLD)
    return full


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    """scripts/serve.py on a free port, healthy; its base URL. Killed (its process group) at the end."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    args = [sys.executable, str(REPO / "scripts/serve.py"), "--path", str(folder), "--port", str(port),
            "--max_batch_size", "4", "--batch_timeout", "0.05", "--max_context_chars", str(MAX_CONTEXT_CHARS),
            "--max_questions", str(MAX_QUESTIONS),
            *(f"--{name}={value}" for name, value in FLAGS.items())]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as out:
        process = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"the server exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no /health in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet (the port opens once the model is loaded), or 503
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and the processes it started
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever is left of its group (an HTTP process waiting on a connection)
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)


def pairs() -> list[tuple[str, str]]:
    """16 questions: several on each context (batched together), some answerable, some not, one windowed."""
    base = [(q.question, q.context) for q in sample_questions()]
    more = [(question, context) for _, context in base[:3]
            for question in ("Who ruled the duchy of Normandy?", "When were the Normans in Normandy?")]  # fmt: skip
    extra = [("Which river flows through Paris?", "Paris is on the Seine. The Normans were in Normandy.")] * 4
    return base + more + extra


def test_concurrent_clients_get_the_readers_answers(folder, server):
    asked = pairs()
    expected = Reader.load(folder, **FLAGS)(asked)
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda pair: post(f"{server}/predict", json.dumps(
            {"question": pair[0], "context": pair[1]}).encode()), asked))  # fmt: skip
    assert [status for status, _ in replies] == [200] * len(asked)
    for (_, got), want, (_, context) in zip(replies, expected, asked, strict=True):
        assert (got["answer"], got["start"], got["end"], got["abstained"]) == (want.answer, want.start, want.end,
                                                                               want.abstained)  # fmt: skip
        assert got["no_answer_probability"] == pytest.approx(want.no_answer_probability, abs=1e-5)
        assert got["best_span"] == want.best_span and set(got) == set(want.__dataclass_fields__)


def test_a_list_of_questions_gets_a_list_of_answers(folder, server):
    asked = pairs()[:5]
    expected = Reader.load(folder, **FLAGS)(asked)
    bodies = [[{"question": q, "context": c} for q, c in asked], *({"question": q, "context": c} for q, c in asked)]
    with ThreadPoolExecutor(6) as pool:  # the list and single questions at once: in one server batch, mixed
        replies = list(pool.map(lambda body: post(f"{server}/predict", json.dumps(body).encode()), bodies))
    assert [status for status, _ in replies] == [200] * 6
    status, got = replies[0]
    singles = [reply for _, reply in replies[1:]]  # in other server batches: p_na equal to float rounding, not bits
    assert [(a["answer"], a["start"], a["end"]) for a in singles] == [(a["answer"], a["start"], a["end"]) for a in got]
    assert [a["no_answer_probability"] for a in singles] == pytest.approx([a["no_answer_probability"] for a in got],
                                                                          abs=1e-5)  # fmt: skip
    assert [a["answer"] for a in got] == [a.answer for a in expected]
    assert [a["no_answer_probability"] for a in got] == pytest.approx([a.no_answer_probability for a in expected],
                                                                      abs=1e-5)  # fmt: skip


@pytest.mark.parametrize(
    "body, status, reason",
    [
        (b"not json", 400, "the body is not JSON"),
        (b'"a"', 422, "expected a JSON object"),
        (b'[{"question": "Who?", "context": "Hills."}, "b"]', 422, "item 1: expected a JSON object"),
        (b"[]", 422, "the array of questions is empty"),
        (json.dumps([{"question": "Who?", "context": "Hills."}] * (MAX_QUESTIONS + 1)).encode(), 413,
         f"6 questions in one request, more than the server's --max_questions {MAX_QUESTIONS}"),
        (b'{"question": "Who?"}', 422, "missing field 'context'"),
        (b'{"question": 3, "context": "Hills."}', 422, "field 'question' must be a string, got a number"),
        (b'{"question": "Who?", "context": "  "}', 422, "field 'context' is empty"),
        (json.dumps({"question": "Who?", "context": "x" * (MAX_CONTEXT_CHARS + 1)}).encode(), 413,
         f"more than the server's --max_context_chars {MAX_CONTEXT_CHARS}"),
        (b'{"question": "Who?", "context": "' + b"x" * MAX_QUESTIONS * (12 * MAX_CONTEXT_CHARS + 70_000) + b'"}', 413,
         "the body is over"),
    ],
    ids=["not-json", "string", "bad-item", "empty-list", "too-many", "missing", "wrong-type", "empty", "too-long", "huge-body"],
)
def test_bad_requests_get_a_4xx_with_one_line_and_the_server_goes_on(server, body, status, reason):
    got, reply = post(f"{server}/predict", body)
    assert got == status and reason in reply["detail"] and "\n" not in reply["detail"], reply
    good = {"question": "Who ruled the duchy of Normandy?", "context": "The Normans were in Normandy."}
    assert post(f"{server}/predict", json.dumps(good).encode())[0] == 200


def test_check_request_unit():
    assert check_request(b'{"question": "q", "context": "c", "id": 1}', 5, 2) == ("q", "c")
    assert check_request(b'[{"question": "q", "context": "c"}]', 5, 2) == [("q", "c")]
    with pytest.raises(BadRequest, match="more than the server's --max_context_chars 5") as e:
        check_request(b'{"question": "q", "context": "context"}', 5, 2)
    assert e.value.status == 413
    with pytest.raises(BadRequest, match="not JSON"):
        check_request(b"\xff\xfe", 5, 2)
