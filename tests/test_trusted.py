# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""No file a resume or a training run reads can run code: a crafted payload in each of them is refused in one
line and its marker file never appears (lit_qa/checkpoints/trusted.py)."""

import io
import pickle

import lightning as L
import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import WritesMarker

from lit_qa.checkpoints.trusted import TrustedLoadPlanner, load_tensors, read_dcp_metadata
from lit_qa.errors import LitQAError
from lit_qa.training.distributed import SHARDED_STATE_DIR, load_sharded_state, save_sharded_state
from lit_qa.training.resume import STATE_FILE, load_training_state


class _TouchesMarker(WritesMarker):
    """The same through a qualified name of an allowed module (``pathlib.Path.touch``)."""

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))


def small_run():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def saved_sharded_state(tmp_path):
    model, optimizer = small_run()
    save_sharded_state(tmp_path, model, optimizer, {"progress": {"step": 1}}, rank=0)
    return model, optimizer, tmp_path / SHARDED_STATE_DIR


def test_a_sharded_state_round_trips_through_the_trusted_reader(tmp_path):
    model, optimizer, _ = saved_sharded_state(tmp_path)
    fresh, fresh_optimizer = torch.nn.Linear(4, 3), None
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=5.0)
    fresh(torch.randn(2, 4)).sum().backward()
    fresh_optimizer.step()
    metadata = load_sharded_state(tmp_path, fresh, fresh_optimizer)
    assert metadata == {"progress": {"step": 1}}
    torch.testing.assert_close(fresh.weight, model.weight, rtol=0, atol=0)
    assert fresh_optimizer.param_groups[0]["lr"] == 1e-3  # a non-tensor value, read through load_bytes


@pytest.mark.parametrize("payload", [WritesMarker, _TouchesMarker])
def test_crafted_dcp_metadata_is_refused_before_anything_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    _, _, folder = saved_sharded_state(tmp_path)
    (folder / ".metadata").write_bytes(pickle.dumps(payload(marker)))
    model, optimizer = small_run()
    with pytest.raises(LitQAError, match=r"refusing to load .*\.metadata: it names (io\.open|builtins\.open|pathlib\.Path\.touch)"):
        load_sharded_state(tmp_path, model, optimizer)
    assert not marker.exists()


def test_truncated_dcp_metadata_is_one_line(tmp_path):
    _, _, folder = saved_sharded_state(tmp_path)
    (folder / ".metadata").write_bytes((folder / ".metadata").read_bytes()[:50])
    with pytest.raises(LitQAError, match=r"\.metadata is not a readable distributed-checkpoint metadata file"):
        read_dcp_metadata(folder / ".metadata")


def test_crafted_value_in_a_shard_is_refused(tmp_path):
    """A shard's non-tensor value (here the learning rate) pointed at a payload appended to the shard file, as an
    attacker rewriting both files would: PyTorch's default planner would unpickle it with weights_only=False."""
    marker = tmp_path / "pwned"
    _, _, folder = saved_sharded_state(tmp_path)
    metadata = read_dcp_metadata(folder / ".metadata")
    lr_key = next(index for index in metadata.storage_data if index.fqn.endswith("param_groups.0.lr"))
    info = metadata.storage_data[lr_key]
    shard = folder / info.relative_path
    original = shard.read_bytes()
    crafted = pickle.dumps(WritesMarker(marker))
    shard.write_bytes(original + crafted)
    metadata.storage_data[lr_key] = type(info)(info.relative_path, len(original), len(crafted))
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    model, optimizer = small_run()
    with pytest.raises(LitQAError, match=r"refusing to load the value of optimizer\.param_groups\.0\.lr"):
        load_sharded_state(tmp_path, model, optimizer)
    assert not marker.exists()
    # The planner alone, as dcp calls it, without lit-qa's wrapper.
    with pytest.raises(LitQAError, match="refusing"):
        TrustedLoadPlanner().load_bytes(type("Item", (), {"dest_index": lr_key})(), io.BytesIO(crafted))
    assert not marker.exists()


def test_crafted_sharded_metadata_pt_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    _, _, folder = saved_sharded_state(tmp_path)
    torch.save({"progress": WritesMarker(marker)}, folder / "metadata.pt")
    model, optimizer = small_run()
    with pytest.raises(LitQAError, match=r"refusing to load .*metadata\.pt: .* \(unsupported global (io|builtins)\.open\)"):
        load_sharded_state(tmp_path, model, optimizer)
    assert not marker.exists()


def test_crafted_training_state_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"progress": WritesMarker(marker)}, tmp_path / STATE_FILE)
    fabric = L.Fabric(accelerator="cpu", devices=1)
    model, optimizer = small_run()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(LitQAError, match=rf"refusing to load .*{STATE_FILE}: .*(io|builtins)\.open"):
        load_training_state(fabric, tmp_path, model, optimizer, scheduler, set())
    assert not marker.exists()


def test_crafted_prepared_split_is_refused_without_suggesting_weights_only_false(tmp_path):
    marker = tmp_path / "pwned"
    torch.save([{"input_ids": WritesMarker(marker)}], tmp_path / "train.pt")
    with pytest.raises(LitQAError) as error:
        load_tensors(tmp_path / "train.pt", "prepared split")
    message = str(error.value)
    assert "\n" not in message and "weights_only=False" not in message and "train.pt" in message
    assert not marker.exists()


def test_dcp_metadata_that_is_not_metadata_is_refused(tmp_path):
    path = tmp_path / ".metadata"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(LitQAError, match="not a distributed-checkpoint metadata file .*dict"):
        read_dcp_metadata(path)


def test_dcp_itself_would_run_the_metadata_payload(tmp_path):
    """Why the trusted reader exists: PyTorch's own reader unpickles the metadata with plain pickle.load. If a
    future torch stops doing so, this test fails and the reader can be simplified."""
    marker = tmp_path / "pwned"
    _, _, folder = saved_sharded_state(tmp_path)
    (folder / ".metadata").write_bytes(pickle.dumps(WritesMarker(marker)))
    with pytest.raises(BaseException):  # noqa: B017, PT011 - dcp's CheckpointException, once the payload has run
        dcp.load({"x": torch.zeros(1)}, checkpoint_id=folder)
    assert marker.exists()
