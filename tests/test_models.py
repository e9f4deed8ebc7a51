"""The assemblies: parity with nn.Transformer, causality, padding invariance, cached decoding, overfitting."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transformer.config import preset
from transformer.model.models import DecoderOnly, EncoderDecoder, EncoderOnly, build_model

PAD = 0


def _model(arch="encoder-decoder", **overrides):
    torch.manual_seed(0)
    cfg = preset("tiny", arch=arch, dropout=0.0, vocab_size=50, **overrides)
    return build_model(cfg).eval()


def _batch(seed=0):
    """Right-padded source (3, 9) and target (3, 7) batches with padding on both sides."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 50, (3, 9), generator=g)
    tgt = torch.randint(4, 50, (3, 7), generator=g)
    src[1, 6:] = PAD
    src[2, 3:] = PAD
    tgt[0, 5:] = PAD
    tgt[2, 2:] = PAD
    return src, tgt


def _copy_into_reference(model: EncoderDecoder, ref: nn.Transformer) -> None:
    def attn(ours, theirs):
        theirs.in_proj_weight.copy_(ours.in_proj.weight)
        theirs.in_proj_bias.copy_(ours.in_proj.bias)
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
        theirs.out_proj.bias.copy_(ours.out_proj.bias)

    def linear(ours, theirs):
        theirs.weight.copy_(ours.weight)
        theirs.bias.copy_(ours.bias)

    with torch.no_grad():
        for ours, theirs in zip(model.encoder.layers, ref.encoder.layers):
            attn(ours.self_attn, theirs.self_attn)
            linear(ours.ffn.w1, theirs.linear1)
            linear(ours.ffn.w2, theirs.linear2)
            linear(ours.res_attn.norm, theirs.norm1)
            linear(ours.res_ffn.norm, theirs.norm2)
        for ours, theirs in zip(model.decoder.layers, ref.decoder.layers):
            attn(ours.self_attn, theirs.self_attn)
            attn(ours.cross_attn, theirs.multihead_attn)
            linear(ours.ffn.w1, theirs.linear1)
            linear(ours.ffn.w2, theirs.linear2)
            linear(ours.res_self.norm, theirs.norm1)
            linear(ours.res_cross.norm, theirs.norm2)
            linear(ours.res_ffn.norm, theirs.norm3)
        if model.cfg.norm_first:
            linear(model.encoder.norm, ref.encoder.norm)
            linear(model.decoder.norm, ref.decoder.norm)
        else:  # the paper's post-norm stack has no final LayerNorm; nn.Transformer always adds one
            ref.encoder.norm = None
            ref.decoder.norm = None


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("norm_first", [False, True])
def test_parity_with_nn_transformer(norm_first):
    model = _model(norm_first=norm_first)
    cfg = model.cfg
    ref = nn.Transformer(
        d_model=cfg.d_model, nhead=cfg.n_heads, num_encoder_layers=cfg.n_encoder_layers,
        num_decoder_layers=cfg.n_decoder_layers, dim_feedforward=cfg.d_ff, dropout=0.0,
        batch_first=True, norm_first=norm_first,
    ).eval()
    ref.encoder.use_nested_tensor = False  # keep the reference on its plain (non-nested) path
    _copy_into_reference(model, ref)
    src, tgt = _batch()
    with torch.no_grad():
        memory, memory_mask = model.encode(src)
        ours = model.decode(tgt, memory, memory_mask)
        theirs = ref(
            model.src_embed(src), model.tgt_embed(tgt),
            tgt_mask=torch.ones(7, 7, dtype=torch.bool).triu(1),  # nn.Transformer: True = masked
            src_key_padding_mask=src == PAD, tgt_key_padding_mask=tgt == PAD,
            memory_key_padding_mask=src == PAD,
        )
    real = tgt != PAD
    assert ours.shape == theirs.shape == (3, 7, cfg.d_model)
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)
    # The comparison is not vacuous: a perturbed weight breaks it.
    with torch.no_grad():
        model.decoder.layers[0].ffn.w1.bias.add_(0.1)
        changed = model.decode(tgt, memory, memory_mask)
    assert (changed[real] - theirs[real]).abs().max() > 1e-3


@pytest.mark.parametrize("window", [None, 2])
def test_causality_encoder_decoder(window):
    model = _model(attn_window=window)
    src, tgt = _batch()
    logits = model(src, tgt)
    for t in range(tgt.size(1) - 1):
        changed = tgt.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 7) % 46 + 4
        new = model(src, changed)
        torch.testing.assert_close(new[:, : t + 1], logits[:, : t + 1], atol=1e-6, rtol=0)
        assert (new[:, t + 1] - logits[:, t + 1]).abs().max() > 1e-4


@pytest.mark.parametrize("window", [None, 2])
def test_causality_decoder_only(window):
    model = _model("decoder", attn_window=window)
    tokens = torch.randint(4, 50, (2, 10), generator=torch.Generator().manual_seed(1))
    logits = model(tokens)
    for t in range(tokens.size(1) - 1):
        changed = tokens.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 7) % 46 + 4
        new = model(changed)
        torch.testing.assert_close(new[:, : t + 1], logits[:, : t + 1], atol=1e-6, rtol=0)
        assert (new[:, t + 1] - logits[:, t + 1]).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["encoder-decoder", "encoder", "decoder"])
@pytest.mark.parametrize("window", [None, 1])
def test_padding_invariance(arch, window):
    """Appending pad tokens leaves the outputs at real positions unchanged, alone or in a batch."""
    model = _model(arch, attn_window=window)
    src = torch.tensor([[11, 12, 13, 14, 15]])
    tgt = torch.tensor([[2, 21, 22, 23]])
    longer_src = torch.tensor([[31, 32, 33, 34, 35, 36, 37, 38, 39]])
    longer_tgt = torch.tensor([[2, 41, 42, 43, 44, 45, 46]])

    def pad(x, n):
        return F.pad(x, (0, n), value=PAD)

    def run(s, t):
        if arch == "encoder-decoder":
            return model(s, t)
        return model(s)  # one sequence for the single-stack models

    alone = run(src, tgt)
    padded = run(pad(src, 4), pad(tgt, 3))
    batched = run(torch.cat([pad(src, 4), longer_src]), torch.cat([pad(tgt, 3), longer_tgt]))
    n = alone.size(1)
    torch.testing.assert_close(padded[:, :n], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[:1, :n], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("window", [None, 2])
def test_incremental_decoding_encoder_decoder(norm_first, window):
    model = _model(norm_first=norm_first, attn_window=window)
    src, _ = _batch()
    tgt = torch.randint(4, 50, (3, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(src, tgt)
        memory, memory_mask = model.encode(src)
        cache = model.new_cache()
        steps = [model.project(model.decode(tgt[:, t : t + 1], memory, memory_mask, cache)) for t in range(8)]
    assert cache.length == 8
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [None, 3])
def test_incremental_decoding_decoder_only(window):
    """A prompt in one call, then one token at a time and a chunk of three, equals the full pass."""
    model = _model("decoder", attn_window=window)
    tokens = torch.randint(4, 50, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        parts = [model(tokens[:, :5], cache)]
        parts += [model(tokens[:, t : t + 1], cache) for t in range(5, 9)]
        parts.append(model(tokens[:, 9:], cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_cache_select_reorders_rows():
    model = _model()
    src, _ = _batch()
    tgt = torch.randint(4, 50, (3, 4), generator=torch.Generator().manual_seed(4))
    order = torch.tensor([2, 0])
    with torch.no_grad():
        full = model(src[order], tgt[order])
        memory, memory_mask = model.encode(src)
        cache = model.new_cache()
        model.decode(tgt[:, :2], memory, memory_mask, cache)
        cache.select(order)
        last = model.project(model.decode(tgt[order, 2:], memory[order], memory_mask[order], cache))
    torch.testing.assert_close(last, full[:, 2:], atol=1e-5, rtol=0)


def test_attention_weights_are_returned_not_stored():
    model = _model()
    src, tgt = _batch()
    weights: dict = {}
    with torch.no_grad():
        logits = model(src, tgt, attn_weights=weights)
        plain = model(src, tgt)
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=0)
    cfg = model.cfg
    assert [w.shape for w in weights["encoder"]] == [(3, cfg.n_heads, 9, 9)] * cfg.n_encoder_layers
    assert [w.shape for w in weights["decoder"]] == [(3, cfg.n_heads, 7, 7)] * cfg.n_decoder_layers
    assert [w.shape for w in weights["cross"]] == [(3, cfg.n_heads, 7, 9)] * cfg.n_decoder_layers
    assert (weights["cross"][0][1, :, :, 6:] == 0).all()  # padded source keys get no weight
    assert torch.triu(weights["decoder"][0][0, 0], diagonal=1).abs().max() == 0  # causal


def test_tied_embeddings_share_one_matrix():
    model = _model()
    assert model.src_embed.tokens.weight is model.tgt_embed.tokens.weight
    assert model.out_proj is None
    untied = _model(tie_embeddings=False)
    assert untied.src_embed.tokens.weight is not untied.tgt_embed.tokens.weight
    assert untied.out_proj is not None


def test_learned_positions_and_max_len():
    model = _model("decoder", positions="learned", max_len=16)
    assert model.embed.positions.learned.shape == (16, model.cfg.d_model)
    model(torch.randint(4, 50, (1, 16)))
    with pytest.raises(ValueError, match="max_len=16"):
        model(torch.randint(4, 50, (1, 17)))


def test_encoder_only_is_bidirectional():
    model = _model("encoder")
    assert isinstance(model, EncoderOnly)
    tokens = torch.randint(4, 50, (1, 8), generator=torch.Generator().manual_seed(5))
    changed = tokens.clone()
    changed[0, 7] = (changed[0, 7] + 1 - 4) % 46 + 4
    with torch.no_grad():
        # Changing the last token changes the first position's output (not causal).
        assert (model(changed)[0, 0] - model(tokens)[0, 0]).abs().max() > 1e-4


def test_tiny_encoder_decoder_overfits_eight_pairs():
    torch.manual_seed(0)
    cfg = preset("tiny", dropout=0.0, vocab_size=60)
    model = build_model(cfg)
    assert isinstance(model, EncoderDecoder)
    g = torch.Generator().manual_seed(6)
    src = torch.randint(4, 60, (8, 10), generator=g)
    out = torch.randint(4, 60, (8, 9), generator=g)
    tgt_in = torch.cat([torch.full((8, 1), 2), out[:, :-1]], dim=1)
    src[3, 7:] = PAD
    out[5, 6:] = PAD
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-9)
    losses = []
    for _ in range(300):
        logits = model(src, tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, 60), out.reshape(-1), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 3.5
    assert losses[-1] < 0.05
    model.eval()
    with torch.no_grad():
        predicted = model(src, tgt_in).argmax(-1)
    assert torch.equal(predicted[out != PAD], out[out != PAD])


def test_decoder_only_has_no_cross_attention():
    model = _model("decoder")
    assert isinstance(model, DecoderOnly)
    assert all(layer.cross_attn is None for layer in model.decoder.layers)
