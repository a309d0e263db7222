"""The streaming engine against the float64 oracle written straight from the definition."""

from __future__ import annotations

import math

import pytest
import torch
from layertrack.workers import engine, reference
from layertrack.workers.errors import TooFewTokens
from layertrack.workers.vocabulary import BASE_METRICS, PAIR_METRICS

TOL = 1e-6


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def chain(x: torch.Tensor, n_blocks: int, step: float, seed: int = 1) -> list[torch.Tensor]:
    """Hidden states of a toy residual network: h_{i+1} = h_i + step * tanh(h_i W_i)."""
    g = gen(seed)
    hs = [x]
    d = x.shape[1]
    for _ in range(n_blocks):
        w = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        hs.append(hs[-1] + step * torch.tanh(hs[-1] @ w))
    return hs


def assert_matches_oracle(hs: list[torch.Tensor], **kwargs) -> engine.Scores:
    got = engine.score_hidden_states(hs, **kwargs)
    want = reference.score_pairs(hs)
    for metric in BASE_METRICS:
        for layer, (a, b) in enumerate(zip(got.metric(metric), want[metric], strict=True)):
            assert reference.agrees(metric, a, b, TOL), f"{metric} layer {layer}: engine {a!r} vs oracle {b!r}"
    return got


def test_random_residual_stack_matches_oracle():
    x = torch.randn(1500, 48, generator=gen(0), dtype=torch.float64)
    s = assert_matches_oracle(chain(x, 4, 0.5))
    assert s.n_tokens == 1500 and s.d == 48
    assert s.chance == pytest.approx(48 / 1499)
    # a residual stack is highly linear, its residual-removed part much less so
    assert all(p.linearity > 0.9 for p in s.pairs)
    assert all(p.linearity_nores < p.linearity for p in s.pairs)


def test_random_unrelated_matrices_match_oracle():
    g = gen(2)
    hs = [torch.randn(900, 40, generator=g, dtype=torch.float64) * (1 + i) for i in range(4)]
    assert_matches_oracle(hs)


def test_exact_linear_map_scores_one():
    g = gen(3)
    x = torch.randn(800, 32, generator=g, dtype=torch.float64)
    a = torch.randn(32, 32, generator=g, dtype=torch.float64)
    b = torch.randn(32, generator=g, dtype=torch.float64) * 5
    y = x @ a + b
    s = assert_matches_oracle([x, y])
    assert s.pairs[0].linearity == pytest.approx(1.0, abs=1e-9)
    # Y − X = X(A − I) + b is linear in X as well
    assert s.pairs[0].linearity_nores == pytest.approx(1.0, abs=1e-9)


def test_independent_noise_scores_chance():
    g = gen(4)
    n, d = 4000, 50
    hs = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(3)]
    s = assert_matches_oracle(hs)
    chance = d / (n - 1)
    for p in s.pairs:
        # E[R²] = d/(n−1) for unrelated data; its spread over 50 targets is ~0.002
        assert abs(p.linearity - chance) < 0.006, (p.linearity, chance)


def test_near_identity_tiny_updates_keep_nores_exact():
    """Y = X + ε·f(X): C_yy − 2C_xy + C_xx would cancel catastrophically; the engine
    accumulates D = Y − X directly. A large common offset makes it harder still."""
    g = gen(5)
    n, d = 2000, 24
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + 300.0
    w = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    for eps in (1e-4, 1e-7, 1e-10):
        y = x + eps * (torch.tanh((x - 300.0) @ w) + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64))
        s = assert_matches_oracle([x, y])
        assert s.pairs[0].linearity == pytest.approx(1.0, abs=1e-6)
        assert 0.05 < s.pairs[0].linearity_nores < 0.95


def test_naive_gram_subtraction_would_fail_where_engine_holds():
    """The cancellation is real: forming C_dd from C_yy, C_xy and C_xx loses the answer."""
    g = gen(6)
    n, d = 2000, 16
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + 1000.0
    y = x + 1e-9 * torch.randn(n, d, generator=g, dtype=torch.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    tr_dd_naive = float((yc * yc).sum() - 2 * (xc * yc).sum() + (xc * xc).sum())
    tr_dd_true = float(((y - x) - (y - x).mean(0)).square().sum())
    assert abs(tr_dd_naive - tr_dd_true) > 10 * tr_dd_true  # naive result is garbage
    assert_matches_oracle([x, y])


def test_rank_deficient_x():
    g = gen(7)
    n, d, r = 1200, 40, 12
    z = torch.randn(n, r, generator=g, dtype=torch.float64)
    m = torch.randn(r, d, generator=g, dtype=torch.float64)
    x = z @ m  # rank r
    w = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    y = x + torch.tanh(x @ w)
    s = assert_matches_oracle([x, y, y + 0.1 * torch.tanh(y)])
    assert s.pairs[0].linearity < 1.0


def test_huge_outlier_dimensions():
    """Massive activations: two dimensions 10⁴ times larger, with large means."""
    g = gen(8)
    n, d = 1500, 32
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:, 3] = x[:, 3] * 1e4 + 5e4
    x[:, 17] = x[:, 17] * 3e3 - 2e4
    assert_matches_oracle(chain(x, 3, 0.7))


def test_float32_and_bfloat16_inputs_match_oracle_on_the_same_values():
    x = torch.randn(1000, 32, generator=gen(9))
    hs32 = [h.float() for h in chain(x.double(), 3, 0.5)]
    assert_matches_oracle(hs32)
    assert_matches_oracle([h.bfloat16() for h in hs32])


def test_streaming_in_uneven_batches_equals_one_batch():
    x = torch.randn(1777, 24, generator=gen(10), dtype=torch.float64) + 3
    hs = chain(x, 3, 0.4)
    one = engine.score_hidden_states(hs)
    stats = engine.StreamingStats(24, 0, 3)
    for start, stop in [(0, 1), (1, 500), (500, 501), (501, 1777)]:
        for i, h in enumerate(hs):
            stats.add(i, h[start:stop])
    pairs, layers = stats.scores()
    assert stats.n == 1777
    for a, b in zip(pairs, one.pairs, strict=True):
        for m in PAIR_METRICS:
            assert getattr(a, m) == pytest.approx(getattr(b, m), abs=1e-12)
    for a, b in zip(layers, one.layers, strict=True):
        assert a.anisotropy == pytest.approx(b.anisotropy, abs=1e-12)


def test_layer_groups_cover_every_pair_once_and_fit_the_budget():
    d = 64
    groups = engine.plan_layer_groups(11, d, engine.stats_bytes(4, d))
    assert groups == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert engine.plan_layer_groups(11, d, None) == [(0, 10)]
    assert engine.plan_layer_groups(11, d, 1) == [(i, i + 1) for i in range(10)]
    # the documented formula: (2H − 1)·d² float64 numbers plus the vectors and the |h| histograms
    assert engine.stats_bytes(33, 4096) == 65 * 4096 * 4096 * 8 + 8 * 4096 * 68 + 8 * engine.MASSIVE_BINS * 33


def test_group_by_group_accumulation_equals_one_group():
    x = torch.randn(600, 16, generator=gen(11), dtype=torch.float64)
    hs = chain(x, 5, 0.5)
    whole = engine.score_hidden_states(hs)
    pairs = []
    for first, last in engine.plan_layer_groups(len(hs), 16, engine.stats_bytes(3, 16)):
        st = engine.StreamingStats(16, first, last)
        for i in range(first, last + 1):
            st.add(i, hs[i])
        pairs += st.scores()[0]
    assert [p.layer for p in pairs] == list(range(5))
    for a, b in zip(pairs, whole.pairs, strict=True):
        assert a.linearity == pytest.approx(b.linearity, abs=1e-12)
        assert a.linearity_nores == pytest.approx(b.linearity_nores, abs=1e-12)


def test_too_few_tokens_is_refused_and_few_tokens_warned():
    g = gen(12)
    d = 32
    with pytest.raises(TooFewTokens, match=r"only 63 probe tokens for hidden size d=32.*>= 2\*d = 64"):
        engine.score_hidden_states([torch.randn(63, d, generator=g) for _ in range(2)])
    s = engine.score_hidden_states([torch.randn(100, d, generator=g) for _ in range(2)])
    assert len(s.warnings) == 1 and "below 8*d=256" in s.warnings[0]
    s = engine.score_hidden_states([torch.randn(300, d, generator=g) for _ in range(2)])
    assert s.warnings == []


def test_a_block_that_does_nothing_has_undefined_nores_not_a_crash():
    x = torch.randn(300, 8, generator=gen(13), dtype=torch.float64)
    s = engine.score_hidden_states([x, x.clone()])
    assert s.pairs[0].linearity == pytest.approx(1.0)
    assert math.isnan(s.pairs[0].linearity_nores)
    assert s.pairs[0].norm_ratio == 0.0 and s.pairs[0].cosine == pytest.approx(1.0)


def test_batches_must_arrive_in_order_with_the_same_tokens():
    st = engine.StreamingStats(4, 0, 2)
    st.add(0, torch.zeros(5, 4))
    with pytest.raises(ValueError, match="expected 1, got 2"):
        st.add(2, torch.zeros(5, 4))
    with pytest.raises(ValueError, match="same tokens"):
        st.add(1, torch.zeros(6, 4))


def test_the_two_oracles_agree():
    """The SVD oracle and LAPACK's gelsd give the same scores (the oracle checks itself)."""
    g = gen(14)
    x = torch.randn(500, 20, generator=g, dtype=torch.float64)
    y = torch.sin(x @ torch.randn(20, 20, generator=g, dtype=torch.float64))
    assert reference.linearity(x, y) == pytest.approx(reference.linearity_lstsq(x, y), abs=1e-12)


@pytest.mark.parametrize("case", ["outliers", "near_identity", "rank_deficient"])
def test_float32_hidden_states_meet_the_oracle_and_the_float32_option_is_close(case):
    """Real models give float32/bfloat16 hidden states. The default float64 products meet
    the oracle; the opt-in float32 products stay within the documented 1e-4."""
    g = gen(20)
    n, d = 3000, 48
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if case == "outliers":
        x[:, 5] = x[:, 5] * 300 + 2000
        x[:2, 11] = 5e3  # a massive activation on two tokens
        hs = chain(x, 3, 0.5)
    elif case == "near_identity":
        w = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        hs = [x, x + 1e-4 * torch.tanh(x @ w)]
    else:
        z = torch.randn(n, 10, generator=g, dtype=torch.float64)
        hs = chain(z @ torch.randn(10, d, generator=g, dtype=torch.float64), 2, 0.5)
    hs32 = [h.float() for h in hs]
    exact = assert_matches_oracle(hs32)
    fast = engine.score_hidden_states(hs32, config=engine.EngineConfig(gemm_precision="float32"))
    for metric in BASE_METRICS:
        assert fast.metric(metric) == pytest.approx(exact.metric(metric), abs=1e-4)


@pytest.mark.parametrize("blocks", [1, 2, 3, 5])
def test_block_triangular_gram_equals_the_full_product(blocks):
    x = torch.randn(700, 40, generator=gen(21), dtype=torch.float64) * 3 + 1
    hs = chain(x, 3, 0.6)
    stats = engine.StreamingStats(40, 0, 3, gram_blocks=blocks)
    for start in range(0, 700, 256):
        for i, h in enumerate(hs):
            stats.add(i, h[start : start + 256])
    pairs, layers = stats.scores()
    want = reference.score_pairs(hs)
    assert [p.linearity for p in pairs] == pytest.approx(want["linearity"], abs=TOL)
    assert [p.linearity_nores for p in pairs] == pytest.approx(want["linearity_nores"], abs=TOL)
    assert [s.anisotropy for s in layers] == pytest.approx(want["anisotropy"], abs=TOL)


def test_effective_rank_counts_the_directions_the_variance_spreads_over():
    g = gen(31)
    n, d = 4000, 24
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    # variance spread evenly over 6 orthogonal directions, nothing elsewhere: effective rank 6
    six = (torch.randn(n, 6, generator=g, dtype=torch.float64) @ basis[:6]) * 3 + 7
    spread = torch.randn(n, d, generator=g, dtype=torch.float64)  # about d
    s = assert_matches_oracle([six, spread])
    assert s.layers[0].effective_rank == pytest.approx(6, rel=0.05)
    assert s.layers[1].effective_rank == pytest.approx(d, rel=0.05)


def test_massive_activation_finds_the_dimension_and_its_ratio_to_the_median():
    g = gen(32)
    x = torch.randn(3000, 32, generator=g, dtype=torch.float64)
    x[5, 17] = 400.0  # one massive entry (an attention-sink token's dimension 17)
    y = x + 0.1 * torch.randn(3000, 32, generator=g, dtype=torch.float64)
    stats = engine.StreamingStats(32, 0, 1)
    for start in range(0, 3000, 700):  # in batches: the histogram and the max accumulate
        stats.add(0, x[start:start + 700])
        stats.add(1, y[start:start + 700])
    _, layers = stats.scores()
    assert layers[0].massive_dim == 17 and layers[1].massive_dim == 17
    want = reference.massive_activation(x)
    assert want > 500  # 400 over a median |N(0, 1)| of about 0.674
    assert reference.agrees("massive_activation", layers[0].massive_activation, want, 0.0)
    assert not reference.agrees("massive_activation", layers[0].massive_activation * 1.01, want, 0.0)
    scores = engine.score_hidden_states([x, y])
    assert scores.to_dict()["massive_dims"] == [17, 17]
