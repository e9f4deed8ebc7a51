"""Continuous batching (inference/scheduler.py): sequences that join and leave at any step each get what they
would get alone (`inference.sampling.stream`, what `transformer lm sample` runs), over the paged cache."""

import dataclasses

import pytest
import torch

import transformer
from transformer.inference.sampling import stream
from transformer.inference.scheduler import SamplingParams, Scheduler, SchedulerConfig, Sequence
from transformer.model.models import build_model

SETTINGS = [  # (max_tokens, temperature, top_k, top_p, seed)
    (30, 0.0, None, None, None), (7, 1.0, None, None, 3), (45, 0.8, 20, None, 5), (12, 1.2, None, 0.9, 7),
    (25, 1.0, 5, 0.8, 11), (3, 0.0, None, None, None), (40, 0.7, None, None, 13),
]
PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak.", "O", "KING RICHARD II:\nI",
           "What say you?", "MENENIUS:\nEither you must confess yourselves wondrous malicious,", "Good"]


@pytest.fixture(scope="module")
def lm(lm_dir):
    return transformer.load(lm_dir, device="cpu")


def _scheduler(lm, blocks=64, model=None, **options) -> Scheduler:
    return Scheduler(model or lm.model, lm.tokenizer, SchedulerConfig(kv_blocks=blocks, kv_block_tokens=4, **options))


def _sequence(lm, prompt, max_tokens, temperature, top_k, top_p, seed, stop=()) -> Sequence:
    params = SamplingParams(max_tokens, temperature, top_k, top_p, seed, tuple(stop), ignore_eos=True)
    return Sequence(lm.tokenizer.encode([prompt])[0], params)


def _alone(model, sequence) -> list[int]:
    p = sequence.params
    return list(stream(model, sequence.prompt, p.max_tokens, p.temperature, p.top_k, p.top_p,
                       p.seed if p.seed is not None else 1))


def _drain(scheduler, joining: dict[int, list[Sequence]] | None = None, limit: int = 500):
    """Step until idle, adding joining[step] before that step; the step at which each sequence ended, and the text."""
    joining, ended, texts, step = joining or {}, {}, {}, 0
    while (scheduler.busy or any(k >= step for k in joining)) and step < limit:
        for s in joining.get(step, []):
            scheduler.add(s)
        for out in scheduler.step():
            texts[id(out.sequence)] = texts.get(id(out.sequence), "") + out.text
            if out.finish is not None:
                ended[id(out.sequence)] = step
        step += 1
    return ended, texts


def test_sequences_joining_at_different_steps_each_get_what_they_would_get_alone(lm):
    scheduler = _scheduler(lm, blocks=200)
    sequences = [_sequence(lm, prompt, *setting) for prompt, setting in zip(PROMPTS, SETTINGS)]
    ended, texts = _drain(scheduler, {0: sequences[:2], 1: sequences[2:4], 5: sequences[4:6], 9: sequences[6:]})
    for s in sequences:
        assert s.finish == "length"
        assert s.generated == _alone(lm.model, s)
        base, whole = lm.tokenizer.decode([s.prompt, s.prompt + s.generated])
        assert texts[id(s)] == whole[len(base):]  # the pieces join to the detokenized continuation
    assert len({tuple(s.generated) for s in sequences}) == len(sequences)  # not vacuous: they differ
    assert scheduler.pool.free == scheduler.pool.n_blocks


def test_a_windowed_model_keeps_its_window_and_equals_the_ring_cache(lm):
    cfg = dataclasses.replace(lm.model.cfg, attn_window=6)
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    scheduler = _scheduler(lm, blocks=60, model=model)
    sequences = [_sequence(lm, prompt, *setting) for prompt, setting in zip(PROMPTS[:4], SETTINGS[:4])]
    held = []
    joining = {0: sequences[:2], 3: sequences[2:]}
    step = 0
    while scheduler.busy or step <= 3:
        for s in joining.get(step, []):
            scheduler.add(s)
        scheduler.step()
        held += [s.paged.blocks for s in scheduler.running]
        step += 1
    for s in sequences:
        assert s.generated == _alone(model, s)
    # a window of 6 and one new position: 7 positions, in at most 3 blocks of 4 (the ends may straddle)
    assert max(held) <= 3 and scheduler.pool.free == 60


def test_a_short_request_that_arrives_while_a_long_one_runs_ends_long_before_it(lm):
    scheduler = _scheduler(lm)
    long = _sequence(lm, "ROMEO:", 100, 0.0, None, None, None)
    short = _sequence(lm, "O", 5, 0.0, None, None, None)
    ended, _ = _drain(scheduler, {0: [long], 10: [short]})
    # a joining sequence gets two tokens in its first step (its prompt's, then the batch's step)
    assert ended[id(short)] == 10 + 5 - 2
    assert ended[id(long)] == 100 - 2
    assert long.generated == _alone(lm.model, long) and short.generated == _alone(lm.model, short)


def test_a_cancelled_sequence_leaves_at_the_next_step_and_gives_its_blocks_back(lm):
    scheduler = _scheduler(lm)
    a, b = (_sequence(lm, p, 60, 1.0, None, None, 1) for p in ("ROMEO:", "JULIET:"))
    scheduler.add(a)
    scheduler.add(b)
    for _ in range(10):
        scheduler.step()
    held_by_b = b.paged.blocks
    assert held_by_b > 0
    used = scheduler.pool.used
    b.cancelled = True  # what a disconnected client does, from another thread
    outputs = scheduler.step()
    assert [(o.sequence, o.finish) for o in outputs if o.finish] == [(b, "cancelled")]
    assert scheduler.running == [a]
    assert scheduler.pool.used <= used - held_by_b + 1  # b's blocks are back (a may have taken one more)
    _drain(scheduler)
    assert a.finish == "length" and scheduler.pool.free == scheduler.pool.n_blocks


def test_admission_is_bounded_by_free_blocks_not_a_batch_size(lm):
    scheduler = _scheduler(lm, blocks=20, max_running=64)
    sequences = [_sequence(lm, "ROMEO:", 20, 1.0, None, None, i) for i in range(8)]
    need = scheduler.blocks_needed(len(sequences[0].prompt), 20)  # 26 positions in blocks of 4: 7
    for s in sequences:
        scheduler.add(s)
    most = 0
    while scheduler.busy:
        scheduler.step()
        most = max(most, len(scheduler.running))
        assert scheduler.pool.used <= scheduler.pool.n_blocks
    assert most == 20 // need  # memory, not max_running, bounded the batch
    assert all(s.finish == "length" and s.generated == _alone(lm.model, s) for s in sequences)
    with pytest.raises(ValueError, match="KV blocks"):
        scheduler.add(_sequence(lm, "ROMEO:", 100, 1.0, None, None, 1))  # could never fit


def test_static_batching_lets_no_sequence_join_a_running_batch(lm):
    scheduler = _scheduler(lm, static=True, static_wait_s=0.0)
    first = _sequence(lm, "ROMEO:", 20, 0.0, None, None, None)
    late = _sequence(lm, "O", 3, 0.0, None, None, None)
    ended, _ = _drain(scheduler, {0: [first], 2: [late]})
    assert ended[id(first)] == 18 and ended[id(late)] > 18  # it waited for the whole batch to end


def test_a_stop_string_ends_the_text_before_it_and_is_never_streamed(lm):
    probe = _sequence(lm, "ROMEO:", 40, 1.0, None, None, 21)
    _, texts = _drain(_scheduler(lm), {0: [probe]})
    whole = texts[id(probe)]
    stop = whole[15:18]
    assert stop.strip() and whole.find(stop) == 15
    s = _sequence(lm, "ROMEO:", 40, 1.0, None, None, 21, stop=[stop, "never in it \u2603"])
    pieces = []
    scheduler = _scheduler(lm)
    scheduler.add(s)
    while scheduler.busy:
        pieces += [o.text for o in scheduler.step() if o.text]
    assert s.finish == "stop" and "".join(pieces) == whole[:15]
    assert len(pieces) > 1 and scheduler.pool.free == scheduler.pool.n_blocks


def test_eos_ends_a_sequence_with_stop_unless_ignore_eos(lm):
    cfg = dataclasses.replace(lm.model.cfg, logits_bias=True)
    model = build_model(cfg).eval()
    model.load_state_dict(lm.model.state_dict(), strict=False)
    with torch.no_grad():
        model.out_bias[cfg.eos_id] = 1e4  # EOS is every next token
    scheduler = _scheduler(lm, model=model)
    params = SamplingParams(max_tokens=5, temperature=0)
    stops, goes_on = Sequence([5, 6], params), Sequence([5, 6], dataclasses.replace(params, ignore_eos=True))
    _, texts = _drain(scheduler, {0: [stops, goes_on]})
    assert (stops.finish, stops.generated, texts[id(stops)]) == ("stop", [cfg.eos_id], "")
    assert goes_on.finish == "length" and goes_on.generated == [cfg.eos_id] * 5


def test_a_sequence_past_its_deadline_leaves_with_timeout(lm):
    scheduler = _scheduler(lm)
    late = _sequence(lm, "ROMEO:", 50, 0.0, None, None, None)
    on_time = _sequence(lm, "O", 5, 0.0, None, None, None)
    scheduler.add(late)
    scheduler.add(on_time)
    scheduler.step()
    late.deadline = 0.0  # passed
    assert [(o.sequence, o.finish) for o in scheduler.step() if o.finish] == [(late, "timeout")]
    _drain(scheduler)
    assert on_time.finish == "length" and scheduler.pool.free == scheduler.pool.n_blocks
