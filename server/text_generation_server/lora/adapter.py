"""PEFT LoRA adapters: loading, validation against the base model, scaling."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from text_generation_server.errors import ErrorCode, ShardError
from text_generation_server.lora.peft_config import bad, read_config
from text_generation_server.models.config import ModelConfig

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLP_PROJECTIONS = PROJECTIONS[4:]  # a mixture of experts has none of these as LoRA targets
# Projections of one input, computed together (one GEMM on CUDA, one LoRA shrink for the group).
GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")
# Phi-3's checkpoint fuses projections, and PEFT targets the fused ones: their LoRA B is cut into
# the parts' rows (one shared A), which is the same delta.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_VISION = re.compile(r"vision_tower|vision_model|multi_modal_projector")
_MOE = re.compile(r"\.(?:experts|block_sparse_moe|shared_expert|shared_expert_gate)\.|\.mlp\.gate\.")


def peft_key(layer: int, proj: str, ab: str) -> str:
    """The tensor name peft saves for one LoRA matrix (`ab`: "A" or "B"); `_KEY` reads it back."""
    part = "mlp" if proj in MLP_PROJECTIONS or proj == "gate_up_proj" else "self_attn"
    return f"base_model.model.model.layers.{layer}.{part}.{proj}.lora_{ab}.weight"


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Projection name -> (out features, in features) of the base model's LoRA targets: every
    projection of a dense model, the attention projections of a mixture of experts."""
    h, d = cfg.hidden_size, cfg.head_dim
    shapes = {
        "q_proj": (cfg.num_heads * d, h), "k_proj": (cfg.num_kv_heads * d, h), "v_proj": (cfg.num_kv_heads * d, h),
        "o_proj": (h, cfg.num_heads * d), "gate_proj": (cfg.intermediate_size, h), "up_proj": (cfg.intermediate_size, h),
        "down_proj": (h, cfg.intermediate_size),
    }
    if cfg.is_moe:
        for p in MLP_PROJECTIONS:
            del shapes[p]
    return shapes


def peft_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """The projections as PEFT names them in an adapter of this model: Phi-3's fused ones in
    place of their parts."""
    shapes = projection_shapes(cfg)
    if cfg.model_type == "phi3":
        for fused, parts in FUSED.items():
            in_f = shapes[parts[0]][1]
            shapes[fused] = (sum(shapes.pop(p)[0] for p in parts), in_f)
    return shapes


def write_random_adapter(path: Path, cfg: ModelConfig, rank: int, targets, generator: torch.Generator, std: float,
                         dtype: torch.dtype = torch.float32, alpha: float | None = None, **config) -> Path:
    """A random-weight LoRA adapter for tests and benchmarks (which never reach a model hub), in
    the layout peft saves: its tensor names (Phi-3's fused projections as one tensor), A [r, in]
    and B [out, r] drawn from `generator` layer by layer with standard deviation `std`, and an
    adapter_config.json with lora_alpha 2r unless given and the `config` entries after it."""
    shapes = peft_shapes(cfg)
    tensors = {}
    for layer in range(cfg.num_layers):
        for t in targets:
            out_f, in_f = shapes[t]
            for ab, shape in (("A", (rank, in_f)), ("B", (out_f, rank))):
                w = torch.randn(*shape, generator=generator, device=generator.device) * std
                tensors[peft_key(layer, t, ab)] = w.to(dtype).cpu()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": alpha or 2 * rank,
                                                          **config}))
    return path


@dataclass
class Adapter:
    name: str
    rank: int
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA
    # (layer, projection) -> (A [r, in], B [out, r]), on the model's device and dtype
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def to_device(host: Adapter, device: torch.device) -> Adapter:
    """Copies a host adapter to the device; on CUDA through pinned memory on a side stream, so a
    step running meanwhile is not serialized behind the copy."""
    if device.type != "cuda":
        return Adapter(host.name, host.rank, host.scaling, {k: (a.to(device), b.to(device)) for k, (a, b) in host.weights.items()})
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        weights = {k: (a.pin_memory().to(device, non_blocking=True), b.pin_memory().to(device, non_blocking=True))
                   for k, (a, b) in host.weights.items()}
    stream.synchronize()
    return Adapter(host.name, host.rank, host.scaling, weights)


CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# Tensor names quoted back in errors: identifiers, not arbitrary bytes from the file.
_PLAIN = re.compile(r"^[A-Za-z0-9_.]{1,200}$")
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


def adapter_files(name: str, path: Path, root: Path | None) -> tuple[Path, Path]:
    """The real paths of the adapter's config and weights. With `root` (the adapter source, resolved),
    both must lie inside it: a file that is a link to elsewhere is refused before anything opens it."""
    out = []
    for fname in (CONFIG, WEIGHTS):
        real = Path(os.path.realpath(path / fname))
        if root is not None and root not in real.parents:
            raise bad(name, f"{fname} is a link to a file outside the adapter source")
        if not real.is_file():
            raise ShardError(ErrorCode.ADAPTER_NOT_FOUND, f"adapter {name!r}: no {CONFIG} + {WEIGHTS} in {path.name}")
        out.append(real)
    return out[0], out[1]


def _pairs(name: str, shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, r: int) -> dict[tuple[int, str], tuple[str, str]]:
    """(layer, projection) -> (A's tensor name, B's), with every name and shape checked against the base model."""
    proj_shapes = peft_shapes(cfg)
    found: dict[tuple[int, str], dict[str, str]] = {}
    for key in shapes:
        if _VISION.search(key):
            raise bad(name, "targets the image encoder, which this server does not run (text only)")
        if cfg.is_moe and _MOE.search(key):
            raise bad(name, "targets the mixture-of-experts MLP (experts or router), which LoRA is not supported on: "
                            "target the attention projections (q/k/v/o_proj)")
        m = _KEY.search(key)
        if not m:
            shown = repr(key) if _PLAIN.match(key) else "with an unusual name"
            raise bad(name, f"unexpected tensor {shown} (only q/k/v/o/gate/up/down LoRA A/B are supported)")
        layer, proj, ab = int(m.group(1)), m.group(2), m.group(3)
        if proj not in proj_shapes:
            why = "a projection of its experts" if cfg.is_moe and proj in MLP_PROJECTIONS else \
                "not a projection of the base model (targets: " + ", ".join(proj_shapes) + ")"
            raise bad(name, f"targets {proj!r}, {why}")
        if layer >= cfg.num_layers:
            raise bad(name, f"layer {layer} beyond the base model's {cfg.num_layers}")
        found.setdefault((layer, proj), {})[ab] = key
    if not found:
        raise bad(name, "no LoRA weights")
    pairs = {}
    for (layer, proj), ab in found.items():
        if set(ab) != {"A", "B"}:
            raise bad(name, f"layer {layer} {proj}: lora_A and lora_B must both be present")
        out_f, in_f = proj_shapes[proj]
        a, b = shapes[ab["A"]], shapes[ab["B"]]
        if tuple(a) != (r, in_f) or tuple(b) != (out_f, r):
            raise bad(name, f"layer {layer} {proj}: shapes A{tuple(a)} B{tuple(b)} do not fit "
                            f"rank {r} and the base model's ({out_f}, {in_f})")
        pairs[(layer, proj)] = (ab["A"], ab["B"])
    return pairs


def probe_adapter(name: str, path: Path, cfg: ModelConfig, root: Path | None) -> int:
    """Checks an adapter without reading its weights (config, tensor names, shapes and dtypes from the
    safetensors header); returns its rank. Cheap enough to run for every listing."""
    conf_path, weights_path = adapter_files(name, path, root)
    conf = read_config(name, conf_path)
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file is the adapter's fault
        raise bad(name, f"{WEIGHTS} is not a readable safetensors file ({type(e).__name__})") from None
    for key, (_, dtype) in header.items():
        if dtype not in _FLOAT_DTYPES:
            shown = repr(key) if _PLAIN.match(key) else "with an unusual name"
            raise bad(name, f"tensor {shown} is {dtype}, not a floating-point type")
    _pairs(name, {k: shape for k, (shape, _) in header.items()}, cfg, conf.rank)
    return conf.rank


def read_adapter(name: str, path: Path, cfg: ModelConfig, dtype: torch.dtype, root: Path | None = None,
                 split=None) -> Adapter:
    """Reads a PEFT directory into host memory in `dtype` (files only inside `root` when given); a config,
    name, shape, dtype or value the base model cannot use is a BAD_ADAPTER error. With `split` (a
    tensor-parallel rank's `parallel.Split`), each pair is cut to match its base projection there."""
    conf_path, weights_path = adapter_files(name, path, root)
    conf = read_config(name, conf_path)
    try:
        raw = load_file(str(weights_path))
    except Exception as e:  # noqa: BLE001 - any unreadable file is the adapter's fault
        raise bad(name, f"{WEIGHTS} is not a readable safetensors file ({type(e).__name__})") from None
    pairs = _pairs(name, {k: tuple(t.shape) for k, t in raw.items()}, cfg, conf.rank)
    weights = {}
    outs = {p: shape[0] for p, shape in projection_shapes(cfg).items()}
    for (layer, proj), (ka, kb) in pairs.items():
        ab = []
        for key, which in ((ka, "lora_A"), (kb, "lora_B")):
            t = raw[key]
            if not t.is_floating_point():
                raise bad(name, f"layer {layer} {proj}: {which} is {t.dtype}, not a floating-point type")
            t = t.to(dtype).contiguous()
            if not torch.isfinite(t).all():  # NaN/Inf in the file, or too large for `dtype`
                raise bad(name, f"layer {layer} {proj}: {which} holds NaN or infinite values (in {dtype})")
            ab.append(t)
        if proj in FUSED:  # one pair per part: A shared, B cut by the parts' rows
            parts = [(p, ab[0], b) for p, b in zip(FUSED[proj], ab[1].split([outs[p] for p in FUSED[proj]]))]
        else:
            parts = [(proj, ab[0], ab[1])]
        for p, a, b in parts:
            weights[(layer, p)] = (a, b.contiguous()) if split is None else split.lora(p, a, b.contiguous())
    return Adapter(name, conf.rank, conf.scaling, weights)
