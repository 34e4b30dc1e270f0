"""BERT text embeddings and loading a local Hugging Face BERT checkpoint (weights, config, tokenizer) into E2E-VLP."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

# Model types whose checkpoints have BertModel's exact layout (absolute positions from 0, post-LN layers).
BERT_MODEL_TYPES = ("bert",)

# BertConfig's defaults, for fields a config.json leaves out.
_BERT_DEFAULTS = {
    "hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 12, "intermediate_size": 3072,
    "vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
}

# A BertLayer's parameter prefix -> ours (see e2evlp.nn.SelfAttentionBlock's docstring).
_LAYER_NAMES = {
    "attention.self.query": "attention.query",
    "attention.self.key": "attention.key",
    "attention.self.value": "attention.value",
    "attention.output.dense": "attention_output",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_norm",
}
_EMBEDDING_NAMES = ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm")
_DROPPED_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
# Checkpoint keys a text encoder has no use for: BERT's pooler and its pre-training heads.
IGNORED_BERT_KEYS = ("pooler.", "cls.")
# An E2EVLPConfig field -> the config.json field it must equal for BERT's weights to compute what BERT computes.
_CONFIG_FIELDS = {
    "num_encoder_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
    "hidden_size": "hidden_size", "intermediate_size": "intermediate_size", "vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps", "hidden_act": "hidden_act",
}
_LAYER_KEY = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")
_EMBEDDING_KEY = re.compile(r"embeddings\.(\w+)\.(weight|bias)")


class TextEmbeddings(nn.Module):
    """BERT's embeddings: word + absolute position + token type, then LayerNorm and dropout.

    Submodule names are Hugging Face ``BertEmbeddings``' (``word_embeddings``, ``position_embeddings``,
    ``token_type_embeddings``, ``LayerNorm``), so a BERT checkpoint's ``embeddings.*`` load unchanged.
    """

    def __init__(self, vocab_size: int, hidden_size: int, max_position_embeddings: int, type_vocab_size: int = 2,
                 layer_norm_eps: float = 1e-12, dropout: float = 0.1, pad_token_id: int | None = 0):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                            ("max_position_embeddings", max_position_embeddings),
                            ("type_vocab_size", type_vocab_size)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.vocab_size, self.max_position_embeddings = vocab_size, max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id)
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def _check_ids(self, name: str, ids: torch.Tensor, shape: tuple[int, int], upper: int, table: str) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex \
                or ids.dtype == torch.bool:
            what = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"{name} must be an integer tensor, got {what}")
        if ids.dim() != 2 or ids.shape[1] != shape[1] or ids.shape[0] not in (1, shape[0]):
            raise ValueError(f"{name} must be [B, L] = {list(shape)} (or [1, L]), got {tuple(ids.shape)}")
        # Range check where it costs no device synchronization (nn.Embedding asserts on CUDA anyway) and in
        # eager mode: a host read would split a compiled step, whose ids come from the collator's tokenizer.
        if ids.device.type == "cpu" and not torch.compiler.is_compiling() and ids.numel() \
                and (int(ids.min()) < 0 or int(ids.max()) >= upper):
            raise ValueError(f"{name} must lie in [0, {upper}) ({table}), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, L] integer; token_type_ids [B, L] (default zeros); position_ids [B|1, L]
        (default 0..L-1) -> [B, L, C]."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            got = f"shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a 2-D [B, L] integer tensor, got {got}")
        B, L = input_ids.shape
        if L > self.max_position_embeddings:
            raise ValueError(f"text has {L} tokens but the model's position table holds only "
                             f"{self.max_position_embeddings} (max_position_embeddings); truncate the text")
        self._check_ids("input_ids", input_ids, (B, L), self.vocab_size, "vocab_size")
        if position_ids is None:
            position_ids = torch.arange(L, device=input_ids.device)[None]  # [1, L]
        else:
            self._check_ids("position_ids", position_ids, (B, L), self.max_position_embeddings,
                            "max_position_embeddings")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)  # [B, L]
        else:
            self._check_ids("token_type_ids", token_type_ids, (B, L), self.type_vocab_size, "type_vocab_size")
        hidden = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
                  + self.position_embeddings(position_ids))  # [B, L, C]
        return self.dropout(self.LayerNorm(hidden))


def _map_key(key: str) -> str | None:
    """One BertModel state_dict key (no ``bert.`` prefix, LayerNorm weight/bias names) -> ours, or None."""
    match = _EMBEDDING_KEY.fullmatch(key)
    if match and match[1] in _EMBEDDING_NAMES:
        return key
    match = _LAYER_KEY.fullmatch(key)
    if match and match[2] in _LAYER_NAMES:
        return f"encoder.layers.{match[1]}.{_LAYER_NAMES[match[2]]}.{match[3]}"
    return None


def bert_to_e2evlp_state_dict(hf_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A Hugging Face BertModel / BertForPreTraining state_dict -> (our embeddings.* and encoder.layers.*
    tensors, the Hugging Face keys left unused such as ``pooler.*`` and ``cls.*``).

    A leading ``bert.`` is stripped, old-style ``LayerNorm.gamma|beta`` read as ``weight|bias``, and the
    ``embeddings.position_ids`` buffer dropped. Tensors are not copied.
    """
    mapped: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unused: list[str] = []
    for hf_key, tensor in hf_state.items():
        key = hf_key.removeprefix("bert.")
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
        key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
        if key in _DROPPED_BUFFERS:
            continue
        ours = _map_key(key)
        if ours is None:
            unused.append(hf_key)
            continue
        if ours in mapped:
            raise ValueError(f"hf_state keys {sources[ours]!r} and {hf_key!r} both map to {ours!r}")
        mapped[ours], sources[ours] = tensor, hf_key
    return mapped, unused


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as err:  # pragma: no cover - safetensors comes with transformers
        raise ImportError(f"reading {path} needs the safetensors package (pip install safetensors)") from err
    return load_file(str(path), device="cpu")


def load_bert_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict of a local checkpoint: a directory holding ``model.safetensors`` (or a sharded
    ``model.safetensors.index.json``, or ``pytorch_model.bin``), or one such file. Tensors land on the CPU."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
            if (path / name).is_file():
                return load_bert_checkpoint(path / name)
        raise FileNotFoundError(f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin in "
                                f"the checkpoint directory {path}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (expected a directory holding "
                                "model.safetensors or pytorch_model.bin, or one of those files)")
    if path.name.endswith(".index.json"):  # sharded: {"weight_map": {key: shard file}}
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            if not (path.parent / shard).is_file():
                raise FileNotFoundError(f"shard {shard} named by {path} is missing from {path.parent}")
            state.update(_load_safetensors(path.parent / shard))
        return state
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state_dict (dict of tensors)")
    return state


def bert_config_fields(path: str | Path) -> dict:
    """The fields an E2E-VLP config takes from a BERT checkpoint's config.json (``path``: its directory or
    the file): hidden_size, num_attention_heads, num_hidden_layers, intermediate_size, vocab_size,
    max_position_embeddings, type_vocab_size, layer_norm_eps, hidden_act (BertConfig's default if absent)."""
    path = Path(path)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json at {config_file}")
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type is None and architectures and all(a.startswith("Bert") for a in architectures):
        model_type = "bert"  # very old configs name only the architecture
    if model_type not in BERT_MODEL_TYPES:
        raise ValueError(f"{config_file} describes model_type={model_type!r}; expected one of "
                         f"{list(BERT_MODEL_TYPES)} (a BertModel layout)")
    position_type = config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(f"{config_file} has position_embedding_type={position_type!r}; only 'absolute' "
                         "position embeddings map onto E2E-VLP's text embeddings")
    return {name: config.get(name, default) for name, default in _BERT_DEFAULTS.items()}


def bert_config_mismatches(fields: dict, config) -> list[str]:
    """Where an E2EVLPConfig differs from a checkpoint's ``bert_config_fields``, one ``"config <field>=<value>
    but the checkpoint's <field>=<value>"`` per field; empty when the checkpoint fits."""
    mismatches = []
    for ours, theirs in _CONFIG_FIELDS.items():
        mine, value = getattr(config, ours), fields[theirs]
        same = math.isclose(mine, value, rel_tol=1e-6) if ours == "layer_norm_eps" else mine == value
        if not same:
            mismatches.append(f"config {ours}={mine!r} but the checkpoint's {theirs}={value!r}")
    return mismatches


def load_tokenizer(path: str | Path):
    """``transformers.BertTokenizerFast`` from a local directory holding vocab.txt and/or tokenizer.json
    (never downloads)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    if not any((path / name).is_file() for name in ("vocab.txt", "tokenizer.json")):
        raise FileNotFoundError(f"tokenizer directory {path} holds neither vocab.txt nor tokenizer.json")
    try:
        from transformers import BertTokenizerFast
    except ImportError as err:  # pragma: no cover
        raise ImportError("load_tokenizer needs the transformers package (pip install transformers)") from err
    return BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
