"""Tiny random-weight models of each family beyond Llama, made with transformers, with what sets
the family apart switched on: several layers, GQA, sliding windows (8) shorter than the test
prompts, soft-capping, partial rotary with LongRoPE, mixtures of 8 experts with 2 per token.
Shared by the CPU, GPU and end-to-end family tests (tests_gpu and integration-tests put this
directory on sys.path)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

FAMILIES = ["qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen3_moe", "qwen2_moe"]
MOE = {"mixtral", "qwen3_moe", "qwen2_moe"}
EXPERTS = 8  # each mixture's, 2 per token
ROUTERS = ("mlp.gate", "block_sparse_moe.gate")  # transformers' router modules (Mixtral's, Qwen's)
WINDOW = 8

# What PEFT targets on each family: every projection of a dense model (Phi-3 names its fused
# ones), the attention projections of a mixture of experts.
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
PEFT_TARGETS = {k: ATTENTION + ["gate_proj", "up_proj", "down_proj"] for k in FAMILIES}
PEFT_TARGETS["phi3"] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
for _k in MOE:
    PEFT_TARGETS[_k] = ATTENTION


# The GPU tests' size: FlashInfer's head_dim 64, weights large enough for clear greedy choices
# (Gemma 2's caps raised to match; no tied LM head, which at this scale echoes the last token).
# Routers stay as transformers makes them: sharper ones flip experts no less often (margins and
# rounding scale alike) and make the routing weights, a softmax of the router logits, amplify
# rounding. bf16 against float32 on the CPU, on the same experts: with 8x routers up to 2.1, and
# ours and transformers' up to 3.6x apart; as made, up to 0.63 and within 1.4x of each other.
# The GPU tests put the references on the experts ours picked (`their_routing`), so flips no
# longer decide a comparison.
GPU = dict(hidden_size=256, intermediate_size=512, head_dim=64, max_position_embeddings=1024, initializer_range=0.1,
           attn_logit_softcapping=20.0, final_logit_softcapping=15.0, tie_word_embeddings=False)


def config(kind: str, vocab: int = 97, **dims):
    """(transformers config, model class) of a tiny `kind` model; `dims` override the sizes (`GPU`)."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
                  eos_token_id=1, bos_token_id=0, pad_token_id=0)
    common.update(dims)
    if kind != "gemma2":  # the soft caps are Gemma 2's alone
        common.pop("attn_logit_softcapping", None), common.pop("final_logit_softcapping", None)
    moe_inter = common["intermediate_size"] // 4  # (x 4 bytes a multiple of 16: transformers' grouped GEMM)

    def own(**defaults):
        """A family's own settings, which `dims` may override too."""
        return {k: common.pop(k, v) for k, v in defaults.items()}

    tie = common.pop("tie_word_embeddings", None)

    def tied(default: bool):
        return dict(tie_word_embeddings=default if tie is None else tie)

    if kind == "qwen3":  # q/k norms; the last two layers slide
        return tf.Qwen3Config(**common, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2,
                              **tied(False)), tf.Qwen3ForCausalLM
    if kind == "gemma2":  # soft caps low enough to bite on random weights; sliding and global layers alternate
        return tf.Gemma2Config(**own(sliding_window=WINDOW, query_pre_attn_scalar=24, attn_logit_softcapping=1.5,
                                     final_logit_softcapping=2.0), **tied(True), **common), tf.Gemma2ForCausalLM
    if kind == "gemma3":  # five sliding layers to one global, each kind its own rope (the global one scaled)
        c = dict(common, num_hidden_layers=6)
        return tf.Gemma3TextConfig(**c, **tied(True), sliding_window=WINDOW, query_pre_attn_scalar=24, rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}), tf.Gemma3ForCausalLM
    if kind == "phi3":  # fused qkv / gate_up; LongRoPE over half of each head; a sliding window everywhere
        g = torch.Generator().manual_seed(11)
        pairs = common["head_dim"] // 4  # half of each head rotates
        short = (1 + torch.rand(pairs, generator=g)).tolist()
        long = (2 + 4 * torch.rand(pairs, generator=g)).tolist()
        return tf.Phi3Config(**common, sliding_window=WINDOW, partial_rotary_factor=0.5, original_max_position_embeddings=64,
                             rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long},
                             **tied(False)), tf.Phi3ForCausalLM
    if kind == "mixtral":
        return tf.MixtralConfig(**common, num_local_experts=EXPERTS, num_experts_per_tok=2, sliding_window=WINDOW,
                                **tied(False)), tf.MixtralForCausalLM
    if kind == "qwen3_moe":  # layer 1 keeps a dense MLP; top-2 renormalised
        return tf.Qwen3MoeConfig(**common, num_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=moe_inter,
                                 norm_topk_prob=True, mlp_only_layers=[1], **tied(False)), tf.Qwen3MoeForCausalLM
    if kind == "qwen2_moe":  # a shared expert beside the routed ones; top-2 not renormalised
        return tf.Qwen2MoeConfig(**common, num_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=moe_inter,
                                 shared_expert_intermediate_size=common["intermediate_size"] // 2, norm_topk_prob=False,
                                 **tied(False)), tf.Qwen2MoeForCausalLM
    raise ValueError(kind)


def write(path: Path, kind: str, vocab: int = 97, seed: int = 0, **dims):
    """Saves a random `kind` model under `path`; returns (path, the transformers model, eval mode)."""
    cfg, cls = config(kind, vocab, **dims)
    # transformers' eager attention, the reference arithmetic: torch's SDPA has no soft cap, and
    # the GPU machine's transformers picked it for Gemma 2 (this machine's refuses it for Gemma 2)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # random norm weights too (transformers starts them at 1, or 0 for Gemma's 1 + w)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return path, model


def moe_layers(model) -> int:
    """How many of transformers' `model` layers are mixtures (0 for a dense model)."""
    return sum(name.endswith(ROUTERS) for name, _ in model.named_modules())


def forced_weights(logits: torch.Tensor, ids: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """A router's weights for experts it was told to pick: their softmax probabilities over all
    experts (float32), renormalised over the chosen when the model does."""
    w = torch.softmax(logits.float(), -1).gather(-1, ids)
    return w / w.sum(-1, keepdim=True) if renormalize else w


@contextmanager
def our_routing(force=None):
    """Records the experts our mixture layers pick, one [tokens, k] tensor per layer call in order
    (the yielded list); with `force` (such a list), the layers pick those experts instead."""
    from text_generation_server.layers import moe

    real, seen, it = moe.route, [], None if force is None else iter(force)

    def spy(logits, top_k, renormalize):
        weights, ids = real(logits, top_k, renormalize)
        if it is not None:
            ids = _next_forced(it, logits, "layer")
            weights = forced_weights(logits, ids, renormalize)
        seen.append(ids.cpu())
        return weights, ids

    moe.route = spy
    try:
        yield seen
    finally:
        moe.route = real
    if it is not None:
        _all_used(it, "layer")


@contextmanager
def their_routing(model, force):
    """transformers' `model` with each mixture layer's router picking the experts in `force`
    (as `our_routing` records them), weighted by its own probabilities."""
    it, hooks = iter(force), []

    def hook(router, args, out):
        assert isinstance(out, tuple) and len(out) == 3, "a router returning (logits, weights, ids) expected"
        logits, weights, _ = out
        ids = _next_forced(it, logits, "router")
        return logits, forced_weights(logits, ids, getattr(router, "norm_topk_prob", True)).to(weights.dtype), ids

    for name, m in model.named_modules():
        if name.endswith(ROUTERS):  # (Mixtral's routers have no norm_topk_prob: they always renormalise)
            hooks.append(m.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
    _all_used(it, "router")


def _next_forced(it, logits: torch.Tensor, caller: str) -> torch.Tensor:
    """The next forced [tokens, k] choice for a `caller` call on `logits`, on their device."""
    forced = next(it, None)
    assert forced is not None, f"more {caller} calls than forced choices"
    assert forced.shape[0] == logits.shape[0], "forced choices for other tokens"
    return forced.to(logits.device)


def _all_used(it, caller: str) -> None:
    assert next(it, None) is None, f"fewer {caller} calls than forced choices"


def gemma3_multimodal(vocab: int = 97, seed: int = 0):
    """A tiny Gemma3ForConditionalGeneration (the layout of Gemma 3 4B and up): the family's
    Gemma 3 text model beside a one-layer image encoder, with its image tokens at the top of the
    vocabulary. Returns the transformers model (eval mode, not saved)."""
    import transformers as tf

    text, _ = config("gemma3", vocab)
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=28, patch_size=14)
    cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=vocab - 1,
                          boi_token_index=vocab - 3, eoi_token_index=vocab - 2)
    torch.manual_seed(seed)
    return tf.Gemma3ForConditionalGeneration(cfg).eval()


def adapter(path: Path, model_dir: Path, kind: str, seed: int = 5, r: int = 4, std: float = 0.2) -> Path:
    """A peft LoRA adapter on the family's PEFT targets, B random."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    m = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=PEFT_TARGETS[kind]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    m.save_pretrained(path)
    return path


def greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of `ids`, n tokens (no EOS stop)."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()
