"""Pretrained all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) split for federated fine-tuning.

Plain torch, no transformers: the encoder is small, and owning it keeps the ONNX export
(legacy TorchScript exporter, parameter names preserved) under our control. Attention is
written out as matmul + softmax so every opset-17 runtime can run it.

The device trains only LoRA adapters (rank 8, alpha 16 by default) on the attention query
and value projections: zeroth-order variance grows with the number of trained parameters,
so the base weights stay frozen (ONNX initializers) and d stays ~50k instead of 22M.

Device input is one int64 tensor (B, 2, L): token ids and attention mask. The smashed data
is the hidden state with the mask appended as a 385th feature, (B, L, 385), so the server
receives the mask through the unchanged smashed-data protocol.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from heron_data.text import minilm_dir

HIDDEN = 384
HEADS = 12
HEAD_DIM = HIDDEN // HEADS
INTERMEDIATE = 1536
NUM_LAYERS = 6
VOCAB = 30522
MAX_POSITIONS = 512
TYPE_VOCAB = 2
LN_EPS = 1e-12
SMASHED_FEATURES = HIDDEN + 1  # hidden state + attention mask
CUTS = tuple(f"layer{i}" for i in range(1, NUM_LAYERS))  # layer1..layer5
DEFAULT_CUT = "layer3"
SERVER_TRAIN = ("lora", "full")
AUX_KIND = "minilm-layer+meanpool+fc"
# Options build_split("minilm", ..., **options) accepts, with their defaults.
DEFAULT_OPTIONS: dict[str, Any] = {
    "lora_rank": 8,
    "lora_alpha": 16.0,
    "server_train": "lora",  # "lora": server LoRA (q, v) + classifier; "full": every weight
    "model_dir": None,  # MiniLM files; None: $HERON_MINILM_DIR or the installed package
}
_CONFIG_EXPECTED = {"hidden_size": HIDDEN, "num_attention_heads": HEADS,
                    "intermediate_size": INTERMEDIATE, "num_hidden_layers": NUM_LAYERS,
                    "vocab_size": VOCAB, "max_position_embeddings": MAX_POSITIONS,
                    "type_vocab_size": TYPE_VOCAB, "hidden_act": "gelu"}
# Checkpoint tensors we deliberately do not use: the pooler (all-MiniLM mean-pools) and a
# position-id buffer (positions are arange(L)).
_UNUSED = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids")
# checkpoint name inside encoder.layer.N -> our name inside layers.N
_LAYER_NAMES = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
    "output.LayerNorm": "ffn_norm",
}
_EMBED_NAMES = {
    "embeddings.word_embeddings": "word",
    "embeddings.position_embeddings": "position",
    "embeddings.token_type_embeddings": "token_type",
    "embeddings.LayerNorm": "norm",
}


class MiniLMError(ValueError):
    """Bad MiniLM options or a checkpoint that does not match the architecture."""


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (alpha/r) B A x; r=0: none.

    B starts at zero, so a fresh adapter leaves the pretrained function unchanged.
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 0,
                 alpha: float = 16.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False)
        self.rank = int(rank)
        self.scale = float(alpha) / rank if rank else 0.0
        if rank:
            self.lora_A = nn.Parameter(torch.empty(rank, in_features))
            self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.rank:
            out = out + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale
        return out


def _additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 mask to (B, 1, 1, L) scores offset: 0 where attended, -max where padded."""
    return (1.0 - mask.to(torch.float32))[:, None, None, :] * torch.finfo(torch.float32).min


class EncoderLayer(nn.Module):
    """One post-LN BERT layer: self-attention and a GELU feed-forward, each + residual."""

    def __init__(self, rank: int = 0, alpha: float = 16.0) -> None:
        super().__init__()
        self.query = LoRALinear(HIDDEN, HIDDEN, rank, alpha)
        self.key = nn.Linear(HIDDEN, HIDDEN)
        self.value = LoRALinear(HIDDEN, HIDDEN, rank, alpha)
        self.attn_out = nn.Linear(HIDDEN, HIDDEN)
        self.attn_norm = nn.LayerNorm(HIDDEN, eps=LN_EPS)
        self.ffn_in = nn.Linear(HIDDEN, INTERMEDIATE)
        self.ffn_out = nn.Linear(INTERMEDIATE, HIDDEN)
        self.ffn_norm = nn.LayerNorm(HIDDEN, eps=LN_EPS)

    def forward(self, h: torch.Tensor, add_mask: torch.Tensor) -> torch.Tensor:
        b, n = h.shape[0], h.shape[1]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, HEADS, HEAD_DIM).transpose(1, 2)

        q, k, v = heads(self.query(h)), heads(self.key(h)), heads(self.value(h))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(HEAD_DIM) + add_mask
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2)
        h = self.attn_norm(h + self.attn_out(ctx.reshape(b, n, HIDDEN)))
        return self.ffn_norm(h + self.ffn_out(F.gelu(self.ffn_in(h))))


class Embeddings(nn.Module):
    """Word + position + token-type (always type 0) embeddings, then LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.word = nn.Embedding(VOCAB, HIDDEN)
        self.position = nn.Embedding(MAX_POSITIONS, HIDDEN)
        self.token_type = nn.Embedding(TYPE_VOCAB, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN, eps=LN_EPS)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        return self.norm(self.word(ids) + self.position.weight[:n] + self.token_type.weight[0])


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average over attended tokens (sentence-transformers' pooling for this model)."""
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


class MiniLMClient(nn.Module):
    """Device side: embeddings and the first layers; x (B, 2, L) int64 -> (B, L, 385)."""

    def __init__(self, embeddings: Embeddings, layers: list[EncoderLayer]) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]
        add_mask = _additive_mask(mask)
        h = self.embeddings(ids)
        for layer in self.layers:
            h = layer(h, add_mask)
        return torch.cat([h, mask.to(h.dtype).unsqueeze(-1)], dim=-1)


class _LayerSegment(nn.Module):
    """One client layer as a block-wise ZO segment, on the smashed layout (hidden + mask)
    in and out; the first segment also embeds, from (B, 2, L) token ids and mask."""

    def __init__(self, layer: EncoderLayer, embeddings: Embeddings | None = None) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embeddings is not None:
            mask = x[:, 1].to(torch.float32)
            h = self.embeddings(x[:, 0])
        else:
            h, mask = x[..., :HIDDEN], x[..., HIDDEN]
        h = self.layer(h, _additive_mask(mask))
        return torch.cat([h, mask.unsqueeze(-1)], dim=-1)


def client_segments(client: MiniLMClient) -> list[tuple[str, nn.Module]]:
    """The client as a chain of one-layer blocks (sharing its modules), for block-wise ZO:
    a LoRA step on layer i re-runs layers i.. only. Chained, they compute `client`."""
    return [(f"layers.{i}", _LayerSegment(layer, client.embeddings if i == 0 else None))
            for i, layer in enumerate(client.layers)]


class MiniLMHead(nn.Module):
    """Encoder layers on smashed data (B, L, 385), masked mean pooling and a classifier.

    The server's back half and the device's aux head are both this; they differ in depth.
    """

    def __init__(self, layers: list[EncoderLayer], num_classes: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.classifier = nn.Linear(HIDDEN, num_classes)

    def hidden(self, smashed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden state and the mask, split back out of the smashed tensor."""
        h, mask = smashed[..., :HIDDEN], smashed[..., HIDDEN]
        add_mask = _additive_mask(mask)
        for layer in self.layers:
            h = layer(h, add_mask)
        return h, mask

    def embed(self, smashed: torch.Tensor) -> torch.Tensor:
        return mean_pool(*self.hidden(smashed))

    def forward(self, smashed: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(smashed))


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Options with defaults filled in; unknown keys and bad values are refused."""
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise MiniLMError(f"unknown minilm option(s) {unknown}; help: known options are "
                          f"{', '.join(f'{k}={v!r}' for k, v in DEFAULT_OPTIONS.items())}")
    opts = {**DEFAULT_OPTIONS, **options}
    rank = opts["lora_rank"]
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= HIDDEN:
        raise MiniLMError(f"lora_rank must be an int in 1..{HIDDEN}, got {rank!r}")
    alpha = opts["lora_alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise MiniLMError(f"lora_alpha must be a positive number, got {alpha!r}")
    opts["lora_alpha"] = float(alpha)
    if opts["server_train"] not in SERVER_TRAIN:
        raise MiniLMError(f"server_train must be one of {SERVER_TRAIN}, got "
                          f"{opts['server_train']!r}")
    return opts


def _read_config(root: Path) -> None:
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MiniLMError(f"{root / 'config.json'} is unreadable: {exc}") from exc
    wrong = {k: config.get(k) for k, v in _CONFIG_EXPECTED.items() if config.get(k) != v}
    if wrong:
        raise MiniLMError(f"{root / 'config.json'} describes another model ({wrong}); help: "
                          "use the all-MiniLM-L6-v2 files")


def load_pretrained(embeddings: Embeddings, layers: list[EncoderLayer],
                    model_dir: str | Path | None = None) -> Path:
    """Copy model.safetensors into the modules; every tensor must be used or listed unused.

    Returns the directory the weights came from.
    """
    from safetensors import safe_open

    root = minilm_dir(model_dir)
    _read_config(root)
    targets: dict[str, torch.Tensor] = {}
    for src, dst in _EMBED_NAMES.items():
        for p in ("weight", "bias"):
            if hasattr(getattr(embeddings, dst), p):
                targets[f"{src}.{p}"] = getattr(getattr(embeddings, dst), p)
    for i, layer in enumerate(layers):
        for src, dst in _LAYER_NAMES.items():
            mod = getattr(layer, dst)
            targets[f"encoder.layer.{i}.{src}.weight"] = mod.weight
            targets[f"encoder.layer.{i}.{src}.bias"] = mod.bias
    path = root / "model.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            missing = sorted(set(targets) - keys)
            unexpected = sorted(keys - set(targets) - set(_UNUSED))
            if missing or unexpected:
                raise MiniLMError(f"{path} does not match MiniLM-L6: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
            with torch.no_grad():
                for name, param in targets.items():
                    value = f.get_tensor(name)
                    if tuple(value.shape) != tuple(param.shape):
                        raise MiniLMError(f"{path}: {name} has shape {tuple(value.shape)}, "
                                          f"expected {tuple(param.shape)}")
                    param.copy_(value.to(torch.float32))
    except MiniLMError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise MiniLMError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    return root


def _copy_base(layer: EncoderLayer, rank: int, alpha: float) -> EncoderLayer:
    """A new layer with `layer`'s pretrained (non-LoRA) weights and its own fresh adapters."""
    fresh = EncoderLayer(rank, alpha)
    base = {k: v for k, v in copy.deepcopy(layer.state_dict()).items() if "lora_" not in k}
    result = fresh.load_state_dict(base, strict=False)
    assert not result.unexpected_keys and all("lora_" in k for k in result.missing_keys)
    for name, param in fresh.named_parameters():
        param.requires_grad = "lora_" in name
    return fresh


def build_minilm(at: int, num_classes: int,
                 options: dict[str, Any]) -> tuple[MiniLMClient, MiniLMHead, MiniLMHead]:
    """(client, aux, server) with the device holding `at` layers; call under a seeded RNG.

    Initialisation order is fixed (classifiers first, then adapters) so a given seed gives
    the same classifiers for every cut, and the split's output does not depend on the cut.
    """
    opts = check_options(options)
    rank, alpha = opts["lora_rank"], opts["lora_alpha"]
    server_classifier = nn.Linear(HIDDEN, num_classes)
    aux_classifier = nn.Linear(HIDDEN, num_classes)
    server_rank = rank if opts["server_train"] == "lora" else 0
    layers = [EncoderLayer(rank if i < at else server_rank, alpha) for i in range(NUM_LAYERS)]
    embeddings = Embeddings()
    load_pretrained(embeddings, layers, opts["model_dir"])
    aux_layer = _copy_base(layers[at], rank, alpha)
    full_server = opts["server_train"] == "full"
    for i, module in enumerate((embeddings, *layers)):
        on_server = i > at  # index 0 is the embeddings
        for name, param in module.named_parameters():
            param.requires_grad = "lora_" in name or (full_server and on_server)
    client = MiniLMClient(embeddings, layers[:at])
    server = MiniLMHead(layers[at:], num_classes)
    aux = MiniLMHead([aux_layer], num_classes)
    with torch.no_grad():
        server.classifier.load_state_dict(server_classifier.state_dict())
        aux.classifier.load_state_dict(aux_classifier.state_dict())
    return client, aux, server


def sentence_embedding(client: MiniLMClient, server: MiniLMHead, x: torch.Tensor) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding (mean pooled, L2-normalised) through the split."""
    return F.normalize(server.embed(client(x)), dim=-1)
