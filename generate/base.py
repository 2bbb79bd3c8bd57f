# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Generate text from a converted checkpoint with the KV cache.

    python generate/base.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct \
        --prompt "The capital of France is" --max_new_tokens 50

Sampling: ``--temperature 0.8 --top_k 50 --top_p 0.95`` (temperature 0 is greedy decoding).

Fast: ``--quantize int4`` (or int8) stores the block linears in 4 (8) bits and decodes with torch's int4 (int8)
weight-only kernels: 3.4x (2.9x) transformers' fp32 tokens/s at batch 1 on a 2-core CPU (benchmarks/bandwidth.py).
Quantized: ``--quantize bnb.nf4`` (or bnb.fp4, bnb.int8) quantizes the block linears after loading;
``--quantize gptq.int4 --gptq_checkpoint FOLDER`` loads a model that scripts/quantize_gptq.py wrote to FOLDER
(the tokenizer still comes from ``--checkpoint_dir``). The size of the weights is printed with the load time.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from lit_qa.checkpoints.inference import load_for_inference
from lit_qa.errors import LitQAError, run_cli
from lit_qa.generation.generate import check_sampling_args, generate
from lit_qa.models.tokenizer import Tokenizer, check_vocab_matches
from lit_qa.precision import inference_precision, weights_dtype
from lit_qa.quantize import check_quantize_args, weights_size_bytes


def main(
    checkpoint_dir: Path = Path("checkpoints/SmolLM2-135M-Instruct"),
    prompt: str = "What food do llamas eat?",
    max_new_tokens: int = 50,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    precision: str = "auto",
    device: str = "auto",
    seed: int = 1234,
    quantize: str | None = None,
    gptq_checkpoint: Path | None = None,
) -> None:
    """Print continuations of ``prompt`` and the decoding speed.

    Args:
        checkpoint_dir: A lit checkpoint folder (see scripts/convert_checkpoint.py).
        prompt: Text to continue.
        max_new_tokens: Maximum number of tokens to generate per sample.
        num_samples: How many continuations to generate (decoded together as one batch).
        temperature: 0 for greedy decoding; higher values sample more randomly.
        top_k: Sample only among the k most likely tokens.
        top_p: Sample only among the most likely tokens whose probabilities add up to p.
        precision: "auto" (bf16 on GPUs and CPUs with native bf16, fp32 elsewhere), "32-true", "bf16-true", "16-true".
        device: "auto", "cpu" or "cuda".
        seed: Random seed for sampling.
        quantize: Quantize the model: "bnb.int8", "bnb.nf4", "bnb.fp4" (bitsandbytes, applied after loading), "int8" /
            "int4" (weight-only: fewer bytes per decoding step, the fastest modes; int4 needs bf16 activations) or
            "gptq.int4" (loaded from ``gptq_checkpoint``); None keeps full precision.
        gptq_checkpoint: A folder written by scripts/quantize_gptq.py; only with ``--quantize gptq.int4``.
    """
    check_sampling_args(temperature, top_k, top_p)
    check_quantize_args(quantize, gptq_checkpoint)
    if max_new_tokens < 1 or num_samples < 1:
        raise LitQAError("--max_new_tokens and --num_samples must be >= 1")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    precision = inference_precision(precision, device)
    torch.manual_seed(seed)

    t0 = time.perf_counter()
    model, config = load_for_inference(checkpoint_dir, device, weights_dtype(precision), quantize, gptq_checkpoint)
    tokenizer = Tokenizer(checkpoint_dir)
    check_vocab_matches(tokenizer, config.padded_vocab_size, checkpoint_dir)
    model.eval()
    print(f"Loaded {config.name} ({precision}, {quantize or 'not quantized'}, {weights_size_bytes(model) / 1e6:.1f} MB "
          f"of weights) in {time.perf_counter() - t0:.2f} s", file=sys.stderr)  # fmt: skip

    encoded = tokenizer.encode(prompt, device=device)
    model.max_seq_length = min(config.block_size, encoded.numel() + max_new_tokens)
    t0 = time.perf_counter()
    outputs = generate(
        model, [encoded] * num_samples, max_new_tokens, temperature, top_k, top_p, stop_ids=tokenizer.eos_ids
    )
    elapsed = time.perf_counter() - t0
    for tokens in outputs:
        print(prompt + tokenizer.decode(tokens))
    new_tokens = sum(t.numel() for t in outputs)
    print(f"{new_tokens} new tokens in {elapsed:.2f} s: {new_tokens / elapsed:.1f} tokens/s", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
