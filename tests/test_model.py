# Copyright lit-qa authors. Licensed under the Apache License 2.0.
import pytest
import torch

from lit_qa.errors import LitQAError
from lit_qa.models.config import Config
from lit_qa.models.model import GPT, build_rope_cache

# Published parameter counts (embedding counted once when tied).
PUBLISHED_PARAMETERS = {
    "LLaMA-7B": 6_738_415_616,
    "LLaMA-13B": 13_015_864_320,
    "LLaMA-30B": 32_528_943_616,
    "LLaMA-65B": 65_285_660_672,
    "Llama-2-70b": 68_976_648_192,
    "Llama-3.1-8B": 8_030_261_248,
    "Llama-3.1-70B": 70_553_706_496,
    "SmolLM2-135M": 134_515_008,
    "SmolLM2-360M": 361_821_120,
    "SmolLM2-1.7B": 1_711_376_384,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_registry_configs_have_published_parameter_counts(name):
    with torch.device("meta"):  # no memory is allocated, even for 70B
        model = GPT(Config.from_name(name))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]


def test_tied_embeddings_share_one_tensor():
    model = GPT(Config.from_name("tiny-tied"))
    assert model.lm_head.weight is model.transformer.wte.weight
    untied = GPT(Config.from_name("tiny-gqa"))
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.lm_head.weight.data_ptr() != untied.transformer.wte.weight.data_ptr()


def test_config_errors_are_one_line_and_name_the_problem(tmp_path):
    with pytest.raises(LitQAError, match="unknown model name 'LLaMA-8B'"):
        Config.from_name("LLaMA-8B")
    with pytest.raises(LitQAError, match="n_query_groups"):
        Config(n_head=4, n_query_groups=3, n_embd=32)
    bad = tmp_path / "lit_config.json"
    bad.write_text('{"n_layer": 2, "n_heads": 4}')
    with pytest.raises(LitQAError, match=r"lit_config.json: unknown config fields \['n_heads'\]"):
        Config.from_file(bad)
    bad.write_text("{not json")
    with pytest.raises(LitQAError, match="not valid JSON"):
        Config.from_file(bad)


def test_config_file_round_trip(tmp_path):
    config = Config.from_name("Llama-3.1-8B")
    config.save(tmp_path / "lit_config.json")
    assert Config.from_checkpoint(tmp_path) == config


def test_rope_rotation_preserves_norm_and_relative_positions():
    cos, sin = build_rope_cache(32, 8)
    from lit_qa.models.model import apply_rope

    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    rotated = lambda x, p: apply_rope(x, cos[p : p + 1], sin[p : p + 1])  # noqa: E731
    torch.testing.assert_close(rotated(q, 5).norm(), q.norm())
    # The score between a query at m and a key at n depends only on m - n.
    score = lambda m, n: (rotated(q, m) * rotated(k, n)).sum()  # noqa: E731
    torch.testing.assert_close(score(7, 3), score(20, 16))


def test_llama3_scaling_changes_only_low_frequencies():
    plain_cos, _ = build_rope_cache(64, 16, base=500000.0)
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=64)
    scaled_cos, _ = build_rope_cache(64, 16, base=500000.0, rope_scaling=scaling)
    assert torch.equal(plain_cos[:, 0], scaled_cos[:, 0])  # highest frequency untouched
    assert not torch.equal(plain_cos[:, 7], scaled_cos[:, 7])  # lowest frequency slowed down


def test_sequence_longer_than_max_seq_length_is_refused():
    model = GPT(Config.from_name("tiny-mha"))
    model.max_seq_length = 16
    with pytest.raises(LitQAError, match="exceeds max_seq_length=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(LitQAError, match="block_size"):
        model.max_seq_length = 1000


def test_boolean_cache_mask_attends_exactly_like_its_additive_form():
    from lit_qa.models.model import build_cache_mask, grouped_query_attention, left_padding_positions

    torch.manual_seed(0)
    for dtype, (T, L) in [(torch.float32, (7, 16)), (torch.bfloat16, (1, 16)), (torch.bfloat16, (9, 12))]:
        q, k = torch.randn(3, 6, T, 8, dtype=dtype), torch.randn(3, 2, L, 8, dtype=dtype)
        v = torch.randn_like(k)
        input_pos = torch.arange(T) if T > 1 else torch.tensor([L - 2])
        mask = build_cache_mask(input_pos, left_padding_positions(torch.tensor([0, 2, 3]), L), L)
        additive = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))
        assert torch.equal(grouped_query_attention(q, k, v, mask), grouped_query_attention(q, k, v, additive))
        # and it really masks: the last row's padding slots change nothing when filled with other values
        k2 = k.clone()
        k2[2, :, :3] = 100.0
        assert torch.equal(grouped_query_attention(q, k2, v, mask)[2], grouped_query_attention(q, k, v, mask)[2])
