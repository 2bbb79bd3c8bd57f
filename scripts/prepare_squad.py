# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Tokenize a SQuAD training file into train/val samples for fine-tuning.

The training questions are split by article into train and val (seeded), prompted with `lit_qa.data.prompts`,
tokenized with the checkpoint's tokenizer, and windowed where a paragraph is longer than ``max_seq_length`` (see
`lit_qa.data.prepare`). ``--answers all`` trains on every distinct gold answer of a question (one sample each) instead
of the first; ``--prompt_style chat`` wraps the prompt in the checkpoint's chat template (instruct models). The
evaluation file is never trained or validated on; give it with ``--eval_file`` only to check that it loads and does
not share questions with the training file.

Usage::

    python scripts/prepare_squad.py --download                       # official train-v2.0.json into data/squad2
    python scripts/prepare_squad.py --train_file ../shared/data/squad2/demo-train-v2.0.json \\
        --eval_file ../shared/data/squad2/demo-eval-v2.0.json --out_dir data/squad2-demo
    python scripts/prepare_squad.py ... --answers all --prompt_style chat   # every gold answer, chat template

Writes to ``out_dir``: ``train.pt`` and ``val.pt`` (lists of ``{"id", "input_ids", "labels", "paragraph"}``, read them
with `lit_qa.data.dataset.load_prepared`), ``val-v2.0.json`` (the val articles in official format, for
generation-based validation), ``stats.json`` and ``prepare_config.json``. The same inputs and seed give
byte-identical files.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from typing import Any

from lit_qa.data.dataset import PREPARED_FILES, check_prepared_out_dir, prepare_config, write_prepared
from lit_qa.data.prepare import QuestionEncoder, encode_splits, extra_training_questions
from lit_qa.data.prompts import ANSWER_MODES, NO_ANSWER, check_prompt_style
from lit_qa.data.squad import Question, load_squad
from lit_qa.errors import LitQAError, not_found, run_cli
from lit_qa.files import write_atomic
from lit_qa.models.tokenizer import Tokenizer

SQUAD_URLS = {
    "train-v2.0.json": "https://rajpurkar.github.io/SQuAD-explorer/dataset/train-v2.0.json",
    "dev-v2.0.json": "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v2.0.json",
}


def main(
    data_dir: Path = Path("data/squad2"),
    train_file: Path | None = None,
    eval_file: Path | None = None,
    extra_train_file: Path | None = None,
    out_dir: Path = Path("data/squad2"),
    checkpoint_dir: Path = Path("checkpoints/SmolLM2-135M-Instruct"),
    max_seq_length: int = 512,
    val_fraction: float = 0.05,
    no_answer: str = NO_ANSWER,
    prompt_style: str = "plain",
    answers: str = "first",
    seed: int = 42,
    download: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prepare SQuAD train/val samples.

    Arguments:
        data_dir: Where the official files are (and where ``--download`` puts them).
        train_file: The official-format training file (v2.0 or v1.1). Defaults to ``data_dir/train-v2.0.json``.
        eval_file: The evaluation file, only checked and recorded (evaluation reads it directly).
        extra_train_file: Another official-format file whose articles join the train split only, never validation;
            its articles that are in ``train_file`` or ``eval_file`` (by title) are left out, and its question ids
            must not be the eval file's. E.g. ``dev-v1.1.json`` adds the 13 articles (4,557 answerable questions)
            that neither demo file holds; it needs ``eval_file``, so that no evaluation article slips in.
        out_dir: Where to write the prepared files.
        checkpoint_dir: The model folder whose tokenizer is used.
        max_seq_length: Most tokens per sample (prompt, answer and EOS); longer paragraphs are windowed.
        val_fraction: Share of the training articles held out for validation (at least one article).
        no_answer: What the model is trained to answer for unanswerable questions.
        prompt_style: The prompt template: "plain" (instruction, context and question as text) or "chat" (the same
            as a user turn of the checkpoint's chat template, for instruct models; see ``lit_qa.data.prompts``).
        answers: Training targets: "first" (the first gold answer of each question) or "all" (one sample per
            distinct gold answer text). Validation always uses the first, so its loss stays comparable.
        seed: Seed of the train/val split.
        download: Fetch the official train-v2.0.json and dev-v2.0.json into data_dir if they are missing.
        overwrite: Replace prepared files in out_dir that were made with other settings.
    """
    if max_seq_length <= 0:
        raise LitQAError(f"max_seq_length must be positive, got {max_seq_length}")
    if not no_answer.strip():
        raise LitQAError("no_answer must not be empty: an empty target cannot be told apart from a cut-off answer")
    check_prompt_style(prompt_style)
    if answers not in ANSWER_MODES:
        raise LitQAError(f"unknown --answers {answers!r}; choose one of: {', '.join(ANSWER_MODES)}")
    if download:
        download_squad(data_dir)
    train_file = train_file or data_dir / "train-v2.0.json"
    if not train_file.is_file():
        raise LitQAError(f"{train_file} {not_found(train_file, 'file')}; pass --train_file, or --download to fetch the official file")

    tokenizer = Tokenizer(checkpoint_dir)
    encoder = QuestionEncoder(tokenizer, max_seq_length, prompt_style, no_answer)  # checks the chat template
    questions = load_squad(train_file)
    if eval_file is not None:
        check_no_overlap(questions, eval_file, train_file)
    extra = load_extra_training(extra_train_file, questions, eval_file)
    config = prepare_config(tokenizer, checkpoint_dir, max_seq_length, prompt_style, no_answer, seed, val_fraction,
                            answers, train_file, eval_file, extra_train_file)  # fmt: skip
    check_prepared_out_dir(out_dir, config, overwrite)

    start = time.perf_counter()
    files, stats = encode_splits(encoder, questions, train_file, val_fraction, seed, answers, extra)
    write_prepared(out_dir, files, stats, config)
    print_stats(stats, out_dir, time.perf_counter() - start)
    return stats


def download_squad(data_dir: Path) -> None:
    """Fetch the official SQuAD 2.0 train and dev files into ``data_dir`` (files already there are kept)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, url in SQUAD_URLS.items():
        path = data_dir / name
        if path.is_file():
            continue
        print(f"downloading {url} -> {path}")
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                data = response.read()
        except OSError as e:
            raise LitQAError(f"cannot download {url}: {e}") from None
        write_atomic(path, data)
        load_squad(path)  # a proxy error page must fail here, not later


def check_no_overlap(questions: list[Question], eval_file: Path, train_file: Path) -> None:
    """Check the eval file loads and shares no question id with the training file (that would leak answers)."""
    eval_ids = {q.id for q in load_squad(eval_file)}
    shared = [q.id for q in questions if q.id in eval_ids]
    if shared:
        raise LitQAError(
            f"{eval_file} shares {len(shared)} question ids with {train_file} (e.g. {shared[0]}); "
            "evaluation questions must not be trained on"
        )


def load_extra_training(
    extra_train_file: Path | None, questions: list[Question], eval_file: Path | None
) -> list[Question]:
    """The extra file's questions on articles that neither the training nor the evaluation file holds."""
    if extra_train_file is None:
        return []
    if eval_file is None:
        raise LitQAError("--extra_train_file needs --eval_file, so that none of its articles is an evaluation one")
    eval_questions = load_squad(eval_file)
    titles = {q.title for q in questions} | {q.title for q in eval_questions}
    extra = extra_training_questions(load_squad(extra_train_file), titles)
    check_no_overlap(extra, eval_file, extra_train_file)
    if not extra:
        raise LitQAError(f"{extra_train_file} has no article that is not already in the training or evaluation file")
    return extra


def print_stats(stats: dict[str, Any], out_dir: Path, seconds: float) -> None:
    for split, s in stats.items():
        dropped = ", ".join(f"{k} {v}" for k, v in s["dropped"].items()) or "none"
        print(
            f"{split}: {s['samples']} samples from {s['questions']} questions in {s['articles']} articles "
            f"({s['answerable']} answerable, {s['unanswerable']} unanswerable), {s['windowed']} windowed, "
            f"dropped: {dropped}"
        )
        if "extra_answer_samples" in s:
            print(f"  {s['extra_answer_samples']} of the samples train on a second or later distinct gold answer")
        if "extra_questions" in s:
            print(f"  {s['extra_questions']} of the questions come from --extra_train_file")
        print(f"  tokens per sample: {', '.join(f'{k} {v}' for k, v in s['tokens'].items())}")
        pack = s["packing"]
        print(f"  packed by paragraph: {pack['packs']} packs of {pack['questions_per_pack']} samples on average, "
              f"{pack['single_samples']} samples alone; {pack['tokens']:,} tokens -> {pack['packed_tokens']:,} "
              f"({100 * pack['tokens_saved']:.0f}% fewer)")
    print(f"wrote {', '.join(PREPARED_FILES)} to {out_dir} in {seconds:.1f} s")


if __name__ == "__main__":
    run_cli(main)
