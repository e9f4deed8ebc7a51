"""The paged KV cache (model/paged.py): sequences at their own positions in one batch, against full recomputation."""

import pytest
import torch

from transformer.config import ModelConfig
from transformer.model.models import build_model
from transformer.model.paged import BlockPool, PagedBatch, PagedSequence

LAYERS = 2


def _model(window=None, norm_first=False, positions="sinusoidal"):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="decoder", vocab_size=61, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=0,
                      n_decoder_layers=LAYERS, max_len=64, dropout=0.0, attn_window=window, norm_first=norm_first,
                      positions=positions)
    model = build_model(cfg).eval()
    if positions == "learned":  # learned positions start at zero-ish; make them matter
        torch.nn.init.normal_(model.embed.positions.learned, std=0.5)
    return model


def _run(model, pool, prompts, starts, ends, window):
    """Sequences joining at step `starts[i]` (prompt prefill) and leaving after step `ends[i]`, decoded together
    one token a step; every logit compared with the model on the whole sequence. Returns the largest difference."""
    seqs, tokens, worst = {}, {}, 0.0
    for step in range(max(ends) + 1):
        for i, prompt in enumerate(prompts):
            if starts[i] == step:
                s = PagedSequence()
                s.grow(pool, len(prompt))
                batch = PagedBatch(pool, [s], len(prompt), LAYERS, window)
                logits = model(prompt[None], batch)
                batch.advance()
                worst = max(worst, (logits - model(prompt[None])).abs().max().item())
                seqs[i], tokens[i] = s, prompt.tolist() + [int(logits[0, -1].argmax())]
        live = [i for i in seqs if starts[i] < step <= ends[i]]
        if live:
            for i in live:
                seqs[i].grow(pool, 1)
            batch = PagedBatch(pool, [seqs[i] for i in live], 1, LAYERS, window)
            logits = model(torch.tensor([[tokens[i][-1]] for i in live]), batch)[:, -1]  # (B, V)
            batch.advance()
            for row, i in enumerate(live):
                full = model(torch.tensor([tokens[i]]))[0, -1]
                worst = max(worst, (logits[row] - full).abs().max().item())
                tokens[i].append(int(logits[row].argmax()))
                if window is not None:
                    seqs[i].forget_before(pool, seqs[i].length - window)
                    assert seqs[i].blocks <= -(-(window + 1) // pool.block_tokens) + 1  # about r + 1 positions
        for i in [i for i in seqs if ends[i] == step]:
            seqs.pop(i).release(pool)
    return worst


@pytest.mark.parametrize("window, norm_first, positions", [
    (None, False, "sinusoidal"), (None, True, "learned"), (5, False, "sinusoidal"), (3, True, "learned")])
def test_a_paged_batch_equals_full_recomputation(window, norm_first, positions):
    model = _model(window, norm_first, positions)
    pool = BlockPool(LAYERS, 40, 4, 4, 8)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 61, (n,), generator=g) for n in (5, 9, 1, 14, 3)]
    with torch.no_grad():
        worst = _run(model, pool, prompts, starts=[0, 2, 3, 3, 7], ends=[12, 6, 15, 9, 18], window=window)
    assert worst < 1e-5
    assert pool.free == pool.n_blocks  # every block back once every sequence has ended


def test_blocks_are_taken_as_a_sequence_grows_and_refused_when_none_is_free():
    pool = BlockPool(1, 3, 4, 1, 2)
    s = PagedSequence()
    s.grow(pool, 5)
    assert (s.blocks, pool.free) == (2, 1)
    s.length = 5
    s.grow(pool, 3)  # positions 5..7 fit in the second block
    assert pool.free == 1
    s.length = 8
    with pytest.raises(MemoryError):
        s.grow(pool, 5)  # two more blocks, one is free
    s.release(pool)
    assert pool.free == 3


def test_a_paged_cache_step_matches_the_contiguous_cache():
    """The same sequence through the paged cache and through KVCache (what `sample` uses): the same logits."""
    model = _model()
    pool = BlockPool(LAYERS, 16, 4, 4, 8)
    tokens = torch.randint(4, 61, (1, 11), generator=torch.Generator().manual_seed(2))
    s, cache = PagedSequence(), model.new_cache()
    with torch.no_grad():
        for t in range(11):
            s.grow(pool, 1)
            batch = PagedBatch(pool, [s], 1, LAYERS)
            paged = model(tokens[:, t:t + 1], batch)
            batch.advance()
            assert torch.allclose(paged, model(tokens[:, t:t + 1], cache), atol=1e-6)
