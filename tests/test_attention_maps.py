"""attention_maps with targets at and past the model's length limit (max_len 16)."""

import pytest
import torch

from transformer.config import preset
from transformer.errors import UserError
from transformer.inference.search import SearchConfig, translate_batch
from transformer.model.models import build_model
from transformer.report.attention_maps import attention_maps
from transformer.text.data import collate_source
from transformer.text.tokenizer import Tokenizer

SENTENCES = ["a man rides a horse", "two dogs play in the snow", "a girl reads a book", "the men walk home"] * 10
MAX_LEN = 16  # the decoder input is <s> + target: a target may have at most 15 tokens


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(SENTENCES, 40, model_type="char")


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(3)
    return build_model(preset("tiny", vocab_size=tokenizer.vocab_size, max_len=MAX_LEN)).eval()


def _target_with(tokenizer, n_tokens: int) -> str:
    """A target that encodes to exactly n_tokens pieces ("dogs" then as many "s" as needed)."""
    for extra in range(40):
        target = "dogs" + "s" * extra
        if len(tokenizer.encode([target])[0]) == n_tokens:
            return target
    raise AssertionError(f"no target of {n_tokens} tokens")


def _check_shapes(maps, model, n_src: int, n_tgt: int):
    cfg = model.cfg
    assert (len(maps.src), len(maps.tgt_in), len(maps.tgt_out)) == (n_src, n_tgt, n_tgt)
    for kind, (layers, shape) in {"encoder": (cfg.n_encoder_layers, (n_src, n_src)),
                                  "decoder": (cfg.n_decoder_layers, (n_tgt, n_tgt)),
                                  "cross": (cfg.n_decoder_layers, (n_tgt, n_src))}.items():
        assert [w.shape for w in maps.weights[kind]] == [(cfg.n_heads, *shape)] * layers


def test_target_too_long_is_one_line_user_error(model, tokenizer):
    target = _target_with(tokenizer, MAX_LEN)  # one token too many
    with pytest.raises(UserError) as error:
        attention_maps(model, tokenizer, "a man", target)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("`target`: the target has 16 tokens") and "limit of 15" in message
    long = "two dogs play in the snow and a man rides a horse"  # far past the limit
    with pytest.raises(UserError, match=r"`target`: the target has \d+ tokens, over the model's limit of 15"):
        attention_maps(model, tokenizer, "a man", long)


def test_target_at_the_limit_is_drawn(model, tokenizer):
    target = _target_with(tokenizer, MAX_LEN - 1)
    maps = attention_maps(model, tokenizer, "a man", target)
    assert maps.translation == target
    _check_shapes(maps, model, len(tokenizer.encode(["a man"])[0]) + 1, MAX_LEN)


@pytest.mark.parametrize("beam", [1, 2])
def test_own_translation_cut_at_max_length_is_drawn(model, tokenizer, beam):
    # min_len past max_len forbids EOS: the search stops at its cap, cfg.max_len tokens,
    # one more than <s> + target can hold.
    search = SearchConfig(beam=beam, min_len=100, max_len_b=100)
    source = "a man"
    src_ids = tokenizer.encode([source])[0]
    full = translate_batch(model, collate_source([src_ids]), search)[0]
    assert len(full) == MAX_LEN  # the case that crashed
    maps = attention_maps(model, tokenizer, source, search=search)
    assert maps.translation == tokenizer.decode([full[: MAX_LEN - 1]])[0]
    _check_shapes(maps, model, len(src_ids) + 1, MAX_LEN)
    assert maps.tgt_in[1:] == [tokenizer.id_to_piece(i) for i in full[: MAX_LEN - 1]]


def test_own_translation_with_default_search_is_drawn(model, tokenizer):
    """A random model rarely says EOS: the default search (a·|source| + 50, capped at max_len) hits the cap."""
    maps = attention_maps(model, tokenizer, "the men walk")
    assert len(maps.tgt_in) <= MAX_LEN
    for w in maps.weights["decoder"]:
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:2]))


def test_source_too_long_is_still_a_user_error(model, tokenizer):
    with pytest.raises(UserError, match="`sentence`:1: sentence has .* over the model's limit of 15"):
        attention_maps(model, tokenizer, "two dogs play in the snow", "a dog")
