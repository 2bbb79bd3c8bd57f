# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""How much does a model know about answerability? A linear probe on its hidden states, layer by layer.

    python scripts/probe_answerability.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct \\
        --train_file ../shared/data/squad2/demo-train-v2.0.json \\
        --eval_file ../shared/data/squad2/demo-eval-v2.0.json --train_questions 4000 --limit 500

SQuAD 2.0 F1 needs the model to decline when the passage holds no answer. This script asks whether that
information is in the model at all: it runs each question's prompt (as `evaluate/*.py` builds it), takes every
layer's hidden state at the prompt's last token, fits an L2-regularised logistic regression per layer on the
training questions (answerable vs not), and reports its ROC AUC on the evaluation questions (0.5 = chance).
The regularisation strength (per layer) and the layer reported as best are picked on a held-out fifth of
the training questions, so the evaluation questions choose nothing. Compare the
best AUC with ``na_prob_auc`` in an evaluation's metrics.json: if even the best probe is weak, no threshold
or decoding rule can make the model abstain well, and more data, training or a larger model is what helps.

Writes ``probe.json`` (AUC per layer, the settings) to ``--out_dir``. Forward passes only: about as fast as
prefilling the same prompts for evaluation.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lit_qa.checkpoints.folder import load_model
from lit_qa.checkpoints.lora import check_lora_dir, load_lora_checkpoint
from lit_qa.data.prepare import QuestionEncoder
from lit_qa.data.squad import Question, load_squad, select_subset
from lit_qa.errors import LitQAError, run_cli
from lit_qa.evaluation.answering import prompt_for
from lit_qa.evaluation.calibration import roc_auc
from lit_qa.evaluation.run import prompt_settings
from lit_qa.models.lora import merge_lora_weights
from lit_qa.models.model import GPT
from lit_qa.models.tokenizer import Tokenizer
from lit_qa.precision import resolve_device, resolve_precision, weights_dtype

L2_CHOICES = (1e-3, 1e-2, 1e-1)


def main(
    checkpoint_dir: Path = Path("checkpoints/SmolLM2-135M-Instruct"),
    lora_dir: Path | None = None,
    train_file: Path = Path("data/squad2/train-v2.0.json"),
    eval_file: Path = Path("data/squad2/dev-v2.0.json"),
    out_dir: Path = Path("out/probe_answerability"),
    train_questions: int = 4000,
    limit: int | None = 500,
    seed: int = 1234,
    batch_size: int = 8,
    prompt_style: str | None = None,
    precision: str = "auto",
    device: str = "auto",
    overwrite: bool = False,
) -> dict:
    """Fit an answerability probe on every layer's last-prompt-token hidden state and report its ROC AUC.

    Args:
        checkpoint_dir: The base model, a lit checkpoint folder.
        lora_dir: A LoRA adapter to merge in first (optional): probe the fine-tuned model.
        train_file: SQuAD 2.0 questions to fit the probes on (e.g. the training file).
        eval_file: SQuAD 2.0 questions to report AUC on; never used for fitting or choosing.
        out_dir: Where probe.json goes.
        train_questions: How many training questions (a seeded random sample) to fit on.
        limit: The evaluation subset, the same stratified one `evaluate/*.py --limit` takes with ``seed``.
        seed: Seed of both samples.
        batch_size: Prompts per forward pass.
        prompt_style: "plain" or "chat"; by default what the adapter (or checkpoint) was trained with.
        precision: "auto" (bf16 on GPUs and on CPUs with native bf16, 32-true elsewhere), "32-true", "bf16-true", ...
        device: "auto", "cpu" or "cuda".
        overwrite: Replace an existing probe.json.
    """
    if train_questions < 10 or batch_size < 1:
        raise LitQAError(f"--train_questions must be >= 10 and --batch_size >= 1, got {train_questions}, {batch_size}")
    if (Path(out_dir) / "probe.json").exists() and not overwrite:
        raise LitQAError(f"{Path(out_dir) / 'probe.json'} exists; pass --overwrite true to replace it")
    trained_dir = lora_dir if lora_dir is not None else checkpoint_dir
    prompt_style, no_answer = prompt_settings(trained_dir, prompt_style, None, warn_if_unknown=False)
    train = sample_both_kinds(load_squad(train_file), train_questions, seed, train_file)
    evaluation = select_subset(load_squad(eval_file), limit, seed)
    if len({bool(q.answers) for q in evaluation}) < 2:
        raise LitQAError(f"{eval_file}: the evaluated questions must include answerable and unanswerable ones")
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    if lora_dir is not None:
        check_lora_dir(lora_dir)
        model, _, _ = load_lora_checkpoint(lora_dir, checkpoint_dir, device, weights_dtype(precision))
        merge_lora_weights(model)
    else:
        model, _ = load_model(checkpoint_dir, device, weights_dtype(precision))
    tokenizer = Tokenizer(checkpoint_dir)
    encoder = QuestionEncoder(tokenizer, model.max_seq_length, prompt_style, no_answer)

    start = time.perf_counter()
    train_x, train_y = last_token_states(model, encoder, train, batch_size, "train prompts")
    eval_x, eval_y = last_token_states(model, encoder, evaluation, batch_size, "eval prompts")
    seconds = time.perf_counter() - start
    layers = [fit_and_score(train_x[:, i], train_y, eval_x[:, i], eval_y, seed) for i in range(train_x.size(1))]
    best = max(range(len(layers)), key=lambda i: layers[i]["held_out_auc"])  # chosen without the evaluation set
    report = {
        "checkpoint_dir": str(checkpoint_dir), "lora_dir": str(lora_dir) if lora_dir else None,
        "train_file": str(train_file), "train_questions": len(train), "eval_file": str(eval_file),
        "eval_questions": len(evaluation), "seed": seed, "prompt_style": prompt_style, "precision": precision,
        "feature": "hidden state after each layer at the last prompt token", "forward_seconds": round(seconds, 1),
        "best_layer": best, "best_eval_auc": layers[best]["eval_auc"], "layers": layers,
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "probe.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report, out_dir))
    return report


def sample_both_kinds(questions: list[Question], n: int, seed: int, path: Path) -> list[Question]:
    """A seeded random sample of ``n`` questions (all if fewer), which must hold both kinds."""
    questions = list(questions)
    random.Random(seed).shuffle(questions)
    questions = questions[:n]
    if len({bool(q.answers) for q in questions}) < 2:
        raise LitQAError(f"{path}: the probe needs answerable and unanswerable training questions")
    return questions


@torch.no_grad()
def last_token_states(
    model: GPT, encoder: QuestionEncoder, questions: list[Question], batch_size: int, desc: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each layer's output at each prompt's last token, (N, n_layer, n_embd) in float32, and the labels (N,), 1 for
    unanswerable. Prompts are right-padded: under causal attention the padding after a prompt cannot change it."""
    prompts = [prompt_for(encoder, q)[0] for q in questions]
    states: dict[int, torch.Tensor] = {}
    hooks = [block.register_forward_hook(lambda _m, _i, out, i=i: states.__setitem__(i, out))
             for i, block in enumerate(model.transformer.h)]  # fmt: skip
    features = torch.empty(len(questions), len(hooks), model.config.n_embd)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad little
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", mininterval=1.0):
            rows = order[start : start + batch_size]
            lengths = torch.tensor([len(prompts[i]) for i in rows])
            batch = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
            for row, i in enumerate(rows):
                batch[row, : lengths[row]] = prompts[i]
            model.hidden_states(batch.to(device))
            last = (lengths - 1).to(device)
            for layer in range(len(hooks)):
                features[rows, layer] = states[layer][torch.arange(len(rows), device=device), last].float().cpu()
    finally:
        for hook in hooks:
            hook.remove()
    labels = torch.tensor([0.0 if q.answers else 1.0 for q in questions])
    return features, labels


def fit_and_score(
    train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor, seed: int
) -> dict[str, float]:
    """Pick the L2 strength on a held-out fifth of the training rows, refit on all of them, score ``eval_x``."""
    held_out = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))[: len(train_y) // 5]
    fit_rows = torch.ones(len(train_y), dtype=torch.bool)
    fit_rows[held_out] = False
    choice = {l2: auc(logistic_probe(train_x[fit_rows], train_y[fit_rows], l2)(train_x[held_out]), train_y[held_out])
              for l2 in L2_CHOICES}  # fmt: skip
    l2 = max(choice, key=lambda k: choice[k])
    probe = logistic_probe(train_x, train_y, l2)
    return {"l2": l2, "held_out_auc": round(choice[l2], 4), "eval_auc": round(auc(probe(eval_x), eval_y), 4)}


def logistic_probe(x: torch.Tensor, y: torch.Tensor, l2: float):
    """Fit p(unanswerable) = sigmoid(w·z + b) on standardised features z by L-BFGS; returns the scoring function."""
    mean, std = x.mean(0), x.std(0) + 1e-5
    z = (x - mean) / std
    w = torch.zeros(x.size(1), requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * w.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    w, b = w.detach(), b.detach()
    return lambda new_x: ((new_x - mean) / std) @ w + b


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return roc_auc(scores.tolist(), [bool(v) for v in labels.tolist()])


def format_report(report: dict, out_dir: Path) -> str:
    aucs = "  ".join(f"{i}:{layer['eval_auc']:.3f}" for i, layer in enumerate(report["layers"]))
    return (f"ROC AUC of a linear answerability probe on {report['eval_questions']} evaluation questions, by layer "
            f"(fitted on {report['train_questions']} training questions; 0.5 = chance):\n{aucs}\n"
            f"best layer on held-out training questions: {report['best_layer']}, "
            f"its eval AUC {report['best_eval_auc']:.3f}; "
            f"forward passes {report['forward_seconds']:.0f} s; wrote {out_dir / 'probe.json'}")  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
