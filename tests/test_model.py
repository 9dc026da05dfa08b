"""Tests of the DiT (hybriddiff/model): outputs, adaLN, weighted embedding (seed 000 Eq. 12), heads,
SEDD scores, rotary embeddings, attention kernels against a loop reference, FLOPs and memory."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybriddiff.model import DiT, DiTConfig, dot_product_attention
from hybriddiff.model.attention import check_backend, cudnn_attention, splash_attention
from hybriddiff.model.flops import allowed_pairs, forward_flops
from hybriddiff.model.layers import TokenEmbedding

N = 37
BATCH, LENGTH = 2, 9
TINY = DiTConfig(num_tokens=N, num_layers=2, d_model=32, num_heads=4, dropout_rate=0.0,
                 dtype=jnp.float32, remat=False, attention_query_chunk=None)


def make_inputs(seed: int = 0, batch: int = BATCH, length: int = LENGTH, mask_fraction: float = 0.3):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, N, size=(batch, length))
    tokens[rng.random((batch, length)) < mask_fraction] = N  # some MASK inputs
    sigma_bar = rng.uniform(0.05, 3.0, size=(batch, length))
    return jnp.asarray(tokens, jnp.int32), jnp.arange(length, dtype=jnp.int32), \
        jnp.asarray(sigma_bar, jnp.float32)


def copy_params(source: nnx.Module, target: nnx.Module) -> None:
    """Copy into ``target`` every parameter that ``source`` has at the same path."""
    src = dict(nnx.to_flat_state(nnx.state(source, nnx.Param)))
    flat = [(path, src[path]) for path, _ in nnx.to_flat_state(nnx.state(target, nnx.Param))
            if path in src]
    nnx.update(target, nnx.from_flat_state(flat))


def perturb_modulation(model: DiT, seed: int = 1, scale: float = 0.3) -> None:
    """Give every adaLN map random weights (a "trained" time-conditioned model)."""
    rng = np.random.default_rng(seed)
    for module in [block.modulation for block in model.blocks] + [model.final_modulation]:
        module.kernel[...] = jnp.asarray(rng.normal(0, scale, module.kernel.shape), jnp.float32)
        module.bias[...] = jnp.asarray(rng.normal(0, scale, module.bias.shape), jnp.float32)


def loop_attention(q, k, v, mask) -> np.ndarray:
    """Softmax attention row by row in float64; rows without an allowed key give zeros."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    batch, num_q, heads, head_dim = q.shape
    mask = np.broadcast_to(np.asarray(mask, bool), (batch, num_q, k.shape[1]))
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            for i in range(num_q):
                allowed = np.flatnonzero(mask[b, i])
                if allowed.size == 0:
                    continue
                scores = np.array([q[b, i, h] @ k[b, j, h] for j in allowed]) / math.sqrt(head_dim)
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                out[b, i, h] = sum(w * v[b, j, h] for w, j in zip(weights, allowed))
    return out


@pytest.fixture(scope="module")
def tiny_model() -> DiT:
    return DiT(TINY, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("field, value", [
    ("num_tokens", 1), ("num_layers", 0), ("d_model", 30), ("num_heads", 0), ("mlp_ratio", 0),
    ("output", "logits"), ("attention_impl", "flash"), ("dropout_rate", 1.0),
    ("attention_query_chunk", 0), ("vocab_multiple", 0), ("dtype", jnp.int32),
    ("layer_norm_epsilon", 0.0), ("rotary_base", 1.0), ("gamma", 1.5),
])
def test_config_rejects_bad_fields(field: str, value) -> None:
    kwargs = dict(num_tokens=N, num_layers=2, d_model=32, num_heads=4)
    kwargs[field] = value
    expected = "num_heads|d_model" if field == "d_model" else field
    with pytest.raises(ValueError, match=expected):
        DiTConfig(**kwargs)


def test_config_rejects_odd_head_dim_and_missing_gamma() -> None:
    with pytest.raises(ValueError, match="head dimension 3"):
        DiTConfig(num_tokens=N, d_model=12, num_heads=4)
    with pytest.raises(ValueError, match="gamma"):
        DiTConfig(num_tokens=N, weighted_embedding=True)


def test_config_derived_sizes() -> None:
    assert (TINY.mask_id, TINY.vocab_size, TINY.padded_vocab_size) == (37, 38, 128)
    assert (TINY.head_dim, TINY.mlp_dim) == (8, 128)
    big = DiTConfig(num_tokens=50257)
    assert big.padded_vocab_size == 50304 and big.padded_vocab_size % 128 == 0
    assert big.dtype == jnp.bfloat16 and big.param_dtype == jnp.float32


# ------------------------------------------------------------------------------------------ outputs
def test_log_probs_are_normalised_over_ordinary_tokens(tiny_model: DiT) -> None:
    tokens, positions, sigma_bar = make_inputs()
    out = tiny_model(tokens, positions, sigma_bar)
    assert out.shape == (BATCH, LENGTH, N) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.exp(np.asarray(out, np.float64)).sum(-1), 1.0, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_outputs() -> None:
    config = dataclasses.replace(TINY, dtype=jnp.bfloat16)
    model = DiT(config, rngs=nnx.Rngs(0))
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    out = model(*make_inputs())
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(np.exp(np.asarray(out, np.float64)).sum(-1), 1.0, atol=1e-5)


def test_mask_and_padding_columns_of_the_head_are_never_output(tiny_model: DiT) -> None:
    inputs = make_inputs()
    before = tiny_model(*inputs)
    model = DiT(TINY, rngs=nnx.Rngs(0))
    model.head[:, N:] = 100.0  # MASK column and vocabulary padding
    np.testing.assert_array_equal(model(*inputs), before)
    model.head[:, 0] = jnp.asarray(np.random.default_rng(1).normal(size=TINY.d_model), jnp.float32)
    assert float(jnp.max(jnp.abs(model(*inputs) - before))) > 1e-3


def test_fresh_adaln_model_ignores_sigma_bar_and_equals_plain_model(tiny_model: DiT) -> None:
    tokens, positions, sigma_bar = make_inputs()
    out = tiny_model(tokens, positions, sigma_bar)
    np.testing.assert_array_equal(tiny_model(tokens, positions, 3.0 * sigma_bar + 1.0), out)
    plain = DiT(dataclasses.replace(TINY, time_conditioning=False), rngs=nnx.Rngs(5))
    copy_params(tiny_model, plain)
    np.testing.assert_allclose(plain(tokens, positions, None), out, atol=1e-6)


def test_perturbed_adaln_model_depends_on_sigma_bar() -> None:
    model = DiT(TINY, rngs=nnx.Rngs(0))
    perturb_modulation(model)
    tokens, positions, sigma_bar = make_inputs()
    difference = model(tokens, positions, sigma_bar) - model(tokens, positions, sigma_bar + 1.0)
    assert float(jnp.max(jnp.abs(difference))) > 1e-2


def test_weighted_embedding_is_eq12() -> None:
    gamma = 0.3
    config = dataclasses.replace(TINY, weighted_embedding=True, gamma=gamma)
    embedding = TokenEmbedding(config, rngs=nnx.Rngs(3))
    tokens, _, sigma_bar = make_inputs(seed=4)
    sigma_bar = sigma_bar.at[0, 0].set(0.0)
    got = np.asarray(embedding(tokens, sigma_bar), np.float64)
    table = np.asarray(embedding.table[...], np.float64)
    for b in range(BATCH):
        for s in range(LENGTH):
            keep = math.exp(-gamma * float(sigma_bar[b, s]))
            expected = keep * table[int(tokens[b, s])] + (1 - keep) * table[N]
            np.testing.assert_allclose(got[b, s], expected, rtol=1e-5, atol=1e-6)


def test_weighted_embedding_at_zero_noise_is_the_plain_embedding() -> None:
    config = dataclasses.replace(TINY, weighted_embedding=True, gamma=0.5, time_conditioning=False)
    weighted = DiT(config, rngs=nnx.Rngs(0))
    plain = DiT(dataclasses.replace(config, weighted_embedding=False, gamma=None), rngs=nnx.Rngs(1))
    copy_params(weighted, plain)
    tokens, positions, sigma_bar = make_inputs()
    np.testing.assert_allclose(weighted(tokens, positions, jnp.zeros_like(sigma_bar)),
                               plain(tokens, positions, None), atol=1e-6)
    assert float(jnp.max(jnp.abs(weighted(tokens, positions, sigma_bar)
                                 - plain(tokens, positions, None)))) > 1e-3


def test_tied_head_equals_untied_head_set_to_the_transposed_table() -> None:
    tied = DiT(dataclasses.replace(TINY, tied_embedding=True), rngs=nnx.Rngs(0))
    assert tied.head is None
    untied = DiT(TINY, rngs=nnx.Rngs(1))
    copy_params(tied, untied)
    untied.head[...] = tied.embedding.table[...].T
    inputs = make_inputs()
    np.testing.assert_allclose(tied(*inputs), untied(*inputs), atol=1e-6)


def test_score_output_follows_sedd_scale_by_sigma() -> None:
    tokens, positions, sigma_bar = make_inputs(mask_fraction=0.5)
    score_model = DiT(dataclasses.replace(TINY, output="score"), rngs=nnx.Rngs(0))
    probs_model = DiT(TINY, rngs=nnx.Rngs(0))
    perturb_modulation(score_model)
    perturb_modulation(probs_model)
    score = np.asarray(score_model(tokens, positions, sigma_bar), np.float64)
    log_probs = np.asarray(probs_model(tokens, positions, sigma_bar), np.float64)
    sig = np.asarray(sigma_bar, np.float64)
    shift = np.log(np.expm1(sig)) + np.log(N)
    for b in range(BATCH):
        for s in range(LENGTH):
            x = int(tokens[b, s])
            if x == N:  # raw output = score + shift; its log-softmax is the log-probs model's output
                raw = score[b, s] + shift[b, s]
                np.testing.assert_allclose(raw - np.log(np.exp(raw).sum()), log_probs[b, s], atol=1e-5)
            else:  # current token's entry is 0; the others are the raw output
                assert score[b, s, x] == 0.0
                others = np.delete(np.arange(N), x)
                np.testing.assert_allclose(score[b, s, others] - score[b, s, others[0]],
                                           log_probs[b, s, others] - log_probs[b, s, others[0]],
                                           atol=1e-5)
    # With a zero head the raw output is 0: MASK positions give -log(expm1(sigma_bar)) - log(N).
    score_model.head[...] = jnp.zeros_like(score_model.head[...])
    extreme = sigma_bar.at[0].set(jnp.linspace(1e-6, 60.0, LENGTH))
    score = np.asarray(score_model(tokens, positions, extreme), np.float64)
    expected = -(np.log(np.expm1(np.asarray(extreme, np.float64))) + np.log(N))
    is_mask = np.asarray(tokens) == N
    np.testing.assert_allclose(score[is_mask], np.repeat(expected[is_mask][:, None], N, 1), rtol=1e-5)
    np.testing.assert_array_equal(score[~is_mask], 0.0)


def test_score_head_reads_the_given_state_and_level() -> None:
    """``score_tokens`` / ``score_sigma_bar`` (the state a SHIFTED cell predicts) change only the
    score head: the same raw output r, zeroed at the given current token, shifted by the given
    level where the given token is MASK; in the cached forward too."""
    tokens, positions, sigma_bar = make_inputs(mask_fraction=0.5)
    model = DiT(dataclasses.replace(TINY, output="score"), rngs=nnx.Rngs(0))
    perturb_modulation(model)
    rng = np.random.default_rng(3)
    ahead = rng.integers(0, N + 1, size=tokens.shape)
    ahead[:, 0] = N  # at least one MASK and one ordinary token per row
    ahead[:, 1] = 4
    ahead_sigma = rng.uniform(0.05, 3.0, size=tokens.shape)
    given = np.asarray(model(tokens, positions, sigma_bar, score_tokens=jnp.asarray(ahead),
                             score_sigma_bar=jnp.asarray(ahead_sigma, jnp.float32)), np.float64)
    np.testing.assert_array_equal(np.asarray(model(tokens, positions, sigma_bar, score_tokens=tokens,
                                                   score_sigma_bar=sigma_bar)),
                                  np.asarray(model(tokens, positions, sigma_bar)))
    # The raw output r of every cell, from an all-MASK context at a known level.
    unit = jnp.ones(tokens.shape, jnp.float32)
    raw = np.asarray(model(tokens, positions, sigma_bar, score_tokens=jnp.full(tokens.shape, N),
                           score_sigma_bar=unit), np.float64) + np.log(np.expm1(1.0)) + np.log(N)
    shift = np.log(np.expm1(ahead_sigma)) + np.log(N)
    expected = np.where((ahead == N)[..., None], raw - shift[..., None], raw)
    expected[np.arange(BATCH)[:, None], np.arange(LENGTH)[None], np.minimum(ahead, N - 1)] = \
        np.where(ahead == N, expected[np.arange(BATCH)[:, None], np.arange(LENGTH)[None],
                                      np.minimum(ahead, N - 1)], 0.0)
    np.testing.assert_allclose(given, expected, atol=2e-5)
    cache = model.init_cache(BATCH, LENGTH, jnp.float32)
    cached, _ = model.forward_cached(tokens, positions, sigma_bar, cache,
                                     score_tokens=jnp.asarray(ahead),
                                     score_sigma_bar=jnp.asarray(ahead_sigma, jnp.float32))
    np.testing.assert_allclose(np.asarray(cached), given, atol=2e-5)
    with pytest.raises(ValueError, match=r"score_tokens must have shape \(2, 9\)"):
        model(tokens, positions, sigma_bar, score_tokens=tokens[:, :-1])
    with pytest.raises(ValueError, match="score_tokens must be an integer array"):
        model(tokens, positions, sigma_bar, score_tokens=sigma_bar)
    with pytest.raises(ValueError, match=r"score_sigma_bar must have shape \(2, 9\)"):
        model.forward_cached(tokens, positions, sigma_bar, cache, score_sigma_bar=sigma_bar[0])


def test_dropout_is_active_only_when_not_deterministic() -> None:
    model = DiT(dataclasses.replace(TINY, dropout_rate=0.5), rngs=nnx.Rngs(0))
    inputs = make_inputs()
    reference = model(*inputs)
    np.testing.assert_array_equal(model(*inputs, deterministic=True), reference)
    first = model(*inputs, deterministic=False)
    second = model(*inputs, deterministic=False)
    assert bool(jnp.all(jnp.isfinite(first)))
    assert float(jnp.max(jnp.abs(first - reference))) > 1e-3
    assert float(jnp.max(jnp.abs(first - second))) > 1e-3
    key = jax.random.key(7)
    np.testing.assert_array_equal(model(*inputs, deterministic=False, dropout_key=key),
                                  model(*inputs, deterministic=False, dropout_key=key))
    # Both training styles compile: nnx transforms with the model's stream, jax transforms with a key.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def pure(params, key):
        def loss(params):
            return jnp.mean(nnx.merge(graphdef, params, rest)(*inputs, deterministic=False,
                                                             dropout_key=key))
        return jax.value_and_grad(loss)(params)

    @nnx.jit
    def stateful(model):
        return nnx.value_and_grad(lambda m: jnp.mean(m(*inputs, deterministic=False)))(model)

    value, _ = pure(params, key)
    np.testing.assert_allclose(value, jnp.mean(model(*inputs, deterministic=False, dropout_key=key)),
                               rtol=1e-5)
    assert float(stateful(model)[0]) != float(stateful(model)[0])  # the stream advances


def test_rotary_depends_only_on_relative_positions(tiny_model: DiT) -> None:
    tokens, positions, sigma_bar = make_inputs()
    out = tiny_model(tokens, positions, sigma_bar)
    np.testing.assert_allclose(tiny_model(tokens, positions + 11, sigma_bar), out, atol=2e-5)
    per_example = jnp.tile(positions[None], (BATCH, 1))
    np.testing.assert_allclose(tiny_model(tokens, per_example, sigma_bar), out, atol=1e-6)
    shuffled = tiny_model(tokens, positions[::-1], sigma_bar)
    assert float(jnp.max(jnp.abs(shuffled - out))) > 1e-3


def test_remat_and_query_chunks_change_neither_outputs_nor_gradients(tiny_model: DiT) -> None:
    tokens, positions, sigma_bar = make_inputs()
    mask = np.random.default_rng(2).random((LENGTH, LENGTH)) < 0.5
    chunked = DiT(dataclasses.replace(TINY, remat=True, attention_query_chunk=4), rngs=nnx.Rngs(0))
    weights = jnp.asarray(np.random.default_rng(3).normal(size=(BATCH, LENGTH, N)), jnp.float32)

    def loss(model: DiT) -> jax.Array:
        return jnp.sum(weights * model(tokens, positions, sigma_bar, mask=mask))

    value, grads = nnx.jit(nnx.value_and_grad(loss))(tiny_model)
    value_chunked, grads_chunked = nnx.jit(nnx.value_and_grad(loss))(chunked)
    np.testing.assert_allclose(value_chunked, value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_chunked), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_model_with_empty_mask_rows_stays_finite(tiny_model: DiT) -> None:
    tokens, positions, sigma_bar = make_inputs()
    mask = np.tril(np.ones((LENGTH, LENGTH), bool), -1)  # row 0 has no allowed key
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(tokens, positions, sigma_bar, mask=mask))))(tiny_model)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_forward_rejects_bad_inputs(tiny_model: DiT) -> None:
    tokens, positions, sigma_bar = make_inputs()
    with pytest.raises(ValueError, match="tokens"):
        tiny_model(tokens.astype(jnp.float32), positions, sigma_bar)
    with pytest.raises(ValueError, match="positions"):
        tiny_model(tokens, positions[:-1], sigma_bar)
    with pytest.raises(ValueError, match="sigma_bar is None.*time_conditioning=True"):
        tiny_model(tokens, positions, None)
    with pytest.raises(ValueError, match="sigma_bar must have shape"):
        tiny_model(tokens, positions, sigma_bar[:, :-1])
    with pytest.raises(ValueError, match="mask has shape"):
        tiny_model(tokens, positions, sigma_bar, mask=np.ones((LENGTH, LENGTH + 1), bool))


# ---------------------------------------------------------------------------------------- attention
def random_qkv(seed: int, batch: int = 2, num_q: int = 7, num_k: int = 9, heads: int = 2, dim: int = 8):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(batch, n, heads, dim)), jnp.float32)
                 for n in (num_q, num_k, num_k))


@pytest.mark.parametrize("mask_kind", ["none", "numpy", "per_example", "all_false"])
@pytest.mark.parametrize("query_chunk", [None, 3])
def test_xla_attention_matches_loop_reference(mask_kind: str, query_chunk: int | None) -> None:
    q, k, v = random_qkv(7)
    rng = np.random.default_rng(8)
    mask = {"none": None, "numpy": rng.random((7, 9)) < 0.4,
            "per_example": jnp.asarray(rng.random((2, 7, 9)) < 0.4),
            "all_false": np.zeros((7, 9), bool)}[mask_kind]
    if mask_kind == "numpy":
        mask[2] = False  # one row with no allowed key
    out = dot_product_attention(q, k, v, mask, query_chunk=query_chunk)
    reference = loop_attention(q, k, v, np.ones((7, 9), bool) if mask is None else mask)
    np.testing.assert_allclose(out, reference, atol=1e-5)
    if mask_kind in ("numpy", "all_false"):
        empty = ~np.asarray(mask).any(-1)
        assert np.all(np.asarray(out)[:, empty] == 0.0)


def test_attention_gradient_is_finite_with_empty_rows() -> None:
    q, k, v = random_qkv(9)
    mask = np.zeros((7, 9), bool)
    mask[1:, :4] = True
    grads = jax.grad(lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, mask) ** 2),
                     argnums=(0, 1, 2))(q, k, v)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    assert float(jnp.max(jnp.abs(grads[0][:, 0]))) == 0.0


def test_gpu_and_tpu_kernels_raise_on_cpu() -> None:
    assert jax.default_backend() == "cpu"
    with pytest.raises(ValueError, match="attention_impl='cudnn'.*GPU.*'cpu'"):
        DiT(dataclasses.replace(TINY, attention_impl="cudnn"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention_impl='splash'.*TPU.*'cpu'"):
        DiT(dataclasses.replace(TINY, attention_impl="splash"), rngs=nnx.Rngs(0))
    q, k, v = random_qkv(1)
    for implementation in ("cudnn", "splash"):
        with pytest.raises(ValueError, match=f"attention_impl='{implementation}'.*'cpu'"):
            dot_product_attention(q, k, v, None, implementation=implementation)
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        check_backend("flash")
    check_backend("cudnn", backend="gpu")
    check_backend("splash", backend="tpu")


def test_unsupported_kernel_settings_raise() -> None:
    q, k, v = random_qkv(2)
    with pytest.raises(ValueError, match="attention_impl='cudnn'.*dtype=float32"):
        cudnn_attention(q, k, v, None)
    q16, k16, v16 = (a.astype(jnp.bfloat16)[..., :6] for a in (q, k, v))
    with pytest.raises(ValueError, match="attention_impl='cudnn'.*head_dim=6"):
        cudnn_attention(q16, k16, v16, None)
    with pytest.raises(ValueError, match="attention_impl='splash'.*numpy mask"):
        splash_attention(q, k, v, jnp.ones((7, 9), bool), interpret=True)


def test_splash_attention_in_interpret_mode_matches_xla() -> None:
    q, k, v = random_qkv(3, num_q=37, num_k=37)
    mask = np.random.default_rng(4).random((37, 37)) < 0.3
    mask[5] = False

    def loss(implementation: str):
        return lambda q, k, v: jnp.sum(jnp.sin(dot_product_attention(
            q, k, v, mask, implementation=implementation, interpret=True)))

    np.testing.assert_allclose(
        dot_product_attention(q, k, v, mask, implementation="splash", interpret=True),
        dot_product_attention(q, k, v, mask), atol=1e-5)
    grads = jax.grad(loss("splash"), argnums=(0, 1, 2))(q, k, v)
    reference = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(grads, reference):
        np.testing.assert_allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------------------------------- flops
def test_forward_flops_match_a_hand_count() -> None:
    config = DiTConfig(num_tokens=10, num_layers=2, d_model=8, num_heads=2, mlp_ratio=4, cond_dim=4,
                       frequency_embedding_size=6)
    mask = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]], bool)  # 3 allowed pairs
    # per token: layers 2 x (qkv 2*8*24=384 + out 2*8*8=128 + mlp 2*(2*8*32)=1024 + adaLN 2*4*48=384)
    # + head 2*8*10=160 + final adaLN 2*4*16=128 + time MLP 2*(6*4+4*4)=80
    per_token = 2 * (384 + 128 + 1024 + 384) + 160 + 128 + 80
    count = forward_flops(config, batch_size=5, length=3, mask=mask)
    assert count.matmul == 5 * 3 * per_token
    assert count.attention == 2 * 4 * 8 * 5 * 3  # layers * (2 + 2) * D * batch * allowed pairs
    assert count.total == count.matmul + count.attention and count.train_step == 3 * count.total
    assert forward_flops(config, 1, 3).attention == 2 * 4 * 8 * 9
    plain = dataclasses.replace(config, time_conditioning=False)
    assert forward_flops(plain, 1, 1).matmul == 2 * (384 + 128 + 1024) + 160
    assert allowed_pairs(np.stack([mask, ~mask]), 2, 3) == 9
    with pytest.raises(ValueError, match="mask has shape"):
        allowed_pairs(mask[:2], 1, 3)


# ------------------------------------------------------------------------------------------ memory
def compiled_temp_bytes(config: DiTConfig, batch: int, length: int) -> tuple[int, int]:
    """(temporary, argument + output) bytes of a compiled gradient step, without running it."""
    abstract = nnx.eval_shape(lambda: DiT(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    sigma_bar = jax.ShapeDtypeStruct((batch, length), jnp.float32)

    def loss(params, tokens, sigma_bar):
        out = nnx.merge(graphdef, params, rest)(tokens, jnp.arange(length), sigma_bar)
        return -jnp.mean(jnp.take_along_axis(out, jnp.minimum(tokens, config.num_tokens - 1)[..., None],
                                             -1))

    analysis = jax.jit(jax.grad(loss)).lower(params, tokens, sigma_bar).compile().memory_analysis()
    return analysis.temp_size_in_bytes, analysis.argument_size_in_bytes + analysis.output_size_in_bytes


def test_query_chunks_bound_the_attention_scores_in_memory() -> None:
    """Per-layer growth of the compiled temporary memory of a gradient step: full-size float32
    [B, H, S, S] score buffers per layer without chunks, less than one such buffer with chunks
    (the compiler here does not honour rematerialisation alone, so chunking is what bounds memory)."""
    batch, length, heads = 2, 1024, 4
    config = DiTConfig(num_tokens=N, num_layers=1, d_model=64, num_heads=heads, dropout_rate=0.0)
    scores = batch * heads * length * length * 4

    def per_layer(chunk: int | None) -> int:
        one = compiled_temp_bytes(dataclasses.replace(config, attention_query_chunk=chunk), batch, length)
        two = compiled_temp_bytes(dataclasses.replace(config, attention_query_chunk=chunk, num_layers=2),
                                  batch, length)
        return two[0] - one[0]

    assert per_layer(None) >= 2 * scores
    assert 0 < per_layer(128) < scores


def test_small_model_training_on_2x2048_fits_in_24_gib() -> None:
    """The paper's small model (12 x 768, 12 heads, GPT-2 vocabulary) trained on a 2 x 2048 input
    (the 2L BD3 layout for L = 1024): compile 1 and 2 layers at batch 1, extrapolate linearly to 12
    layers and batch 2 (every activation is linear in batch and layers; parameters are counted twice)."""
    config = DiTConfig(num_tokens=50257, num_layers=1, d_model=768, num_heads=12, dropout_rate=0.0)
    temp_1, io_1 = compiled_temp_bytes(config, 1, 2048)
    temp_2, io_2 = compiled_temp_bytes(dataclasses.replace(config, num_layers=2), 1, 2048)
    per_layer_temp, per_layer_io = temp_2 - temp_1, io_2 - io_1
    assert 0 < per_layer_temp < 2**30
    temp_12 = 2 * (temp_1 + 11 * per_layer_temp)
    io_12 = 2 * (io_1 + 11 * per_layer_io)
    assert temp_12 + io_12 < 16 * 2**30  # well under the 24 GiB of host memory
