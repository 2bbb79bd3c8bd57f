# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""``--overwrite`` replaces a result only once the new one is complete, and no command writes over its own input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from helpers import load_script
from test_finetune_lora import finetune, prepared  # noqa: F401 - the module-scoped fixture

from lit_qa.checkpoints.folder import check_not_inside
from lit_qa.errors import LitQAError
from lit_qa.training.replace import PENDING_DIR


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failing_overwrite_leaves_the_old_run_byte_identical_and_a_good_one_replaces_it(prepared, tmp_path):  # noqa: F811
    _, checkpoint, data_dir, _ = prepared
    run = tmp_path / "run"
    assert finetune(tmp_path, checkpoint, data_dir).returncode == 0
    before = snapshot(run)
    assert {"final/lit_lora.safetensors", "step-000006/training_state.pt", "hyperparameters.yaml"} <= set(before)

    refused = finetune(tmp_path, checkpoint, data_dir)  # no --overwrite, no --resume
    assert refused.returncode == 2 and "already holds a run" in refused.stderr.strip().splitlines()[-1]

    corrupt_base = tmp_path / "corrupt-base"
    shutil.copytree(checkpoint, corrupt_base)
    weights = corrupt_base / "lit_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for extra in (["--train.learning_rate", "-1"], ["--checkpoint_dir", str(corrupt_base)]):
        failed = finetune(tmp_path, checkpoint, data_dir, "--overwrite", *extra)
        assert failed.returncode == 2, failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1 or "Traceback" not in failed.stderr
        after = snapshot(run)
        old_files = {name: data for name, data in after.items() if name in before}
        assert old_files == before  # every old byte where it was
        assert not any(name.startswith(("step-", "final", "best")) for name in set(after) - set(before))

    replaced = finetune(tmp_path, checkpoint, data_dir, "--overwrite", "--train.max_steps", "3")
    assert replaced.returncode == 0, replaced.stderr
    assert "removed the earlier run's" in replaced.stdout + replaced.stderr
    assert not (run / "step-000006").exists() and (run / "step-000003").is_dir() and (run / "final").is_dir()
    assert not (run / PENDING_DIR).exists()
    assert yaml.safe_load((run / "hyperparameters.yaml").read_text())["train"]["max_steps"] == 3
    assert (run / "final" / "lit_lora.safetensors").read_bytes() != before["final/lit_lora.safetensors"]


def test_an_overwrite_killed_before_its_first_checkpoint_leaves_a_resumable_old_run(prepared, tmp_path):  # noqa: F811
    """The state a run killed between its start and its first checkpoint leaves: the old run and ``.overwrite/``
    with the new hyperparameters. The next start forgets the pending replacement and resumes the old run."""
    _, checkpoint, data_dir, _ = prepared
    run = tmp_path / "run"
    assert finetune(tmp_path, checkpoint, data_dir, "--train.max_steps", "3").returncode == 0
    before = snapshot(run)
    (run / PENDING_DIR).mkdir()
    (run / PENDING_DIR / "old_results.json").write_text('["final", "hyperparameters.yaml", "step-000003"]')
    (run / PENDING_DIR / "hyperparameters.yaml").write_text("train: {max_steps: 99}\n")
    resumed = finetune(tmp_path, checkpoint, data_dir, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert not (run / PENDING_DIR).exists()
    assert (run / "step-000003" / "training_state.pt").read_bytes() == before["step-000003/training_state.pt"]
    assert (run / "step-000006").is_dir()


@pytest.mark.parametrize(("inputs", "relation"), [
    ({"--source": "{out}"}, "is the input --source"),
    ({"--source": "{parent}"}, "is inside the input --source"),
    ({"--source": "{out}/inner"}, "contains the input --source"),
])  # fmt: skip
def test_an_output_folder_overlapping_an_input_is_refused(tmp_path, inputs, relation):
    out = tmp_path / "model" / "out"
    named = {flag: Path(path.format(out=out, parent=out.parent)) for flag, path in inputs.items()}
    with pytest.raises(LitQAError, match=f"^--out_dir {out} {relation}"):
        check_not_inside(out, named)
    check_not_inside(tmp_path / "elsewhere", named)  # siblings are fine


def test_merge_and_convert_refuse_to_write_over_their_source(prepared, tmp_path):  # noqa: F811
    """``--overwrite`` onto the folder being read used to replace it and exit 0."""
    _, checkpoint, _, _ = prepared
    before = snapshot(checkpoint)
    convert = load_script("scripts/convert_checkpoint.py")
    with pytest.raises(LitQAError, match="is the input --source"):
        convert.main(source=checkpoint, out_dir=checkpoint, to="hf", overwrite=True)
    merge = load_script("scripts/merge_lora.py")
    with pytest.raises(LitQAError, match="is the input --base_checkpoint_dir"):
        merge.main(lora_dir=tmp_path / "adapter", out_dir=checkpoint, base_checkpoint_dir=checkpoint, overwrite=True)
    assert snapshot(checkpoint) == before
