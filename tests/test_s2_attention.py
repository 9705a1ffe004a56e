"""Tests for LongLoRA shifted sparse attention (ftcluster.attention)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ftcluster.attention import (
    register_s2_attention,
    s2_attention,
    s2_attention_forward,
    s2_group_size_for,
)

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------
# Slow, obviously-correct reference: explicit [N, N] masks straight from the spec.
# --------------------------------------------------------------------------------------


def s2_attention_reference(q, k, v, *, group_size):
    """Dense float64 masked-softmax S2-Attn.

    Unshifted heads [0, Hq/2): group(j) = j // G.
    Shifted heads [Hq/2, Hq): groups [0, s), [s, s+G), [s+G, s+2G), ... with s = G // 2,
    i.e. group(j) = 0 if j < s else (j - s) // G + 1. (For even G this equals the often
    quoted (j + G//2) // G; for odd G that formula would be wrong, (j + G - G//2) // G is
    the general closed form.) Nothing wraps. Query i sees key j iff same group and j <= i.
    """
    B, Hq, N, D = q.shape
    n_rep = Hq // k.shape[1]
    k = k.double().repeat_interleave(n_rep, dim=1)  # query head h reads kv head h // n_rep
    v = v.double().repeat_interleave(n_rep, dim=1)
    G, s = group_size, group_size // 2
    j = torch.arange(N)
    group_plain = j // G
    group_shift = torch.where(j < s, torch.zeros_like(j), (j - s) // G + 1)
    if G % 2 == 0:
        assert torch.equal(group_shift, (j + G // 2) // G)
    assert torch.equal(group_shift, (j + G - G // 2) // G)
    causal = j[None, :] <= j[:, None]

    def mask(g):
        return (g[:, None] == g[None, :]) & causal

    masks = torch.stack([mask(group_plain)] * (Hq // 2) + [mask(group_shift)] * (Hq // 2))  # [Hq, N, N]
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(~masks, float("-inf"))
    return scores.softmax(dim=-1) @ v


def _qkv(B, Hq, Hkv, N, D=8, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, N, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, N, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, N, D, generator=g, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


# (Hq, Hkv, N, G): MHA, GQA 4/2, MQA-ish 8/1, odd Hkv 6/3; N multiple of G, N not a
# multiple (short last group), N < G, N < G/2, N = 1, odd G, G = N, G = 2, many groups.
CASES = [
    (4, 4, 16, 4),
    (4, 4, 14, 4),
    (4, 2, 16, 4),
    (4, 2, 13, 4),
    (8, 1, 16, 4),
    (8, 1, 11, 4),
    (4, 2, 5, 8),  # N < G
    (4, 2, 3, 8),  # N < G/2
    (8, 1, 3, 8),
    (4, 2, 1, 4),  # N = 1
    (4, 4, 1, 2),
    (4, 2, 15, 5),  # odd G, N = 3G
    (8, 1, 13, 5),  # odd G, short last group
    (4, 2, 7, 3),
    (4, 2, 12, 12),  # G = N
    (4, 2, 9, 2),  # smallest G
    (6, 3, 14, 4),  # odd Hkv > 1: halves share the middle kv head
    (2, 1, 10, 4),
    (4, 2, 40, 4),  # many groups
]


@pytest.mark.parametrize("Hq,Hkv,N,G", CASES)
def test_forward_and_grad_match_reference(Hq, Hkv, N, G):
    q, k, v = _qkv(2, Hq, Hkv, N, requires_grad=True)
    out = s2_attention(q, k, v, group_size=G)
    assert out.shape == (2, Hq, N, 8)
    ref = s2_attention_reference(q, k, v, group_size=G)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)

    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for g, rg, name in zip(grads, ref_grads, "qkv"):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-9, msg=f"grad {name}")


def test_float32_matches_reference():
    q, k, v = _qkv(2, 4, 2, 22, D=16, dtype=torch.float32)
    out = s2_attention(q, k, v, group_size=8)
    assert out.dtype == torch.float32
    ref = s2_attention_reference(q, k, v, group_size=8)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_seq_major_input_layout_and_custom_scale():
    # transformers hands in q/k/v as transposed views of [B, N, H, D] buffers.
    B, N, Hq, Hkv, D = 2, 20, 4, 2, 8
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, N, Hq, D, generator=g, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64).transpose(1, 2)
    v = torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64).transpose(1, 2)
    out = s2_attention(q, k, v, group_size=4, scale=0.3)
    ref = s2_attention_reference(q * (0.3 * math.sqrt(D)), k, v, group_size=4)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert out.transpose(1, 2).is_contiguous()  # [B, N, H, D] buffer, what HF wants


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    q, k, v = _qkv(2, 4, 2, 18, D=16, dtype=torch.float32)
    ref = s2_attention(q, k, v, group_size=4)
    qh, kh, vh = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out = s2_attention(qh, kh, vh, group_size=4)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == dtype for t in (qh, kh, vh))


def _rolled_longlora_like(q, k, v, group_size):
    """What the LongLoRA reference (non-flash) path does: roll the shifted heads by -G/2,
    group, roll back. Its last group lets the first tokens see the sequence end."""
    B, H, N, D = q.shape
    s, h, n = group_size // 2, H // 2, N // group_size

    def shift(x):
        x = torch.cat([x[:, :h], x[:, h:].roll(-s, dims=2)], dim=1)
        return x.reshape(B, H, n, group_size, D).transpose(1, 2).reshape(B * n, H, group_size, D)

    o = F.scaled_dot_product_attention(shift(q), shift(k), shift(v), is_causal=True)
    o = o.reshape(B, n, H, group_size, D).transpose(1, 2).reshape(B, H, N, D)
    return torch.cat([o[:, :h], o[:, h:].roll(s, dims=2)], dim=1)


def test_nothing_wraps_around():
    G = 8
    s, N, H = G // 2, 3 * G, 4
    q, k, v = _qkv(2, H, H, N)
    v2 = v.clone()
    v2[:, :, -s:] += 10.0  # perturb the values of the last tokens
    k2 = k.clone()
    k2[:, :, -s:] -= 3.0

    out = s2_attention(q, k, v, group_size=G)
    out2 = s2_attention(q, k2, v2, group_size=G)
    h = H // 2
    # first shifted group [0, G/2): independent of the sequence end ...
    torch.testing.assert_close(out2[:, h:, :s], out[:, h:, :s], rtol=0, atol=0)
    # ... and so is everything outside the last (shifted or plain) group.
    torch.testing.assert_close(out2[:, h:, : N - s], out[:, h:, : N - s], rtol=0, atol=0)
    torch.testing.assert_close(out2[:, :h, : N - G], out[:, :h, : N - G], rtol=0, atol=0)
    # sanity: the perturbation does reach the tokens that share its group
    assert not torch.allclose(out2[:, h:, -s:], out[:, h:, -s:])
    assert not torch.allclose(out2[:, :h, -s:], out[:, :h, -s:])

    # The check has teeth: the rolled (wrap-around) construction fails it.
    rolled = _rolled_longlora_like(q, k, v, G)
    rolled2 = _rolled_longlora_like(q, k2, v2, G)
    assert not torch.allclose(rolled2[:, h:, :s], rolled[:, h:, :s])


def test_rejects_bad_arguments():
    q, k, v = _qkv(1, 4, 2, 8)
    for bad in (1, 0, -2):
        with pytest.raises(ValueError, match="group_size"):
            s2_attention(q, k, v, group_size=bad)
    with pytest.raises(ValueError, match="group_size"):
        s2_attention(q, k, v, group_size=4.0)
    q3, k3, v3 = _qkv(1, 3, 1, 8)
    with pytest.raises(ValueError, match="even"):
        s2_attention(q3, k3, v3, group_size=4)
    q4, k4, v4 = _qkv(1, 4, 3, 8)
    with pytest.raises(ValueError, match="multiple"):
        s2_attention(q4, k4, v4, group_size=4)
    with pytest.raises(ValueError, match="sequence length"):
        s2_attention(q, k[:, :, :4], v[:, :, :4], group_size=4)


def test_group_size_from_config():
    class C:
        pass

    c = C()
    assert s2_group_size_for(c, 64) == 16  # default ratio 0.25
    assert s2_group_size_for(None, 64) == 16
    assert s2_group_size_for(c, 4) == 2  # floor of 2
    c.s2_group_size_ratio = 0.5
    assert s2_group_size_for(c, 30) == 15
    c.s2_group_size = 12
    assert s2_group_size_for(c, 30) == 12  # absolute wins
    c.s2_group_size = 1
    with pytest.raises(ValueError):
        s2_group_size_for(c, 30)


# --------------------------------------------------------------------------------------
# transformers integration
# --------------------------------------------------------------------------------------


def _tiny_llama_pair(group_size=None):
    from transformers import AutoModelForCausalLM, LlamaConfig

    def cfg():  # separate config objects: from_config(attn_implementation=...) mutates its config
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=128,
        )

    torch.manual_seed(0)
    name = register_s2_attention()
    assert register_s2_attention() == name == "s2_attn"  # idempotent
    ref = AutoModelForCausalLM.from_config(cfg(), attn_implementation="sdpa")
    s2 = AutoModelForCausalLM.from_config(cfg(), attn_implementation="s2_attn")
    s2.load_state_dict(ref.state_dict())
    if group_size is not None:
        s2.config.s2_group_size = group_size
    assert ref.config._attn_implementation == "sdpa"
    assert s2.config._attn_implementation == "s2_attn"
    return ref, s2


def test_registered_in_attention_interface():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    register_s2_attention()
    assert ALL_ATTENTION_FUNCTIONS["s2_attn"] is s2_attention_forward
    assert "s2_attn" in ALL_MASK_ATTENTION_FUNCTIONS
    with pytest.raises(ValueError, match="already registered"):
        register_s2_attention("sdpa")


def test_llama_train_uses_s2_eval_uses_full_attention():
    ref, s2 = _tiny_llama_pair(group_size=8)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))

    ref.train(), s2.train()  # attention_dropout is 0.0 so train mode is deterministic
    with torch.no_grad():
        a, b = ref(ids).logits, s2(ids).logits
    assert (a - b).abs().max() > 1e-3  # N=32 > G=8: sparse attention changes the logits
    # first tokens of the first group see the same context either way (G//2 = 4 shift)
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=1e-5, atol=1e-5)

    ref.eval(), s2.eval()
    with torch.no_grad():
        torch.testing.assert_close(s2(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
        # eval keeps honouring padding masks (the SDPA mask builder is registered too)
        am = torch.ones(2, 32, dtype=torch.long)
        am[1, :5] = 0
        torch.testing.assert_close(
            s2(ids, attention_mask=am).logits, ref(ids, attention_mask=am).logits, rtol=1e-5, atol=1e-5
        )


def test_llama_train_backward_and_default_ratio():
    ref, s2 = _tiny_llama_pair()  # default ratio 0.25 -> G = 6 for N = 24
    s2.train()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    out = s2(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in s2.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert s2.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    # the all-ones mask carries no padding: accepted in training
    s2(ids, attention_mask=torch.ones_like(ids))


def test_llama_train_rejects_padding_mask():
    _, s2 = _tiny_llama_pair(group_size=8)
    s2.train()
    ids = torch.randint(0, 128, (2, 16))
    am = torch.ones_like(ids)
    am[1, -3:] = 0
    with pytest.raises(ValueError, match="right-padded batches without an attention mask"):
        s2(ids, attention_mask=am)


def test_forward_fn_eval_matches_sdpa_forward_convention():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class M(torch.nn.Module):
        is_causal = True
        num_key_value_groups = 2

        class config:
            s2_group_size = 4

    m = M()
    q, k, v = _qkv(2, 4, 2, 10, dtype=torch.float32)
    m.eval()
    o, w = s2_attention_forward(m, q, k, v, None, scaling=0.5)
    o_ref, w_ref = sdpa_attention_forward(m, q, k, v, None, scaling=0.5)
    assert w is None and w_ref is None and o.shape == (2, 10, 4, 8)
    torch.testing.assert_close(o, o_ref)
    m.train()
    o, w = s2_attention_forward(m, q, k, v, None, scaling=0.5)
    assert w is None and o.shape == (2, 10, 4, 8) and o.is_contiguous()
    torch.testing.assert_close(o, s2_attention(q, k, v, group_size=4, scale=0.5).transpose(1, 2))
    with pytest.raises(ValueError, match="query length"):
        s2_attention_forward(m, q[:, :, :1], k, v, None)
