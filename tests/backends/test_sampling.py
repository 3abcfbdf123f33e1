import numpy as np
import pytest
from llguidance.numpy import allocate_token_bitmask

from smolrun.backends import _draw
from smolrun.backends.sampling import Rng, allowed, greedy, mask_logits, sample
from smolrun.turn import SamplingParams


def bitmask_of(vocab: int, ok: list[int]) -> np.ndarray:
    bm = allocate_token_bitmask(1, vocab)
    bm[:] = 0
    for t in ok:
        bm[0, t >> 5] |= np.int32(np.uint32(1 << (t & 31)).view(np.int32))
    return bm


def test_allowed_reads_the_right_bit_and_nothing_beyond_the_vocab() -> None:
    bm = bitmask_of(100, [0, 31, 32, 99])
    assert [t for t in range(100) if allowed(bm, t)] == [0, 31, 32, 99]
    assert not allowed(bm, 5000)


def test_greedy_takes_the_best_allowed_token() -> None:
    logits = np.array([0.0, 5.0, 3.0, 1.0], dtype=np.float32)
    assert greedy(logits, None) == 1
    assert greedy(logits, bitmask_of(4, [2, 3])) == 2
    masked = mask_logits(logits, bitmask_of(4, [3]))
    assert np.isneginf(masked[:3]).all() and masked[3] == 1.0


def test_sampling_never_picks_a_banned_token_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=300).astype(np.float32)
    ok = [3, 40, 41, 299]
    bm = bitmask_of(300, ok)
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.9),
                   SamplingParams(temperature=1.5, top_k=2)):
        picks = [sample(logits, bm, params, Rng(s)) for s in range(200)]
        assert set(picks) <= set(ok)
        assert picks == [sample(logits, bm, params, Rng(s)) for s in range(200)]


def test_sampling_follows_the_softmax() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    rng = Rng(1)
    picks = np.bincount([sample(logits, None, SamplingParams(temperature=1.0), rng) for _ in range(20000)],
                        minlength=3) / 20000
    assert np.allclose(picks, [0.5, 0.3, 0.2], atol=0.02)


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, top_k=1), SamplingParams(top_p=0.001)])
def test_top_k_one_and_tiny_top_p_are_greedy(params: SamplingParams) -> None:
    logits = np.random.default_rng(2).normal(size=5000).astype(np.float32)
    assert all(sample(logits, None, params, Rng(s)) == int(np.argmax(logits)) for s in range(20))


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = np.log(np.array([0.6, 0.3, 0.05, 0.05], dtype=np.float32))
    rng = Rng(3)
    picks = {sample(logits, None, SamplingParams(top_p=0.85), rng) for _ in range(500)}
    assert picks == {0, 1}


def test_masked_sampling_follows_the_masked_softmax_when_banned_tokens_hold_most_of_the_mass() -> None:
    # Token 0 holds 70 % and is banned: most unmasked draws are rejected, and the answer must still be the
    # softmax over the allowed tokens, 2/3 and 1/3.
    logits = np.log(np.array([0.7, 0.2, 0.1], dtype=np.float32))
    rng = Rng(4)
    bm = bitmask_of(3, [1, 2])
    picks = np.bincount([sample(logits, bm, SamplingParams(temperature=1.0), rng) for _ in range(30000)],
                        minlength=3) / 30000
    assert picks[0] == 0.0
    assert np.allclose(picks, [0.0, 2 / 3, 1 / 3], atol=0.015)


def test_a_draw_proposing_the_tail_follows_the_softmax_exactly() -> None:
    # Only tokens 0 and 1 lie within ln 600 of the top: the other 598, 7 below it, hold 35 % of the mass and are
    # reached through proposals at the bound weight 1/600, then kept at their own weight's rate.
    logits = np.full(600, -7.0, dtype=np.float32)
    logits[[0, 1]] = [0.0, -0.5]
    probs = np.exp(logits.astype(np.float64)) / np.exp(logits.astype(np.float64)).sum()
    rng = Rng(5)
    counts = np.bincount([_draw.draw(logits, 1.0, rng.state) for _ in range(30000)], minlength=600) / 30000
    assert np.allclose([counts[0], counts[1], counts[2:].sum()], [probs[0], probs[1], probs[2:].sum()], atol=0.012)
    assert counts[2:].max() < 0.004  # spread over the tail, not piled on one token


def test_a_seed_repeats_its_draws_and_another_seed_does_not() -> None:
    logits = np.random.default_rng(9).normal(size=49152).astype(np.float32)
    params = SamplingParams(temperature=1.0)
    first = [sample(logits, None, params, rng) for rng in [Rng(42)] for _ in range(50)]
    assert first == [sample(logits, None, params, rng) for rng in [Rng(42)] for _ in range(50)]
    assert first != [sample(logits, None, params, rng) for rng in [Rng(43)] for _ in range(50)]
    assert Rng(-1).state == Rng(2**64 - 1).state  # seeds are taken modulo 2^64


def test_the_draw_takes_float32_logits_only() -> None:
    with pytest.raises(TypeError, match="float32"):
        _draw.draw(np.zeros(8), 1.0, Rng(0).state)
    with pytest.raises(ValueError, match="8 writable bytes"):
        _draw.draw(np.zeros(8, dtype=np.float32), 1.0, bytearray(4))
    with pytest.raises(BufferError, match="not writable"):
        _draw.draw(np.zeros(8, dtype=np.float32), 1.0, bytes(8))
    with pytest.raises(ValueError, match="temperature"):
        _draw.draw(np.zeros(8, dtype=np.float32), 0.0, Rng(0).state)


def test_infinite_or_missing_logits_are_an_error_or_never_drawn() -> None:
    logits = np.zeros(8, dtype=np.float32)
    logits[3] = np.nan
    assert 3 not in {_draw.draw(logits, 1.0, rng.state) for rng in [Rng(1)] for _ in range(400)}
    logits[3] = np.inf
    with pytest.raises(ValueError, match="no token is allowed"):
        _draw.draw(logits, 1.0, Rng(1).state)


def test_a_flat_draw_follows_the_softmax_across_blocks_and_never_picks_past_the_end() -> None:
    # 600 tokens, all within ln 600 of the top (a flat distribution: every token in the head, found through the
    # sums of blocks of 256, the third short); the heavier tokens sit on both sides of each block edge.
    weights = np.ones(600)
    weights[[0, 255, 256, 511, 512, 599]] = [60, 120, 90, 150, 30, 150]
    logits = np.log(weights).astype(np.float32)
    rng = Rng(5)
    counts = np.bincount([sample(logits, None, SamplingParams(temperature=1.0), rng) for _ in range(30000)],
                         minlength=600)
    assert counts.shape == (600,)
    picked = counts[[0, 255, 256, 511, 512, 599]] / 30000
    assert np.allclose(picked, weights[[0, 255, 256, 511, 512, 599]] / weights.sum(), atol=0.012)


def test_a_flat_distribution_weighs_every_token() -> None:
    logits = np.zeros(1000, dtype=np.float32)
    logits[[10, 999]] = np.log(3.0)  # three times as likely as each other token
    rng = Rng(8)
    counts = np.bincount([sample(logits, None, SamplingParams(temperature=1.0), rng) for _ in range(30000)],
                         minlength=1000) / 30000
    assert counts.shape == (1000,)
    assert np.allclose(counts[[10, 999]], 3 / 1002, atol=0.0015)
    assert np.isclose(counts.sum(), 1.0)


@pytest.mark.parametrize("only", [0, 255, 256, 599])
def test_a_single_allowed_token_is_always_drawn_wherever_it_sits(only: int) -> None:
    logits = np.random.default_rng(6).normal(size=600).astype(np.float32)
    bm = bitmask_of(600, [only])
    assert {sample(logits, bm, SamplingParams(temperature=0.8), Rng(s)) for s in range(50)} == {only}


def test_no_allowed_token_is_an_error_not_a_draw() -> None:
    logits = np.zeros(64, dtype=np.float32)
    with pytest.raises(ValueError, match="no token is allowed"):
        sample(logits, bitmask_of(64, []), SamplingParams(temperature=1.0), Rng(7))
