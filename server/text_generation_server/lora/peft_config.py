"""adapter_config.json, checked field by field: what we can serve is read, anything that would change
the adapter's meaning in a way we do not implement is refused (BAD_ADAPTER) with a message naming the
field. Messages never quote the file's contents beyond a known PEFT type name: the file may be one the
operator did not mean to expose."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from text_generation_server.errors import ErrorCode, ShardError

MAX_RANK = 256
# PEFT's method names, quoted back when an adapter is of another kind.
PEFT_TYPES = frozenset({"LORA", "ADALORA", "IA3", "LOHA", "LOKR", "OFT", "BOFT", "PROMPT_TUNING", "P_TUNING",
                        "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "POLY", "LN_TUNING", "VERA", "FOURIERFT",
                        "HRA", "VBLORA", "CPT", "BONE", "XLORA", "MISS", "RANDLORA", "SHIRA", "C3A"})


def bad(name: str, why: str) -> ShardError:
    return ShardError(ErrorCode.BAD_ADAPTER, f"adapter {name!r}: {why}")


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA


def _kind(v: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def read_config(name: str, path: Path) -> LoraConfig:
    """Parses and checks the adapter_config.json at `path` (already checked to be allowed)."""
    try:
        conf = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise bad(name, f"adapter_config.json is not valid JSON (line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise bad(name, f"adapter_config.json cannot be read ({type(e).__name__})") from None
    if not isinstance(conf, dict):
        raise bad(name, f"adapter_config.json must hold a JSON object, not {_kind(conf)}")
    peft_type = conf.get("peft_type", "LORA")
    if peft_type != "LORA":
        what = repr(peft_type) if isinstance(peft_type, str) and peft_type in PEFT_TYPES else f"{_kind(peft_type)} that is not a PEFT type"
        raise bad(name, f"`peft_type` must be \"LORA\", got {what}")
    r = conf.get("r")
    if type(r) is not int:
        raise bad(name, f"`r` (the rank) must be an integer from 1 to {MAX_RANK}, got {_kind(r)}")
    if not 1 <= r <= MAX_RANK:
        raise bad(name, f"`r` (the rank) must be from 1 to {MAX_RANK}, got {r}")
    alpha = conf.get("lora_alpha", r)
    if alpha is None:
        alpha = r
    if type(alpha) not in (int, float) or not math.isfinite(alpha):
        raise bad(name, f"`lora_alpha` must be a finite number, got {_kind(alpha)}")
    rslora = conf.get("use_rslora", False)
    if rslora is not None and type(rslora) is not bool:
        raise bad(name, f"`use_rslora` must be true or false, got {_kind(rslora)}")
    # Variants whose weights we would read but apply wrongly: refused, never half-served.
    for field, why in (("fan_in_fan_out", "transposed (Conv1D) weights are not supported"),
                       ("use_dora", "DoRA adapters are not supported")):
        v = conf.get(field)
        if v not in (None, False):
            raise bad(name, f"`{field}` must be false: {why}")
    bias = conf.get("bias", "none")
    if bias not in (None, "none"):
        raise bad(name, "`bias` must be \"none\": LoRA bias terms are not supported")
    for field in ("rank_pattern", "alpha_pattern"):
        v = conf.get(field)
        if v not in (None, {}):
            raise bad(name, f"`{field}` must be empty: per-module ranks and alphas are not supported")
    if conf.get("modules_to_save") not in (None, []):
        raise bad(name, "`modules_to_save` must be empty: fully trained modules are not supported")
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    return LoraConfig(r, float(scaling))
