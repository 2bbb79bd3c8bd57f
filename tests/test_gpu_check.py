# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""benchmarks/gpu_check.py in its CPU dry run: every check runs at tiny size and passes, a check that raises makes the
run fail with that check marked, and the estimator column is the estimate of the very settings that ran."""

import json

import pytest
from helpers import SHARED_SQUAD

from benchmarks import gpu_check
from lit_qa.training.memory import TrainingSetup, estimate_memory


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_SQUAD / "demo-train-v2.0.json").is_file(), reason="needs the shared SQuAD demo files")
def test_dry_run_passes_every_check_and_writes_its_results(tmp_path):
    results = gpu_check.main(out_dir=tmp_path, dry_run=True, squad_dir=SHARED_SQUAD)
    assert [r.name for r in results] == [name for name, _ in gpu_check.CHECKS]
    assert all(r.status == "pass" for r in results), [(r.name, r.detail) for r in results if r.status != "pass"]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["dry_run"] and len(saved["checks"]) == len(results)
    assert "| smollm2 lora | pass |" in (tmp_path / "gpu_check.md").read_text()
    lora = next(r for r in results if r.name == "smollm2 lora")
    assert lora.numbers["cpu_same"] == lora.numbers["cpu_checked"] > 0 and 0 <= lora.numbers["f1"] <= 100
    config = gpu_check.Sizes.for_run(True, "Llama-2-7b", 2, 4).big_config
    for name in ("lora", "qlora nf4", "full fsdp2"):
        rows = next(r for r in results if r.name == name).numbers["rows"]
        for row in rows:  # the estimate is the estimator's for the setting that ran, not a default one
            assert row["estimate GB"] * 1e9 == estimate_memory(config, TrainingSetup(**row["setting"])).total
            assert row["tokens/s"] > 0 and row["peak GB"] > 0
        expected = (1,) if name == "full fsdp2" else gpu_check.Sizes.for_run(True, "x", 2, 4).micro_batches
        assert tuple(row["setting"]["micro_batch_size"] for row in rows) == expected
    assert next(r for r in results if r.name == "decode int4").numbers["tokens/s b8"] > 0
    packed = next(r for r in results if r.name == "packed lora").numbers
    assert packed["losses"]["packed"] == pytest.approx(packed["losses"]["unpacked"], rel=2e-2)
    assert packed["packed questions/s"] > 0 and packed["unpacked questions/s"] > 0


def test_a_check_that_raises_fails_the_run_and_is_marked(tmp_path):
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main(out_dir=tmp_path, dry_run=True, only=["decode bf16", "decode int8"],
                       inject_failure="decode int8")  # fmt: skip
    assert stopped.value.code == 1
    checks = {c["name"]: c for c in json.loads((tmp_path / "gpu_check.json").read_text())["checks"]}
    assert checks["decode bf16"]["status"] == "pass" and checks["decode int8"]["status"] == "fail"
    assert "failure injected" in checks["decode int8"]["detail"]
    with pytest.raises(Exception, match="unknown checks"):
        gpu_check.main(out_dir=tmp_path, dry_run=True, only=["decode fp8"])


def test_datasheets_are_found_by_device_name():
    assert gpu_check.datasheet_for("NVIDIA H200") == (989.0, 4.8)
    assert gpu_check.datasheet_for("NVIDIA H100 80GB HBM3") == (989.0, 3.35)
    assert gpu_check.datasheet_for("NVIDIA A100-SXM4-80GB") == (312.0, 2.04)
    assert gpu_check.datasheet_for("Some Future GPU") is None


def test_a_real_run_uses_the_named_7b_config_and_a_dry_run_a_tiny_one_of_the_same_kind():
    real = gpu_check.Sizes.for_run(dry_run=False, big_config="Llama-3.1-8B", lora_steps=5, questions=7)
    assert (real.big_config.n_layer, real.big_config.n_embd, real.big_config.n_query_groups) == (32, 4096, 8)
    assert (real.lora_steps, real.questions) == (5, 7)
    dry = gpu_check.Sizes.for_run(dry_run=True, big_config="Llama-3.1-8B", lora_steps=5, questions=7)
    assert dry.big_config.n_query_groups < dry.big_config.n_head and dry.lora_steps == 2  # GQA like the 8B, tiny
