# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Shared test helpers: a tiny checkpoint with a real tokenizer, and running the standalone scripts."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from lit_qa.checkpoints.folder import save_checkpoint
from lit_qa.models.config import Config
from lit_qa.models.model import GPT

REPO = Path(__file__).resolve().parents[1]
SHARED_SQUAD = REPO.parent / "shared" / "data" / "squad2"  # shared/ sits beside the repository, read-only

SENTENCES = [
    "Answer the question with a short span copied from the context.",
    "### Context: ### Question: ### Answer: unanswerable Unanswerable",
    "The Normans were in Normandy in the 10th and 11th centuries.",
    "Who ruled the duchy of Normandy? Which river flows through Paris?",
] * 10
# The tokenizer learns ~400 tokens; a vocabulary of 512 leaves room for them all.
TINY = dict(name="tiny-eval", block_size=256, vocab_size=512, n_layer=2, n_head=4, n_query_groups=2, n_embd=32,
            intermediate_size=64)  # fmt: skip


def make_tiny_tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer like SmolLM2's (~400 tokens), but with a BOS token the model expects."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES, trainer=trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    )
    return folder


def make_tiny_checkpoint(root: Path) -> Path:
    """A tiny random model saved as a lit checkpoint in ``root/tiny``, with `make_tiny_tokenizer`'s tokenizer."""
    tokenizer_dir = make_tiny_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    config = Config(**TINY)
    model = GPT(config)
    files = {name: tokenizer_dir / name for name in ("tokenizer.json", "tokenizer_config.json")}
    return save_checkpoint(root / "tiny", config, model.state_dict(), extra_files=files)


def sgd_step(model: torch.nn.Module, idx: torch.Tensor, lr: float = 0.5) -> None:
    """One SGD step on the next-token loss of ``idx`` (B, T), over the parameters that require grad."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, dims=1).flatten())
    loss.backward()
    optimizer.step()


def load_script(relative: str) -> ModuleType:
    """Import a script (evaluate/, finetune/ and scripts/ are not packages) as a module."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem + "_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def evaluate_script(relative: str, **flags) -> dict:
    """Run an evaluate script's ``main`` in this process with these flags (its ``Args``), as its command line would."""
    script = load_script(relative)
    return script.main(script.Args(**flags))


def run_script(relative: str, *args: str) -> subprocess.CompletedProcess:
    """Run a standalone script as a user would, from the repository root."""
    return subprocess.run([sys.executable, str(REPO / relative), *args], capture_output=True, text=True, cwd=REPO)


def real_smollm2(folder: Path) -> Path:
    """The embedded SmolLM2-135M-Instruct converted into ``folder`` (a few seconds), for the ``slow`` tests; skips the
    test when the GGUF package is not installed."""
    import pytest

    from lit_qa.errors import LitQAError

    prepare = load_script("scripts/prepare_default_model.py")
    try:
        prepare.locate_default_gguf()
    except LitQAError as e:
        pytest.skip(str(e))
    return prepare.prepare_default_model(folder)


def fake_decoding(monkeypatch, answers: Callable[[list[torch.Tensor]], list[torch.Tensor]]) -> None:
    """Make evaluation (`lit_qa.evaluation.answering`) decode ``answers(prompts)`` for each batch's prompts instead of
    the model's own tokens (the prefill still runs)."""
    import lit_qa.evaluation.answering as answering

    kv_cached, batch = answering.kv_cached, []

    def remember(model, prompts, *args, **kwargs):
        batch[:] = prompts
        return kv_cached(model, prompts, *args, **kwargs)

    monkeypatch.setattr(answering, "kv_cached", remember)
    monkeypatch.setattr(answering, "decode_n_tokens", lambda *args, **kwargs: answers(batch))


def demo_eval_file() -> Path:
    """The shared SQuAD demo evaluation file (``shared/data/squad2/demo-eval-v2.0.json``) for the ``slow`` tests; skips
    the test when it is missing."""
    import pytest

    path = SHARED_SQUAD / "demo-eval-v2.0.json"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


class WritesMarker:
    """An object whose unpickling would create the file ``marker``: the harmless stand-in for malicious code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
