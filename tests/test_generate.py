# Copyright lit-qa authors. Licensed under the Apache License 2.0.
import pytest
import torch

from lit_qa.errors import LitQAError
from lit_qa.generation.generate import decode_n_tokens, generate, kv_cached, prefill, sample
from lit_qa.models.config import Config
from lit_qa.models.model import GPT, left_padding_positions


@pytest.fixture(params=["tiny-mha", "tiny-gqa", "tiny-tied"])
def model(request):
    torch.manual_seed(0)
    return GPT(Config.from_name(request.param)).eval()


def test_kv_cache_decoding_equals_full_recomputation(model):
    """Logits of every token fed one at a time through the cache equal a full causal pass."""
    idx = torch.randint(0, 100, (2, 12))
    full = model(idx)
    model.set_kv_cache(batch_size=2, max_length=16)
    prefill = model(idx[:, :5], torch.arange(5))
    steps = [model(idx[:, t : t + 1], torch.tensor([t])) for t in range(5, 12)]
    cached = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_greedy_generation_equals_argmax_of_full_passes(model):
    prompt = torch.randint(0, 100, (7,))
    (new,) = generate(model, [prompt], max_new_tokens=6)
    seq = prompt.clone()
    for _ in range(6):
        seq = torch.cat([seq, model(seq[None])[0, -1].argmax()[None]])
    assert new.tolist() == seq[7:].tolist()


def test_batched_generation_of_different_lengths_equals_each_alone(model):
    prompts = [torch.randint(1, 100, (n,)) for n in (3, 9, 6, 1)]
    batched = generate(model, prompts, max_new_tokens=8)
    alone = [generate(model, [p], max_new_tokens=8)[0] for p in prompts]
    assert [t.tolist() for t in batched] == [t.tolist() for t in alone]


def test_batched_prefill_logits_match_alone(model):
    """Left padding is masked and RoPE positions start at each row's first real token."""
    short, long = torch.randint(1, 100, (4,)), torch.randint(1, 100, (10,))
    idx = torch.stack([torch.cat([torch.zeros(6, dtype=torch.long), short]), long])
    model.set_kv_cache(batch_size=2, max_length=10)
    batched = model(idx, torch.arange(10), left_padding_positions(torch.tensor([6, 0]), 10))
    torch.testing.assert_close(batched[0, 6:], model(short[None])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1], model(long[None])[0], atol=1e-5, rtol=1e-5)


def test_generation_stops_at_stop_token(model):
    prompt = torch.randint(0, 100, (5,))
    (free,) = generate(model, [prompt], max_new_tokens=6)
    stop_token = int(free[2])
    first_hit = free.tolist().index(stop_token)
    (stopped,) = generate(model, [prompt], max_new_tokens=6, stop_ids={stop_token})
    assert stopped.tolist() == free[:first_hit].tolist()


def test_sampling_is_reproducible_and_respects_top_k():
    logits = torch.randn(3, 50)
    draws = [sample(logits, 1.0, top_k=3, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    allowed = logits.topk(3).indices
    for _ in range(20):
        token = sample(logits, 1.0, top_k=3)
        assert all(token[row] in allowed[row] for row in range(3))


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps the first two only.
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    seen = {int(sample(logits, 1.0, top_p=0.7)) for _ in range(200)}
    assert seen == {0, 1}


def test_greedy_is_argmax():
    logits = torch.randn(4, 30)
    assert torch.equal(sample(logits, 0.0), logits.argmax(-1))


def test_bad_sampling_args_and_too_long_request_raise(model):
    prompt = torch.randint(0, 100, (5,))
    with pytest.raises(LitQAError, match="temperature"):
        generate(model, [prompt], 3, temperature=-1)
    with pytest.raises(LitQAError, match="top_p"):
        generate(model, [prompt], 3, temperature=1, top_p=0)
    with pytest.raises(LitQAError, match="max_seq_length"):
        generate(model, [prompt], max_new_tokens=200)


def padded_generate(model, prompts, pad_multiple):
    """Greedy `generate` of 5 tokens with the batch left-padded to a multiple of ``pad_multiple``."""
    with kv_cached(model, prompts, 5, pad_multiple=pad_multiple) as layout:
        assert layout.prompt_length % pad_multiple == 0
        return decode_n_tokens(model, layout, prefill(model, layout)[0], 5)


def test_padding_to_a_multiple_changes_nothing(model):
    prompts = [torch.randint(1, 100, (n,)) for n in (3, 9)]
    plain = generate(model, prompts, max_new_tokens=5)
    padded = padded_generate(model, prompts, 16)
    alone_padded = padded_generate(model, prompts[:1], 16)
    assert [t.tolist() for t in plain] == [t.tolist() for t in padded]
    assert alone_padded[0].tolist() == plain[0].tolist()


def test_the_kv_cache_lives_only_in_its_block_even_on_an_error(model):
    with kv_cached(model, [torch.randint(1, 100, (4,))], 3) as layout:
        assert model.transformer.h[0].attn.kv_cache.k.size(2) == layout.prompt_length + 3
        assert torch.is_inference_mode_enabled()
    assert model.transformer.h[0].attn.kv_cache is None
    with pytest.raises(RuntimeError, match="boom"), kv_cached(model, [torch.randint(1, 100, (4,))], 3):
        raise RuntimeError("boom")
    assert model.transformer.h[0].attn.kv_cache is None
    with pytest.raises(LitQAError, match="at least one token"):
        generate(model, [torch.tensor([], dtype=torch.long)], 3)
