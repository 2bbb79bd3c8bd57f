# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Serve a fine-tuned reader over HTTP (LitServe): POST a question and a context, get the answer as JSON.

    python scripts/serve.py --path out/finetune/lora/final            # = lit-qa serve --path ...
    curl -s localhost:8000/predict -d '{"question": "Who ruled Normandy?", "context": "..."}'
    curl -s localhost:8000/predict -d '[{"question": ..., "context": ...}, ...]'     # a list of answers

The folder is loaded as `lit_qa.evaluation.reader.Reader.load` loads it (a LoRA, an adapter or a full checkpoint,
with its saved threshold), once per worker and before the port opens; ``GET /health`` answers 200 from then on.
Concurrent requests are batched (``--max_batch_size`` within ``--batch_timeout`` seconds) and answered with one
reader call; the answers are those of the reader in Python, one request at a time or not. Bad requests get a 4xx and
a one-line ``detail``. There is no authentication: keep the default ``--host 127.0.0.1``, or put it behind a proxy
(howto/serve.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from lit_qa.errors import LitQAError, run_cli
from lit_qa.evaluation.reader import folder_kind
from lit_qa.evaluation.serving import DEFAULT_MAX_CONTEXT_CHARS, DEFAULT_MAX_QUESTIONS, ReaderAPI, RequestCheck

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # the hosts LitServe binds to


def main(
    path: Path,
    checkpoint_dir: Path | None = None,
    quantize: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    na_threshold: float | Literal["auto", "off"] | None = "auto",
    max_new_tokens: int = 32,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 32,
    batch_timeout: float = 0.05,
    max_context_chars: int = DEFAULT_MAX_CONTEXT_CHARS,
    max_questions: int = DEFAULT_MAX_QUESTIONS,
    workers_per_device: int = 1,
    timeout: float = 60.0,
) -> None:
    """Serve a reader on ``http://host:port/predict`` until interrupted (Ctrl-C).

    Arguments:
        path: A LoRA, adapter or full checkpoint folder, as `Reader.load` takes it.
        checkpoint_dir: A LoRA's or adapter's base checkpoint; default: the one its base_checkpoint.json records.
        quantize: As the evaluate scripts' flag (bnb.nf4, bnb.int8, ...); the model is quantized once, at start-up.
        device: "auto" (a GPU if there is one, else the CPU), "cpu" or "cuda". Each worker gets its own copy.
        precision: As the evaluate scripts' flag ("auto", "32-true", "bf16-true", ...).
        na_threshold: "auto": the threshold and rule saved with the weights (else 0.5, with a warning); a number in
            [0, 1]; "off": plain span decoding, no abstaining.
        max_new_tokens: The longest answer, in tokens.
        host: The address to listen on: 127.0.0.1 (this machine only), 0.0.0.0 or :: (every interface; there is no
            authentication, see howto/serve.md).
        port: The port to listen on.
        max_batch_size: Most requests answered together; 1 answers one request at a time.
        batch_timeout: Seconds a batch waits to fill up before it is answered with what it has.
        max_context_chars: Longest context accepted, in characters; a longer one gets 413. The model reads only the
            first window of a long context anyway.
        max_questions: Most (question, context) objects in one request's JSON array; more get 413.
        workers_per_device: Model copies (processes) per device; each answers its own batches.
        timeout: Seconds a request may wait in the queue before it gets 504.
    """
    import litserve as ls  # here: `--help` should not wait for the server's imports

    # Everything that can be checked without the model fails here, in one line, before a worker is started.
    if host not in HOSTS:
        raise LitQAError(f"--host must be one of {', '.join(HOSTS)}, got {host!r} (LitServe binds to no other)")
    if not 1024 <= port <= 65535:
        raise LitQAError(f"--port must be in 1024..65535, got {port}")
    if min(max_batch_size, max_context_chars, max_questions, workers_per_device) < 1 or batch_timeout < 0 or timeout <= 0:
        raise LitQAError("--max_batch_size, --max_context_chars, --max_questions and --workers_per_device must be >= 1, "
                         "--batch_timeout >= 0 and --timeout > 0")  # fmt: skip
    folder_kind(Path(path))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    accelerator = torch.device(device).type
    if accelerator not in ("cpu", "cuda"):
        raise LitQAError(f"--device must be auto, cpu or cuda, got {device!r}")

    load_kwargs = dict(checkpoint_dir=checkpoint_dir, quantize=quantize, precision=precision, na_threshold=na_threshold,
                       max_new_tokens=max_new_tokens, device=device if ":" in device else "auto")  # fmt: skip
    api = ReaderAPI(path, load_kwargs, max_batch_size=max_batch_size, batch_timeout=batch_timeout)
    check = (RequestCheck, {"api_path": api.api_path, "max_context_chars": max_context_chars,
                            "max_questions": max_questions})  # fmt: skip
    server = ls.LitServer(api, accelerator=accelerator, devices=1 if accelerator == "cpu" or ":" in device else "auto",
                          workers_per_device=workers_per_device, timeout=timeout, middlewares=[check])  # fmt: skip
    print(f"serving {path} on http://{host}:{port}{api.api_path} (batches of up to {max_batch_size}, "
          f"{batch_timeout} s to fill up); health: http://{host}:{port}/health", flush=True)  # fmt: skip
    try:
        server.run(host=host, port=port, generate_client_file=False)
    except RuntimeError as e:  # LitServe's word for a worker whose setup (the model's loading) raised
        if "failed to start" in str(e):
            raise LitQAError(f"the model did not load: {e} (the worker's error is printed above)") from None
        raise


if __name__ == "__main__":
    run_cli(main)
