# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The `Reader` behind an HTTP server, on LitServe (scripts/serve.py runs it)::

    POST /predict  {"question": "Who ruled Normandy?", "context": "..."}   ->  the ReaderAnswer's fields as JSON
    POST /predict  [{"question": ..., "context": ...}, ...]                 ->  a list of them, in the same order
    GET  /health   200 "ok" once the model is loaded, 503 before

Concurrent requests are batched by LitServe (``max_batch_size`` requests, ``batch_timeout``) and a batch — all the
pairs of its requests — is answered with one ``reader(pairs)`` call, so questions on the same context share its
prefill. Batching changes speed, never answers (`Reader.answer_batch`).

Requests are checked in the HTTP process (`RequestCheck`), before they are queued for the model: LitServe fails a
whole batch when one of its requests raises, so a bad request must never reach a batch, where it would take good
requests down with it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import litserve as ls
import torch

from lit_qa.evaluation.reader import Reader, ReaderAnswer

DEFAULT_MAX_CONTEXT_CHARS = 20_000  # ~5k tokens: well past a SQuAD context; the model reads only its first window
DEFAULT_MAX_QUESTIONS = 32  # per request (a JSON array); a request is one item of a server batch, whatever its size
FIELDS = ("question", "context")


class BadRequest(Exception):
    """A request refused with an HTTP status (4xx) and a one-line reason."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def max_body_bytes(max_context_chars: int, max_questions: int) -> int:
    """The largest body read at all: ``max_questions`` contexts at their longest, every character escaped as a JSON
    surrogate pair (``\\ud83d\\ude00``, 12 bytes), plus room for the questions. A longer body is refused before it
    is read whole."""
    return max_questions * (12 * max_context_chars + 65_536)


def check_request(body: bytes, max_context_chars: int, max_questions: int) -> list[tuple[str, str]] | tuple[str, str]:
    """The (question, context) of one request body, or a list of them for a JSON array; else `BadRequest`.

    Raises:
        BadRequest: 400 if the body is not JSON; 422 if it is not an object with string ``question`` and ``context``
            fields, both non-empty (whitespace alone counts as empty, as `Reader` has it), or a non-empty array of
            such objects; 413 if a context is longer than ``max_context_chars`` characters or an array holds more
            than ``max_questions`` objects.
    """
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(400, f"the body is not JSON ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    if isinstance(payload, list):
        if not payload:
            raise BadRequest(422, "the array of questions is empty")
        if len(payload) > max_questions:
            raise BadRequest(413, f"{len(payload)} questions in one request, more than the server's "
                                  f"--max_questions {max_questions}")  # fmt: skip
        return [checked_pair(item, max_context_chars, f"item {i}: ") for i, item in enumerate(payload)]
    return checked_pair(payload, max_context_chars)


def checked_pair(payload: Any, max_context_chars: int, where: str = "") -> tuple[str, str]:
    """One request object's (question, context) (`check_request`); ``where`` starts each message."""
    if not isinstance(payload, dict):
        raise BadRequest(422, f'{where}expected a JSON object {{"question": ..., "context": ...}} or an array of '
                              f"them, got {json_type(payload)}")  # fmt: skip
    for name in FIELDS:
        if name not in payload:
            raise BadRequest(422, f"{where}missing field {name!r}")
        if not isinstance(payload[name], str):
            raise BadRequest(422, f"{where}field {name!r} must be a string, got {json_type(payload[name])}")
        if not payload[name].strip():
            raise BadRequest(422, f"{where}field {name!r} is empty")
    if len(payload["context"]) > max_context_chars:
        raise BadRequest(413, f"{where}the context has {len(payload['context'])} characters, more than the server's "
                              f"--max_context_chars {max_context_chars}")  # fmt: skip
    return payload["question"], payload["context"]


def json_type(value: Any) -> str:
    """A JSON value's type by its JSON name, for messages."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


class RequestCheck:
    """ASGI middleware: every POST to ``api_path`` passes `check_request` (in the HTTP process), or is answered
    with its 4xx status and ``{"detail": "<one line>"}`` (FastAPI's own error shape) without reaching the model."""

    def __init__(self, app: Callable, api_path: str = "/predict", max_context_chars: int = DEFAULT_MAX_CONTEXT_CHARS,
                 max_questions: int = DEFAULT_MAX_QUESTIONS):  # fmt: skip
        self.app, self.api_path = app, api_path
        self.max_context_chars, self.max_questions = max_context_chars, max_questions

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.api_path:
            await self.app(scope, receive, send)
            return
        limit = max_body_bytes(self.max_context_chars, self.max_questions)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                await respond(send, 413, f"the body is over {limit} bytes (--max_context_chars, --max_questions)")
                return
        body = b"".join(chunks)
        try:
            check_request(body, self.max_context_chars, self.max_questions)
        except BadRequest as e:
            await respond(send, e.status, e.detail)
            return
        sent = False

        async def replay() -> dict:  # the body was read here: hand it on once, then whatever comes next
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def respond(send: Callable, status: int, detail: str) -> None:
    """Send a JSON error response ``{"detail": detail}``."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ReaderAPI(ls.LitAPI):
    """A `Reader` as a LitServe API: loaded once per worker in `setup` (LitServe opens the port only when a worker
    is set up), then each batch of requests answered with one ``reader(pairs)`` call.

    Args:
        path: The folder `Reader.load` loads (a LoRA, an adapter or a full checkpoint).
        load_kwargs: `Reader.load`'s keywords (``checkpoint_dir``, ``quantize``, ``precision``, ``na_threshold``,
            ...). ``device`` there: "auto" takes the device LitServe gives the worker.
        max_batch_size, batch_timeout: LitServe's dynamic batching: up to ``max_batch_size`` requests that arrive
            within ``batch_timeout`` seconds are answered together; 1 answers one request at a time.
    """

    def __init__(self, path: Path, load_kwargs: dict[str, Any], max_batch_size: int = 32, batch_timeout: float = 0.05):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.path, self.load_kwargs = Path(path), dict(load_kwargs)
        self.reader: Reader | None = None

    def setup(self, device: str) -> None:
        """Load the reader on the worker's device (``device`` unless ``load_kwargs`` name one)."""
        kwargs = dict(self.load_kwargs)
        if kwargs.get("device", "auto") == "auto":
            kwargs["device"] = device
        if kwargs["device"].startswith("cuda:"):  # LitServe numbers the GPUs; lit-qa's "cuda" is the current one
            torch.cuda.set_device(torch.device(kwargs["device"]))
            kwargs["device"] = "cuda"
        # Reader.answer_batch decodes decoding.batch_size questions at a time: a server batch is one model batch.
        kwargs.setdefault("batch_size", self.max_batch_size)
        self.reader = Reader.load(self.path, **kwargs)

    def decode_request(self, request):  # no annotation: LitServe would have FastAPI parse the body as that type
        """The pair, or list of pairs, of a request `RequestCheck` has already checked."""
        if isinstance(request, list):
            return [(item["question"], item["context"]) for item in request]
        return request["question"], request["context"]

    def batch(self, inputs: list) -> list:
        """A batch is the list of its requests' pairs (LitServe's default would try to stack them as tensors)."""
        return list(inputs)

    def predict(self, requests: list) -> list:
        """Answer every pair of a batch of requests with one reader call, then hand each request its answers: a
        `ReaderAnswer` for a pair, a list of them for a list. With ``max_batch_size`` 1 LitServe passes one request
        alone, not in a list."""
        batched = self.max_batch_size > 1
        requests = requests if batched else [requests]
        pairs = [pair for request in requests for pair in (request if isinstance(request, list) else [request])]
        answers, outputs = iter(self.reader(pairs)), []
        for request in requests:
            outputs.append([next(answers) for _ in request] if isinstance(request, list) else next(answers))
        return outputs if batched else outputs[0]

    def unbatch(self, outputs: list) -> list:
        """One output per request, in the batch's order."""
        return list(outputs)

    def encode_response(self, output: ReaderAnswer | list[ReaderAnswer]):  # no annotation: FastAPI would check it
        """The `ReaderAnswer`'s fields (answer, start, end, score, no_answer_probability, abstained, best_span, ...),
        or a list of them."""
        if isinstance(output, list):
            return [dataclasses.asdict(answer) for answer in output]
        return dataclasses.asdict(output)
