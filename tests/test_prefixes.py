# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Shared prompt prefixes (`lit_qa.generation.prefixes`): the cache layout, and decoding that equals prefilling every
prompt whole."""

import pytest
import torch

from lit_qa.generation import prefixes
from lit_qa.generation.generate import decode_n_tokens, generate, kv_cached, prefill, probe_logits
from lit_qa.generation.prefixes import plan_layout
from lit_qa.models.config import Config
from lit_qa.models.model import GPT
from lit_qa.models.na_head import NAHeadConfig, attach_na_head


@pytest.fixture(params=["tiny-mha", "tiny-gqa", "tiny-tied"])
def model(request):
    torch.manual_seed(0)
    return GPT(Config.from_name(request.param)).eval()


@pytest.fixture(autouse=True)
def short_shared_prefix(monkeypatch):
    monkeypatch.setattr(prefixes, "MIN_SHARED_PREFIX", 8)  # the tiny models' prompts are short


def paragraph_prompts() -> list[torch.Tensor]:
    """Two "paragraphs" asked about by several "questions" each (suffixes of different lengths), and a loner."""
    generator = torch.Generator().manual_seed(3)

    def tokens(n: int) -> torch.Tensor:
        return torch.randint(1, 100, (n,), generator=generator)

    first, second = tokens(30), tokens(12)
    return [torch.cat([first, tokens(n)]) for n in (4, 9, 1)] + [tokens(17)] + [torch.cat([second, tokens(n)])
                                                                                  for n in (6, 2)]  # fmt: skip


def test_layout_holds_each_prompt_at_positions_from_zero():
    prompts = paragraph_prompts()
    layout = plan_layout(prompts, pad_id=0, pad_multiple=1, room=5, max_seq_length=128, device=torch.device("cpu"))
    assert layout.row_groups.tolist() == [0, 0, 0, 1, 2, 2]
    assert layout.prefixes.shape == (3, 30) and layout.suffixes.shape[0] == 6
    for row, prompt in enumerate(prompts):
        tokens = torch.cat([layout.prefixes[layout.row_groups[row]], layout.suffixes[row]])  # slots [0, P + S)
        positions = layout.slot_positions[row, : tokens.numel()]
        assert tokens[positions >= 0].tolist() == prompt.tolist()
        assert positions[positions >= 0].tolist() == list(range(prompt.numel()))
        # the decoding slots continue the row's positions
        assert layout.slot_positions[row, tokens.numel()].item() == prompt.numel()
    # the loner's prefix is all but its last token; the groups share everything but each question's own tokens
    assert layout.prefixes.size(0) * layout.prefixes.size(1) + layout.suffixes.numel() < 6 * max(map(len, prompts))


def test_sharing_falls_back_to_the_plain_batch_when_it_does_not_pay_or_fit():
    prompts = paragraph_prompts()
    cpu = torch.device("cpu")
    assert plan_layout(prompts, 0, 1, 5, 128, cpu, share_prefixes=False).suffixes is None
    assert plan_layout(prompts[2:5], 0, 1, 5, 128, cpu).suffixes is None  # no two prompts share a start
    # The 30-token prefix plus the other group's 6-token suffix outgrow the longest prompt (34): no room left.
    unequal = [prompts[0], prompts[2], prompts[4], prompts[5]]
    assert plan_layout(unequal, 0, 1, 128 - 36, 128, cpu).suffixes is not None
    assert plan_layout(unequal, 0, 1, 128 - 35, 128, cpu).suffixes is None
    plain = plan_layout(prompts, 0, 16, 5, 128, cpu, share_prefixes=False)
    assert plain.prefixes.size(1) == 48 and plain.slot_positions[0, 47].item() == len(prompts[0]) - 1


def decode_probed(model, prompts, probe, share_prefixes):
    """Decode 8 tokens per prompt after scoring ``probe`` between the prefill and the decoding, as evaluation does."""
    with kv_cached(model, prompts, room=8, share_prefixes=share_prefixes) as layout:
        assert (layout.suffixes is not None) == share_prefixes  # the test compares the two layouts
        logits, _ = prefill(model, layout)
        probed = probe_logits(model, layout, logits, probe)
        return decode_n_tokens(model, layout, logits, 8), probed


def test_shared_prefix_decoding_equals_whole_prompts_and_each_alone(model):
    prompts = paragraph_prompts()
    probe = torch.tensor([5, 7])
    shared, shared_probe = decode_probed(model, prompts, probe, share_prefixes=True)
    whole, whole_probe = decode_probed(model, prompts, probe, share_prefixes=False)
    alone = [generate(model, [p], 8)[0] for p in prompts]
    assert [t.tolist() for t in shared] == [t.tolist() for t in whole] == [t.tolist() for t in alone]
    torch.testing.assert_close(shared_probe, whole_probe, atol=1e-5, rtol=1e-5)
    assert all(len(t) == 8 for t in shared)


def test_shared_prefixes_feed_the_no_answer_head_the_last_prompt_token():
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny-gqa")).eval()
    torch.nn.init.normal_(attach_na_head(model, NAHeadConfig()).proj.weight)
    heads = {}
    for share in (True, False):
        with kv_cached(model, paragraph_prompts(), room=2, share_prefixes=share) as layout:
            assert (layout.suffixes is not None) == share
            heads[share] = prefill(model, layout, na_head=True)[1]
    torch.testing.assert_close(heads[True], heads[False], atol=1e-5, rtol=1e-5)
