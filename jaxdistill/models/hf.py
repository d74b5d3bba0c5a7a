"""HF transformers checkpoints <-> jaxdistill models: configs, safetensors import, export, tokenizers.

Longer than ~400 lines because the HF boundary of five families (config mapping, weight tables,
import, export) shares one weight map.

Import (`load_hf`) reads `*.safetensors` (single file or sharded with
`model.safetensors.index.json`) and builds every weight with `jax.make_array_from_callback`
directly in the sharding the logical-axis rules give it: each device's callback reads only its
slice of the checkpoint (per layer for the stacked `layers` axis), so no process ever holds a
full host copy of a weight per device. Linear weights are transposed (HF stores [out, in], we
store [in, out]); per-layer tensors are stacked on the leading `layers` axis.

Export (`export_hf`) writes a directory transformers loads with `AutoModel` /
`AutoModelForCausalLM`: `config.json` (the source checkpoint's, where given, with what our model
changed rewritten; else the keys our config knows), `model.safetensors`
with HF names and layouts, the tokenizer files, and our task heads in the side files
`jaxdistill_heads.json` + `jaxdistill_heads.safetensors` (transformers ignores them; `load_hf`
reads them back, so import -> export -> import is bit-identical).

Pickle-based checkpoints (`*.bin`, `*.pt`) run arbitrary code when unpickled and are refused
unless the caller passes `allow_pickle=True` (CLI: `--allow-pickle`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import pickle
import re
import shutil
import uuid
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pydantic
from flax import nnx
from jax.sharding import SingleDeviceSharding
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxdistill import parallel
from jaxdistill.models.decoder import DecoderConfig, RopeScaling
from jaxdistill.models.encoder import EncoderConfig
from jaxdistill.models.heads import ActionHead, TokenScoreHead, build_head
from jaxdistill.models.model import ModelConfig, Params, count_params, functional

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "gemma3", "bert")
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text",
                "bert": "bert"}  # family -> config.json model_type
HEADS_JSON = "jaxdistill_heads.json"
HEADS_WEIGHTS = "jaxdistill_heads.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM", "bert": "BertModel",
}
# Checkpoint tensors that carry nothing our backbones use (canonical-name patterns, and how
# messages describe them). BERT's MLM/NSP heads are pre-training heads our task heads replace;
# its pooler is kept when the checkpoint has one (EncoderConfig.pooler), else ignored. A tied
# decoder's stored lm_head.weight is ignored as transformers does.
_IGNORED = {
    "decoder": ((r".*rotary_emb\.inv_freq", "rotary_emb.inv_freq buffers"),),
    "encoder": ((r"pooler\..*", "pooler.*"), (r"cls\..*", "cls.* pre-training heads"),
                (r"embeddings\.position_ids", "embeddings.position_ids")),
}
_POOLER = "pooler.dense.weight"
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "chat_template.jinja", "chat_template.json",
)


# ----------------------------------------------------------------------------- configs


def _read_json(path: Path, kind: type = dict):
    """A JSON file's content; a corrupt, truncated or mistyped file is a ValueError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); the file is corrupt or truncated"
                         ) from None
    if not isinstance(content, kind):
        raise ValueError(f"{path}: expected a JSON {'object' if kind is dict else 'array'}, "
                         f"found {type(content).__name__}")
    return content


def _read_config(source: str | os.PathLike | Mapping[str, Any]) -> tuple[dict, str]:
    """The raw config dict and a name for messages (the file path, or '<dict>')."""
    if isinstance(source, Mapping):
        return dict(source), "<config dict>"
    path = Path(source) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected an HF model directory")
    return _read_json(path), os.fspath(path)


def detect_family(hf_dir: str | os.PathLike | Mapping[str, Any]) -> str:
    """Our family (one of SUPPORTED_FAMILIES) from config.json's `model_type` (MiniLM is `bert`,
    Gemma 3 text is `gemma3_text`)."""
    raw, where = _read_config(hf_dir)
    model_type = raw.get("model_type")
    families = {t: f for f, t in _MODEL_TYPES.items()}
    if model_type not in families:
        hint = (" (the multimodal Gemma 3; its text-only checkpoints are 'gemma3_text')"
                if model_type == "gemma3" else "")
        raise ValueError(
            f"{where}: model_type {model_type!r} is not supported{hint}; supported: "
            f"{', '.join(families)}"
        )
    return families[model_type]


def _rope(hf: dict, where: str) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling from transformers 5 `rope_parameters` (or the older
    `rope_theta` / `rope_scaling`); a type we do not implement is refused by name."""
    params = hf.get("rope_parameters") or {}
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(f"{where}: per-layer-type rope_parameters {params} are not supported")
    return _rope_of(params, hf, where)


def _rope_of(params: Mapping, hf: dict, where: str) -> tuple[float, RopeScaling | None]:
    scaling = {**(hf.get("rope_scaling") or {}), **params}
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    theta = float(scaling.get("rope_theta") or hf.get("rope_theta") or 10_000.0)
    if (scaling.get("partial_rotary_factor") or 1.0) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor {scaling['partial_rotary_factor']} is "
                         "not supported (RoPE over the whole head only)")
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, RopeScaling(type="linear", factor=scaling["factor"])
    if rope_type == "llama3":
        original = scaling.get("original_max_position_embeddings") \
            or hf.get("max_position_embeddings")
        try:
            return theta, RopeScaling(
                type="llama3", factor=scaling.get("factor"),
                low_freq_factor=scaling.get("low_freq_factor"),
                high_freq_factor=scaling.get("high_freq_factor"), original_max_positions=original)
        except pydantic.ValidationError as err:
            raise ValueError(f"{where}: invalid llama3 RoPE scaling {dict(scaling)}: {err}"
                             ) from None
    raise ValueError(
        f"{where}: RoPE scaling type {rope_type!r} is not supported (supported: 'default', "
        "'linear', 'llama3'); loading it as plain RoPE would silently change the model"
    )


def _hf_rope(theta: float, scaling: RopeScaling | None) -> dict[str, Any]:
    """One transformers `rope_parameters` entry."""
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    if scaling.type == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": scaling.factor}
    return {"rope_type": "llama3", "rope_theta": theta, "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_positions}


def config_from_hf(
    source: str | os.PathLike | Mapping[str, Any], **overrides
) -> DecoderConfig | EncoderConfig:
    """Our backbone config for an HF config.json (a directory or its dict).

    The dict goes through transformers' own config class first, so defaults and legacy keys
    resolve exactly as transformers resolves them when it builds the model. `overrides` set
    our numerics and options (dtype, param_dtype, remat, attention_impl, pooling for encoders).
    A BERT directory's `pooler` says whether its safetensors hold the pooler's weights; its
    `pooling` comes from a sentence-transformers `modules.json` + pooling config when present.
    """
    raw, where = _read_config(source)
    family = detect_family(raw)
    explicit = family == "bert" and "pooling" in overrides  # an explicit pooling wins
    if not isinstance(source, Mapping) and not explicit:
        pooling = _sentence_transformers_pooling(Path(source), family)
        if family == "bert" and pooling is not None:
            overrides["pooling"] = pooling
    if family == "bert" and "pooler" not in overrides and not isinstance(source, Mapping):
        has_weights = any(p.name != HEADS_WEIGHTS for p in Path(source).glob("*.safetensors"))
        overrides["pooler"] = has_weights and _POOLER in _Checkpoint(
            Path(source), family, allow_pickle=False).names
    from transformers import AutoConfig

    hf = AutoConfig.for_model(**raw).to_dict()
    try:
        return _backbone_config(hf, family, where, overrides)
    except pydantic.ValidationError as err:
        raise ValueError(f"{where}: does not give a valid {family} backbone: {err}") from None


# sentence-transformers Pooling modes -> ours (encoders: EncoderConfig.pooling; decoders always
# pool the last real token).
_ST_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
               "pooling_mode_lasttoken": "last_token"}


def _sentence_transformers_pooling(hf_dir: Path, family: str) -> str | None:
    """The pooling a sentence-transformers directory declares (None: not such a directory)."""
    modules_file = hf_dir / "modules.json"
    if not modules_file.is_file():
        return None
    modules = _read_json(modules_file, list)
    pooling_dirs = [m.get("path", "") for m in modules if isinstance(m, Mapping)
                    and str(m.get("type", "")).endswith("models.Pooling")]
    if not pooling_dirs:
        return None
    path = hf_dir / pooling_dirs[0] / "config.json"
    if not path.is_file():
        raise ValueError(f"{modules_file}: lists a Pooling module at {pooling_dirs[0]!r}, but "
                         f"{path} does not exist")
    pooling = _read_json(path)
    modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode") and v is True)
    if isinstance(pooling.get("pooling_mode"), str):  # a single-string spelling
        modes = [f"pooling_mode_{pooling['pooling_mode']}"]
    mode = _ST_POOLING.get(modes[0]) if len(modes) == 1 else None
    supported = ("last_token",) if family != "bert" else ("cls", "mean")
    if mode not in supported:
        raise ValueError(
            f"{path}: pooling modes {modes or 'none'} are not supported for a {family} "
            f"backbone; supported: exactly one of "
            f"{', '.join(k for k, v in _ST_POOLING.items() if v in supported)}"
        )
    if pooling.get("include_prompt", True) is not True:
        raise ValueError(f"{path}: include_prompt=false (pooling that skips the prompt tokens) "
                         "is not supported")
    return mode


def _backbone_config(hf: dict, family: str, where: str, overrides: dict):
    if family == "bert":
        if hf.get("hidden_act") != "gelu":
            raise ValueError(f"{where}: hidden_act {hf.get('hidden_act')!r} is not supported; "
                             "the encoder implements BERT's exact 'gelu'")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{where}: position_embedding_type "
                             f"{hf['position_embedding_type']!r} is not supported ('absolute' only)")
        return EncoderConfig(
            vocab_size=hf["vocab_size"], hidden=hf["hidden_size"], layers=hf["num_hidden_layers"],
            heads=hf["num_attention_heads"], mlp=hf["intermediate_size"],
            max_positions=hf["max_position_embeddings"], type_vocab_size=hf["type_vocab_size"],
            norm_eps=hf["layer_norm_eps"], **overrides,
        )
    if family == "gemma3":
        return _gemma3_config(hf, where, overrides)
    if hf.get("hidden_act") != "silu":
        raise ValueError(f"{where}: hidden_act {hf.get('hidden_act')!r} is not supported ('silu')")
    if hf.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias=true is not supported (no MLP biases in the decoder)")
    if hf.get("use_sliding_window") or any(
        t != "full_attention" for t in hf.get("layer_types") or ()
    ):
        raise ValueError(f"{where}: sliding-window attention is not supported (full attention only)")
    if family == "qwen2":
        attention_bias = True  # Qwen2 always has q/k/v biases and no o_proj bias.
    elif hf.get("attention_bias"):
        # Llama/Qwen3 put the bias on o_proj too, which our decoder does not have.
        raise ValueError(f"{where}: attention_bias=true is not supported for {family} "
                         "(it adds an o_proj bias the decoder does not implement)")
    else:
        attention_bias = False
    heads = hf["num_attention_heads"]
    rope_theta, rope_scaling = _rope(hf, where)
    return DecoderConfig(
        family=family, vocab_size=hf["vocab_size"], hidden=hf["hidden_size"],
        layers=hf["num_hidden_layers"], heads=heads,
        kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, mlp=hf["intermediate_size"],
        rope_theta=rope_theta, rope_scaling=rope_scaling, norm_eps=hf["rms_norm_eps"],
        qk_norm=family == "qwen3", attention_bias=attention_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings")), **overrides,
    )


def _gemma3_config(hf: dict, where: str, overrides: dict) -> DecoderConfig:
    if hf.get("hidden_activation") not in ("gelu_pytorch_tanh", "gelu_new"):
        raise ValueError(f"{where}: hidden_activation {hf.get('hidden_activation')!r} is not "
                         "supported ('gelu_pytorch_tanh')")
    if hf.get("attention_bias"):
        raise ValueError(f"{where}: attention_bias=true is not supported for gemma3")
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"{where}: use_bidirectional_attention=true is not supported (causal "
                         "attention only)")
    if hf.get("attn_logit_softcapping") is not None:
        # transformers' Gemma 3 stores it but never applies it; so does our import.
        log.warning("%s: attn_logit_softcapping=%s is ignored, as transformers' Gemma 3 ignores "
                    "it", where, hf["attn_logit_softcapping"])
    layer_types = tuple(hf["layer_types"])
    rope = hf.get("rope_parameters") or {}
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if unknown or set(rope) != set(layer_types):
        raise ValueError(f"{where}: layer_types {sorted(set(layer_types))} with rope_parameters "
                         f"for {sorted(rope)}; expected full_attention / sliding_attention")
    rope_theta, rope_scaling = _rope_of(rope.get("full_attention", {}), {}, where)
    rope_local_theta = None
    if "sliding_attention" in rope:
        rope_local_theta, local_scaling = _rope_of(rope["sliding_attention"], {}, where)
        if local_scaling is not None:
            raise ValueError(f"{where}: RoPE scaling on the sliding-window layers "
                             f"({rope['sliding_attention']}) is not supported")
    heads = hf["num_attention_heads"]
    return DecoderConfig(
        family="gemma3", vocab_size=hf["vocab_size"], hidden=hf["hidden_size"],
        layers=hf["num_hidden_layers"], heads=heads, kv_heads=hf["num_key_value_heads"],
        head_dim=hf["head_dim"], mlp=hf["intermediate_size"], rope_theta=rope_theta,
        rope_scaling=rope_scaling, norm_eps=hf["rms_norm_eps"], qk_norm=True,
        attention_bias=False, tie_embeddings=bool(hf.get("tie_word_embeddings")),
        layer_types=layer_types,
        sliding_window=hf["sliding_window"] if "sliding_attention" in layer_types else None,
        rope_local_theta=rope_local_theta, query_pre_attn_scalar=hf["query_pre_attn_scalar"],
        final_softcap=hf.get("final_logit_softcapping"), **overrides,
    )


def _hf_known(backbone: DecoderConfig | EncoderConfig) -> dict[str, Any]:
    """The config.json keys our backbone determines (transformers' names and layouts)."""
    if isinstance(backbone, EncoderConfig):
        return {
            "model_type": "bert", "vocab_size": backbone.vocab_size,
            "hidden_size": backbone.hidden, "num_hidden_layers": backbone.layers,
            "num_attention_heads": backbone.heads, "intermediate_size": backbone.mlp,
            "hidden_act": "gelu", "max_position_embeddings": backbone.max_positions,
            "type_vocab_size": backbone.type_vocab_size, "layer_norm_eps": backbone.norm_eps,
        }
    if backbone.gemma:
        rope = {"full_attention": _hf_rope(backbone.rope_theta, backbone.rope_scaling)}
        if "sliding_attention" in backbone.layer_types:
            rope["sliding_attention"] = _hf_rope(backbone.rope_local_theta, None)
        known = {
            "model_type": "gemma3_text", "vocab_size": backbone.vocab_size,
            "hidden_size": backbone.hidden, "num_hidden_layers": backbone.layers,
            "num_attention_heads": backbone.heads, "num_key_value_heads": backbone.kv_heads,
            "head_dim": backbone.head_dim, "intermediate_size": backbone.mlp,
            "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": backbone.norm_eps,
            "rope_parameters": rope, "layer_types": list(backbone.layer_types),
            "query_pre_attn_scalar": backbone.query_pre_attn_scalar,
            "final_logit_softcapping": backbone.final_softcap,
            "tie_word_embeddings": backbone.tie_embeddings, "attention_bias": False,
        }
        if backbone.sliding_window is not None:
            known["sliding_window"] = backbone.sliding_window
        return known
    known = {
        "model_type": backbone.family, "vocab_size": backbone.vocab_size,
        "hidden_size": backbone.hidden, "num_hidden_layers": backbone.layers,
        "num_attention_heads": backbone.heads, "num_key_value_heads": backbone.kv_heads,
        "head_dim": backbone.head_dim, "intermediate_size": backbone.mlp, "hidden_act": "silu",
        "rms_norm_eps": backbone.norm_eps,
        "rope_parameters": _hf_rope(backbone.rope_theta, backbone.rope_scaling),
        "tie_word_embeddings": backbone.tie_embeddings,
    }
    if backbone.family != "qwen2":
        known["attention_bias"] = False
    return known


def _hf_config_dict(backbone: DecoderConfig | EncoderConfig, dtype: str,
                    source_dir: str | os.PathLike | None = None) -> dict:
    """The config.json of an export.

    From `source_dir` (the HF directory the model was imported from): the source's own
    config.json with only the keys our model changed rewritten (compared as transformers
    resolves them), so max_position_embeddings, special-token ids, architectures, ... survive.
    Without it: just the keys our config knows; transformers fills its defaults on load.
    """
    known = _hf_known(backbone)
    if source_dir is None:
        return {**known, "architectures": [_ARCHITECTURES[backbone.family]], "dtype": dtype}
    raw, where = _read_config(source_dir)
    if raw.get("model_type") != known["model_type"]:
        raise ValueError(f"{where}: source model_type {raw.get('model_type')!r} is not the "
                         f"exported model's {known['model_type']!r}; pass the directory the "
                         "model was imported from, or no source_dir")
    from transformers import AutoConfig

    resolved = AutoConfig.for_model(**raw).to_dict()
    out = dict(raw)
    for key, value in known.items():
        if resolved.get(key) != value:
            log.info("%s: export changes %s from %r to %r", where, key, resolved.get(key), value)
            out[key] = value
            if key == "rope_parameters":  # the legacy spellings would contradict it
                out.pop("rope_theta", None)
                out.pop("rope_scaling", None)
    out["dtype"] = dtype
    if "torch_dtype" in out:  # transformers 4's spelling
        out["torch_dtype"] = dtype
    return out


# ----------------------------------------------------------------------------- name map


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One of our weights and its HF tensor(s): `hf` has `{i}` for per-layer tensors."""

    path: tuple[str, ...]  # into params["backbone"]
    hf: str  # canonical HF name (no `model.` / `bert.` prefix)
    linear: bool = False  # HF [out, in] <-> our [in, out]

    @property
    def stacked(self) -> bool:
        return self.path[0] == "layers"


def _weight_map(backbone: DecoderConfig | EncoderConfig) -> list[_Tensor]:
    if isinstance(backbone, EncoderConfig):
        top = [
            _Tensor(("embed", "embedding"), "embeddings.word_embeddings.weight"),
            _Tensor(("position_embedding",), "embeddings.position_embeddings.weight"),
            _Tensor(("token_type_embedding",), "embeddings.token_type_embeddings.weight"),
            _Tensor(("embed_norm", "scale"), "embeddings.LayerNorm.weight"),
            _Tensor(("embed_norm", "bias"), "embeddings.LayerNorm.bias"),
        ]
        if backbone.pooler:
            top += [_Tensor(("pooler", "kernel"), _POOLER, linear=True),
                    _Tensor(("pooler", "bias"), "pooler.dense.bias")]
        linears = {"q_proj": "attention.self.query", "k_proj": "attention.self.key",
                   "v_proj": "attention.self.value", "o_proj": "attention.output.dense",
                   "up_proj": "intermediate.dense", "down_proj": "output.dense"}
        norms = {"attention_norm": "attention.output.LayerNorm", "mlp_norm": "output.LayerNorm"}
        layer = "encoder.layer.{i}."
        per_layer = [t for ours, hf in linears.items() for t in (
            _Tensor(("layers", "layer", ours, "kernel"), f"{layer}{hf}.weight", linear=True),
            _Tensor(("layers", "layer", ours, "bias"), f"{layer}{hf}.bias"))]
        per_layer += [t for ours, hf in norms.items() for t in (
            _Tensor(("layers", "layer", ours, "scale"), f"{layer}{hf}.weight"),
            _Tensor(("layers", "layer", ours, "bias"), f"{layer}{hf}.bias"))]
        return top + per_layer
    top = [_Tensor(("embed", "embedding"), "embed_tokens.weight"),
           _Tensor(("final_norm", "scale"), "norm.weight")]
    if not backbone.tie_embeddings:
        top.append(_Tensor(("lm_head", "kernel"), "lm_head.weight", linear=True))
    layer = "layers.{i}."
    linears = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
               "v_proj": "self_attn.v_proj", "o_proj": "self_attn.o_proj",
               "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
               "down_proj": "mlp.down_proj"}
    norms = {"input_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm"}
    if backbone.gemma:  # HF's post_attention_layernorm normalises the attention's output there
        norms = {"input_norm": "input_layernorm",
                 "attention_out_norm": "post_attention_layernorm",
                 "post_attention_norm": "pre_feedforward_layernorm",
                 "mlp_out_norm": "post_feedforward_layernorm"}
    if backbone.qk_norm:
        norms |= {"q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}
    per_layer = [_Tensor(("layers", "layer", ours, "kernel"), f"{layer}{hf}.weight", linear=True)
                 for ours, hf in linears.items()]
    if backbone.attention_bias:
        per_layer += [_Tensor(("layers", "layer", p, "bias"), f"{layer}self_attn.{p}.bias")
                      for p in ("q_proj", "k_proj", "v_proj")]
    per_layer += [_Tensor(("layers", "layer", ours, "scale"), f"{layer}{hf}.weight")
                  for ours, hf in norms.items()]
    return top + per_layer


def _canonical(name: str, family: str) -> str:
    """Checkpoint name -> map name: drops `model.` / `bert.`, renames legacy LayerNorm gamma/beta."""
    if family == "bert":
        name = name.removeprefix("bert.")
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
        return re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
    return name.removeprefix("model.")


def _export_name(name: str, family: str) -> str:
    if family == "bert" or name == "lm_head.weight":
        return name
    return "model." + name


# ----------------------------------------------------------------------------- checkpoint files


def _open_safetensors(path: Path):
    try:
        return safe_open(path, framework="numpy")
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err}); the file is corrupt "
                         "or truncated (an interrupted download or copy?)") from None


def _weight_map_of(index: Path) -> dict[str, str]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: expected a 'weight_map' object (tensor name -> file), found "
                         f"{weight_map!r}")
    return weight_map


def _pickle_files(hf_dir: Path) -> list[str]:
    """Pickled weight files: those a `pytorch_model.bin.index.json` lists, else all but
    `training_args.bin` (a pickle of the trainer's arguments, not weights)."""
    index = hf_dir / "pytorch_model.bin.index.json"
    if index.is_file():
        return sorted(set(_weight_map_of(index).values()))
    return sorted(p.name for p in hf_dir.iterdir()
                  if p.suffix in _PICKLE_SUFFIXES and p.name != "training_args.bin")


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class _Checkpoint:
    """The tensors of an HF directory by canonical name; reads slices without loading files."""

    def __init__(self, hf_dir: Path, family: str, allow_pickle: bool):
        self.dir = hf_dir
        self._where: dict[str, tuple[str, str]] = {}  # canonical -> (file, stored name)
        self._handles: dict[str, Any] = {}
        self._arrays: dict[str, np.ndarray] | None = None
        files = self._safetensors_files()
        if files:
            for file, names in files.items():
                for name in names:
                    self._add(_canonical(name, family), file, name)
            return
        pickles = _pickle_files(hf_dir)
        if not pickles:
            raise FileNotFoundError(
                f"{hf_dir}: no weights found; expected model.safetensors, sharded "
                "model-*.safetensors with model.safetensors.index.json, or (with --allow-pickle) "
                "pytorch_model.bin"
            )
        if not allow_pickle:
            raise ValueError(
                f"{hf_dir}: only pickle-based weights found ({', '.join(pickles)}). Unpickling "
                "can execute arbitrary code, so they are refused by default. Convert the "
                "checkpoint to safetensors, or pass --allow-pickle (allow_pickle=True) if you "
                "trust its source; it is then read with torch.load(weights_only=True)."
            )
        import torch

        self._arrays = {}
        for file in pickles:
            try:
                state = torch.load(hf_dir / file, map_location="cpu", weights_only=True)
            except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
                raise ValueError(f"{hf_dir / file}: not a readable PyTorch weights file "
                                 f"({err}); the file is corrupt or truncated") from None
            for name, tensor in state.items():
                self._add(_canonical(name, family), file, name)
                self._arrays[name] = _torch_to_numpy(tensor)

    def _safetensors_files(self) -> dict[str, list[str]]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _weight_map_of(index)
            files: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                files.setdefault(file, []).append(name)
            for file in files:
                if not (self.dir / file).is_file():
                    raise FileNotFoundError(f"{index}: lists {file}, which is not in {self.dir}")
            return files
        return {
            p.name: list(self._handle(p.name).keys())
            for p in sorted(self.dir.glob("*.safetensors")) if p.name != HEADS_WEIGHTS
        }

    def _add(self, canonical: str, file: str, name: str):
        if canonical in self._where:
            raise ValueError(f"{self.dir}: tensor {canonical!r} appears twice "
                             f"({self._where[canonical]} and {(file, name)})")
        self._where[canonical] = (file, name)

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = _open_safetensors(self.dir / file)
        return self._handles[file]

    def stored_name(self, name: str) -> str:
        return self._where[name][1]

    @property
    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        file, stored = self._where[name]
        if self._arrays is not None:
            return self._arrays[stored].shape
        return tuple(self._handle(file).get_slice(stored).get_shape())

    def dtype(self, name: str) -> str:
        file, stored = self._where[name]
        if self._arrays is not None:
            return str(self._arrays[stored].dtype)
        return self._handle(file).get_slice(stored).get_dtype()

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        file, stored = self._where[name]
        if self._arrays is not None:
            return self._arrays[stored][index]
        return self._handle(file).get_slice(stored)[index]


def _check_tensors(ckpt: _Checkpoint, tensors: list[_Tensor], shapes: Params, backbone,
                   family: str):
    """Missing, unexpected or mis-shaped tensors: one error listing them all."""
    expected: dict[str, tuple[int, ...]] = {}
    for t in tensors:
        shape = _leaf(shapes, t.path).shape
        per_layer = shape[1:] if t.stacked else shape
        hf_shape = tuple(reversed(per_layer)) if t.linear else tuple(per_layer)
        for i in range(backbone.layers if t.stacked else 1):
            expected[t.hf.format(i=i)] = hf_shape
    ignorable = list(_IGNORED["encoder" if family == "bert" else "decoder"])
    if isinstance(backbone, DecoderConfig) and backbone.tie_embeddings:
        ignorable.append((r"lm_head\.weight", "lm_head.weight (tie_word_embeddings)"))
    ignored = {n for n in ckpt.names - expected.keys()
               if any(re.fullmatch(pattern, n) for pattern, _ in ignorable)}
    missing = sorted(expected.keys() - ckpt.names)
    unexpected = sorted(ckpt.stored_name(n) for n in ckpt.names - expected.keys() - ignored)
    problems = []
    if missing:
        prefix = {"bert": "'bert.' prefix optional"}.get(family, "'model.' prefix optional")
        problems.append(f"missing tensors ({prefix}) {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_some(unexpected)}")
    for name in sorted(expected.keys() & ckpt.names):
        if ckpt.shape(name) != expected[name]:
            problems.append(f"tensor {ckpt.stored_name(name)!r} has shape {ckpt.shape(name)}, "
                            f"config.json implies {expected[name]}")
    if problems:
        raise ValueError(
            f"{ckpt.dir}: checkpoint does not match its {family} config: " + "; ".join(problems)
            + f" (ignored as irrelevant: {', '.join(d for _, d in ignorable)})"
        )
    if ignored:
        log.info("%s: ignored %d tensors: %s", ckpt.dir, len(ignored), _some(sorted(ignored)))


def _some(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set_leaf(tree: dict, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------- import


def _reader(ckpt: _Checkpoint, t: _Tensor, num_layers: int, dtype, uses: dict) -> Callable:
    """The callback of `make_array_from_callback`: reads just the slice one device holds.

    `uses` counts the local devices holding each distinct slice: a replicated slice is read
    once and dropped after its last device, so at most one copy of it is ever on the host.
    """
    cache: dict[tuple, np.ndarray] = {}

    def read_one(name: str, index: tuple[slice, ...]) -> np.ndarray:
        if t.linear:
            return ckpt.read(name, tuple(reversed(index))).T
        return ckpt.read(name, index)

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        key = _index_key(index)
        if key not in cache:
            if t.stacked:
                rows = [read_one(t.hf.format(i=i), index[1:])
                        for i in range(num_layers)[index[0]]]
                out = np.stack(rows)
            else:
                out = read_one(t.hf, index)
            cache[key] = np.ascontiguousarray(out.astype(dtype))
        uses[key] -= 1
        return cache[key] if uses[key] > 0 else cache.pop(key)

    return callback


def _index_key(index: tuple[slice, ...]) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


def _slice_uses(shape, sharding) -> dict[tuple, int]:
    uses: dict[tuple, int] = {}
    for index in sharding.addressable_devices_indices_map(shape).values():
        key = _index_key(index)
        uses[key] = uses.get(key, 0) + 1
    return uses


def _init_head(cfg: ModelConfig, name: str, seed: int, sharding) -> Params:
    """A head's fresh weights; the key depends on the seed and the head's name only."""
    width = cfg.backbone.hidden
    pdt = jnp.dtype(cfg.backbone.param_dtype)

    def make(key):
        head = build_head(cfg.heads[name], width, param_dtype=pdt, rngs=nnx.Rngs(params=key))
        return nnx.split(head)[1].to_pure_dict()

    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))
    return jax.jit(make, out_shardings=sharding)(key)


def _read_side_heads(hf_dir: Path) -> tuple[dict, dict[str, np.ndarray]] | None:
    if not (hf_dir / HEADS_JSON).is_file():
        return None
    meta = _read_json(hf_dir / HEADS_JSON)
    weights = {}
    if (hf_dir / HEADS_WEIGHTS).is_file():
        with _open_safetensors(hf_dir / HEADS_WEIGHTS) as f:
            weights = {k: f.get_tensor(k) for k in f.keys()}
    return meta, weights


def _describe_heads(heads: Mapping[str, Any]) -> str:
    if not heads:
        return "no heads"
    return "heads " + ", ".join(f"{n!r} ({e['config']})" for n, e in sorted(heads.items()))


def load_hf(
    hf_dir: str | os.PathLike,
    *,
    heads: Mapping[str, Any] | None = None,
    dtype: str = "bfloat16",
    param_dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
    rules: parallel.Rules | None = None,
    allow_pickle: bool = False,
    init_missing_heads: bool = False,
    seed: int = 0,
    **overrides,
) -> tuple[ModelConfig, Params]:
    """An HF checkpoint directory as our (ModelConfig, params).

    Backbone weights come from the checkpoint, cast to `param_dtype`, each created directly in
    its sharding on `mesh` (rules: `parallel.DEFAULT_RULES` unless given; no mesh: the default
    device). Heads: with `heads=None`, those recorded in the directory's `jaxdistill_heads.json`
    (a jaxdistill export), else none. Named heads load their weights from the side file, which
    must hold them with the same config; one it lacks is an error unless `init_missing_heads`,
    which initialises it from `seed` and the head's name (so adding a head does not change
    another's initialisation). Heads without weights (token_score, lm) need nothing stored.
    `overrides` go to the backbone config (remat, attention_impl, pooling).
    """
    hf_dir = Path(hf_dir)
    family = detect_family(hf_dir)
    ckpt = _Checkpoint(hf_dir, family, allow_pickle)
    if family == "bert":
        overrides.setdefault("pooler", _POOLER in ckpt.names)
    side = _read_side_heads(hf_dir)
    side_heads = side[0]["heads"] if side else {}
    if side and "pooling" in side[0]["backbone"] and family == "bert":
        overrides.setdefault("pooling", side[0]["backbone"]["pooling"])
    backbone = config_from_hf(hf_dir, dtype=dtype, param_dtype=param_dtype, **overrides)
    if heads is None:
        heads = {name: entry["config"] for name, entry in side_heads.items()}
    cfg = ModelConfig(backbone=backbone, heads=dict(heads))
    f = functional(cfg)
    rules = parallel.DEFAULT_RULES if rules is None else rules
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, f.shapes)
    else:
        shardings = f.shardings(mesh, rules)

    tensors = _weight_map(backbone)
    _check_tensors(ckpt, tensors, f.shapes["backbone"], backbone, family)
    params: Params = {}
    pdt = jnp.dtype(param_dtype)
    for t in tensors:
        path = ("backbone",) + t.path
        shape, sharding = _leaf(f.shapes, path).shape, _leaf(shardings, path)
        reader = _reader(ckpt, t, backbone.layers, pdt, _slice_uses(shape, sharding))
        array = jax.make_array_from_callback(shape, sharding, reader)
        _set_leaf(params, path, array)

    for name, head_cfg in cfg.heads.items():
        if name not in f.shapes.get("heads", {}):
            continue  # token_score / lm heads have no weights
        stored = side_heads.get(name)
        wanted = head_cfg.model_dump(mode="json")
        if stored is not None and stored["config"] != wanted:
            raise ValueError(
                f"{hf_dir / HEADS_JSON}: head {name!r} is stored as {stored['config']}, asked "
                f"for {wanted}; rename the new head or drop it"
            )
        if stored is None:
            if not init_missing_heads:
                holds = (f"{HEADS_JSON} holds {_describe_heads(side_heads)}" if side
                         else f"it has no {HEADS_JSON} (a plain transformers checkpoint)")
                raise ValueError(
                    f"{hf_dir}: head {name!r} ({wanted}) has no weights there: {holds}. Pass "
                    "init_missing_heads=True to initialise it from the seed, or ask for a "
                    "head it holds"
                )
            params.setdefault("heads", {})[name] = _init_head(cfg, name, seed,
                                                               shardings["heads"][name])
            log.info("%s: head %r is not in the checkpoint; initialised from seed %d",
                     hf_dir, name, seed)
            continue
        for path, leaf in jax.tree_util.tree_leaves_with_path(f.shapes["heads"][name]):
            keys = tuple(k.key for k in path)
            value = side[1]["/".join((name,) + keys)]
            if value.shape != leaf.shape:
                raise ValueError(f"{hf_dir / HEADS_WEIGHTS}: {name}/{'/'.join(keys)} has shape "
                                 f"{value.shape}, expected {leaf.shape}")
            _set_leaf(params, ("heads", name) + keys, jax.device_put(
                value.astype(pdt), _leaf(shardings, ("heads", name) + keys)))

    if jax.tree.structure(params) != jax.tree.structure(f.shapes):
        raise AssertionError(f"{hf_dir}: built params do not match the model's structure")
    return cfg, params


# ----------------------------------------------------------------------------- export


def _host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _heads_metadata(cfg: ModelConfig, tokenizer) -> dict:
    backbone = cfg.backbone
    pooled = ("last_token" if backbone.type == "decoder" else backbone.pooling)
    entries = {}
    for name, head in cfg.heads.items():
        entry: dict[str, Any] = {"config": head.model_dump(mode="json")}
        if isinstance(head, TokenScoreHead):
            entry["reads"] = ("output embedding rows token_ids at the last real position; the "
                              "last id is the positive class: p = softmax(logits)[-1]")
            if tokenizer is not None:
                entry["tokens"] = tokenizer.convert_ids_to_tokens(list(head.token_ids))
        elif head.type != "lm":
            width = backbone.hidden + (head.features if isinstance(head, ActionHead) else 0)
            entry["input_width"] = width
            entry["reads"] = ("pooled hidden state (fp32)" + (
                " concatenated with member_features" if getattr(head, "features", 0) else ""))
        entries[name] = entry
    return {
        "format": "jaxdistill-heads",
        "version": 1,
        "backbone": {"type": backbone.type, "family": backbone.family, "hidden": backbone.hidden,
                     "pooling": pooled},
        "pooled": {"last_token": "final-norm hidden state at the last real (attention_mask=1) "
                                 "position", "cls": "last hidden state at the first real position",
                   "mean": "mean of last hidden states over real positions"}[pooled],
        "weights": (f"{HEADS_WEIGHTS}: '<head>/<layer>/kernel' [in, out] and "
                    "'<head>/<layer>/bias' [out]; a dense layer is y = x @ kernel + bias. "
                    "Layers: 'out' alone, or 'inner' -> gelu (tanh approximation) -> 'out'."),
        "heads": entries,
    }


def export_hf(
    cfg: ModelConfig,
    params: Params,
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype: str | None = None,
    source_dir: str | os.PathLike | None = None,
) -> Path:
    """Writes an HF directory transformers loads, plus our heads in side files; returns it.

    Weights keep their dtype unless `dtype` ("float32" / "bfloat16") is given. `source_dir`:
    the HF directory the model came from; its config.json is kept but for what our model
    changed (see `_hf_config_dict`) and its generation_config.json is copied. The directory is
    written under a temporary name and renamed into place (an existing one is replaced), so a
    crash never leaves a half-written export. Multi-host: every process must call it (weights
    are gathered); process 0 writes.
    """
    out_dir = Path(out_dir)
    backbone = cfg.backbone
    family = backbone.family
    cast = (lambda x: x) if dtype is None else (lambda x: x.astype(jnp.dtype(dtype)))
    tensors: dict[str, np.ndarray] = {}
    for t in _weight_map(backbone):
        array = cast(_host(_leaf(params["backbone"], t.path)))
        for i in range(backbone.layers if t.stacked else 1):
            one = array[i] if t.stacked else array
            tensors[_export_name(t.hf.format(i=i), family)] = np.ascontiguousarray(
                one.T if t.linear else one)
    head_tensors = {
        "/".join((name,) + tuple(k.key for k in path)): np.ascontiguousarray(cast(_host(leaf)))
        for name, head in params.get("heads", {}).items()
        for path, leaf in jax.tree_util.tree_leaves_with_path(head)
    }
    if jax.process_index() != 0:
        return out_dir
    stored_dtype = str(next(iter(tensors.values())).dtype)

    tokenizer = None
    if tokenizer_dir is not None:
        tokenizer_files = [Path(tokenizer_dir) / n for n in _TOKENIZER_FILES
                           if (Path(tokenizer_dir) / n).is_file()]
        if not tokenizer_files:
            raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer files (expected one of "
                                    f"{', '.join(_TOKENIZER_FILES)})")
        tokenizer = load_hf_tokenizer(tokenizer_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with open(tmp / "config.json", "w") as f:
            json.dump(_hf_config_dict(backbone, stored_dtype, source_dir), f, indent=2,
                      sort_keys=True)
        if source_dir is not None and (Path(source_dir) / "generation_config.json").is_file():
            shutil.copy2(Path(source_dir) / "generation_config.json", tmp)
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            for path in tokenizer_files:
                shutil.copy2(path, tmp / path.name)
        if cfg.heads:
            with open(tmp / HEADS_JSON, "w") as f:
                json.dump(_heads_metadata(cfg, tokenizer), f, indent=2)
            save_file(head_tensors, tmp / HEADS_WEIGHTS)
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ----------------------------------------------------------------------------- inspect


def inspect_hf(hf_dir: str | os.PathLike) -> dict[str, Any]:
    """Family, dimensions and parameter counts of an HF directory (reads headers only)."""
    hf_dir = Path(hf_dir)
    family = detect_family(hf_dir)
    backbone = config_from_hf(hf_dir)
    shapes = functional(ModelConfig(backbone=backbone)).shapes
    dims = backbone.model_dump(include={"vocab_size", "hidden", "layers", "heads", "kv_heads",
                                        "head_dim", "mlp", "rope_theta", "rope_scaling",
                                        "sliding_window", "tie_embeddings",
                                        "max_positions"})
    if isinstance(backbone, EncoderConfig):
        dims["head_dim"] = backbone.head_dim
    files = sorted(os.path.basename(p) for p in glob.glob(os.fspath(hf_dir / "*"))
                   if p.endswith((".safetensors",) + _PICKLE_SUFFIXES))
    side = _read_side_heads(hf_dir)
    return {
        "family": family,
        "type": backbone.type,
        **dims,
        "parameters": count_params(shapes),
        "parameters_non_embedding": count_params(shapes, exclude_embeddings=True),
        "weight_files": files,
        "jaxdistill_heads": sorted(side[0]["heads"]) if side else [],
    }


# ----------------------------------------------------------------------------- tokenizers


def load_hf_tokenizer(hf_dir: str | os.PathLike):
    """The tokenizer of a local HF directory (AutoTokenizer, local files only; see data.tokenizer).

    A corrupt file is a ValueError naming it: JSON files are checked first, and a failure of
    the tokenizer library names the directory's tokenizer files and its message.
    """
    from jaxdistill.data.tokenizer import load_tokenizer

    hf_dir = Path(hf_dir)
    present = [n for n in _TOKENIZER_FILES if (hf_dir / n).is_file()]
    for name in present:
        if name.endswith(".json"):
            _read_json(hf_dir / name)
    try:
        return load_tokenizer(hf_dir)
    except Exception as err:  # the tokenizers library raises bare Exceptions
        if isinstance(err, FileNotFoundError) and not present:
            raise
        raise ValueError(f"{hf_dir}: could not read the tokenizer from {', '.join(present)} "
                         f"({type(err).__name__}: {err})") from None


def apply_chat_template(tokenizer, messages: list[dict[str, str]], **kwargs) -> str:
    """The tokenizer's own chat template rendered to text; an error if it has none."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template "
                         "(chat_template in tokenizer_config.json or chat_template.jinja)")
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def _as_tokenizer(tokenizer_or_dir):
    if isinstance(tokenizer_or_dir, str | os.PathLike):
        return load_hf_tokenizer(tokenizer_or_dir)
    return tokenizer_or_dir


def _id_to_token(tokenizer) -> list[str | None]:
    tokens: list[str | None] = [None] * len(tokenizer)
    for token, i in tokenizer.get_vocab().items():
        if i < len(tokens):
            tokens[i] = token
    return tokens


def _first_difference(a: list, b: list) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def shared_vocab_size(tokenizer_a, tokenizer_b=None) -> int:
    """The real vocabulary size (len(tokenizer)) two identical tokenizers share.

    Embedding tables are often padded past the tokenizer (151936 rows for Qwen3's 151669
    tokens); token-level losses slice logits to this many columns, so padded rows never get
    probability mass. Raises if the tokenizers differ (see `check_same_tokenizer`).
    """
    a = _as_tokenizer(tokenizer_a)
    if tokenizer_b is None:
        return len(a)
    size = check_same_tokenizer("tokenizer_a", a, "tokenizer_b", _as_tokenizer(tokenizer_b),
                                token_level=True)
    assert size is not None
    return size


def check_same_tokenizer(
    teacher_name: str,
    teacher_tokenizer,
    student_name: str,
    student_tokenizer,
    *,
    token_level: bool,
    teacher_vocab_size: int | None = None,
    student_vocab_size: int | None = None,
) -> int | None:
    """Whether a teacher's outputs can be compared with a student's token by token.

    Token-level losses compare distributions over token ids, so teacher and student must share
    one tokenizer: different ones are refused, naming both models and the first difference.
    Sequence-level objectives (scores, labels, generated text) accept different tokenizers.
    Returns the shared real vocabulary size (the token-level loss's `vocab_size`: logits are
    sliced to it, dropping padded embedding rows), or None when the tokenizers differ and the
    objective is sequence-level. `*_vocab_size` (embedding rows) are checked to cover it.
    """
    teacher = _as_tokenizer(teacher_tokenizer)
    student = _as_tokenizer(student_tokenizer)
    teacher_tokens, student_tokens = _id_to_token(teacher), _id_to_token(student)
    differ = _first_difference(teacher_tokens, student_tokens)
    if differ is not None:
        if not token_level:
            return None
        at = lambda toks: repr(toks[differ]) if differ < len(toks) else "(none)"  # noqa: E731
        raise ValueError(
            f"token-level distillation needs one tokenizer, but teacher {teacher_name!r} "
            f"(vocabulary {len(teacher_tokens)}) and student {student_name!r} (vocabulary "
            f"{len(student_tokens)}) differ: first at id {differ}: {at(teacher_tokens)} vs "
            f"{at(student_tokens)}. Use a sequence-level objective, or a student with the "
            "teacher's tokenizer."
        )
    size = len(teacher_tokens)
    for name, rows in ((teacher_name, teacher_vocab_size), (student_name, student_vocab_size)):
        if rows is not None and rows < size:
            raise ValueError(f"model {name!r} has {rows} embedding rows, fewer than its "
                             f"tokenizer's {size} tokens")
    return size
