"""A minimal BERT sequence-pair classifier forward, loading Hugging Face-named weights.

Only what inference needs: embeddings, the encoder (fused QKV projection, PyTorch's
scaled_dot_product_attention with a key-padding mask, exact erf GELU), the tanh pooler, and the
2-label head folded into one logit: softmax([z0, z1])[1] == sigmoid(z1 - z0), so the head is the
row difference (w1 - w0, b1 - b0), kept in fp32 whatever the encoder's dtype. The module is plain
tensors in, tensor out (no Python branching on data), so CUDA graphs and torch.compile can wrap it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# hidden_act values of BERT-family configs → the GELU variant they mean.
_ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}


class WeightsMismatchError(ValueError):
    """A state dict that does not fit the config (missing tensors, wrong shapes)."""


@dataclass(frozen=True)
class BertConfig:
    """The config.json fields the forward needs."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> BertConfig:
        """Read a Hugging Face BERT config; raises ValueError naming the field that is missing or wrong."""
        fields: dict[str, Any] = {}
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            value = config.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            fields[name] = value
        fields["type_vocab_size"] = int(config.get("type_vocab_size", 2))
        fields["layer_norm_eps"] = float(config.get("layer_norm_eps", 1e-12))
        fields["hidden_act"] = str(config.get("hidden_act", "gelu"))
        if fields["hidden_act"] not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {fields['hidden_act']!r} is not supported (one of {sorted(_ACTIVATIONS)})")
        if fields["hidden_size"] % fields["num_attention_heads"]:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        return cls(**fields)


class EncoderLayer(nn.Module):
    """One transformer block, post-LayerNorm as in BERT."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attention_out = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(hidden, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.gelu_approximate = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, *, cls_only: bool = False) -> torch.Tensor:
        """x: [B, L, H]; key_mask: [B, 1, 1, L] bool, True where a token may be attended to.

        With `cls_only` only the first position is computed (the last layer: nothing else is read).
        """
        batch, length, hidden = x.shape
        head_dim = hidden // self.num_heads
        q, k, v = (
            self.qkv(x)
            .view(batch, length, 3, self.num_heads, head_dim)
            .permute(2, 0, 3, 1, 4)  # [3, B, heads, L, head_dim]
            .unbind(0)
        )
        if cls_only:
            x, q = x[:, :1], q[:, :, :1]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        attended = attended.transpose(1, 2).reshape(batch, x.shape[1], hidden)
        x = self.attention_norm(x + self.attention_out(attended))
        return self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x), approximate=self.gelu_approximate)))


class BertSimilarity(nn.Module):
    """BERT encoder + pooler + folded 2-label head → one logit per pair (P(similar) = sigmoid(logit))."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, hidden)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, hidden)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, hidden)
        self.embedding_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.pooler = nn.Linear(hidden, hidden)
        # Stays fp32 (see `keep_head_fp32`): the logit difference is where low precision would hurt most.
        self.head = nn.Linear(hidden, 1)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """input_ids, token_type_ids: [B, L] integer; attention_mask: [B, L] bool. Returns fp32 logits [B]."""
        return self.head(self.pooled(input_ids, token_type_ids, attention_mask).float()).squeeze(-1)

    def pooled(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The pooler's output [B, H] (tanh of a dense layer over the last [CLS] state), in the model's dtype."""
        length = input_ids.shape[1]
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings.weight[:length]
            + self.token_type_embeddings(token_type_ids)
        )
        x = self.embedding_norm(x)
        key_mask = attention_mask[:, None, None, :]
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            x = layer(x, key_mask, cls_only=index == last)
        return torch.tanh(self.pooler(x[:, 0]))

    def keep_head_fp32(self) -> BertSimilarity:
        """Cast the head back to fp32 after `.to(dtype)`; returns self."""
        self.head.float()
        return self

    @classmethod
    def from_hf_state_dict(
        cls, config: BertConfig, state_dict: Mapping[str, torch.Tensor], *, positive_label: int
    ) -> BertSimilarity:
        """Build the model from a `BertForSequenceClassification`-named state dict (fp32, CPU).

        `positive_label` is the row of `classifier.weight` for label "1", read from the model's label map.
        """
        state = _normalize_names(state_dict)
        shapes = hf_tensor_shapes(config)
        missing = [name for name in shapes if name not in state]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise WeightsMismatchError(f"the weights lack {len(missing)} tensor(s): {shown}")
        wrong = [
            f"{name} is {tuple(state[name].shape)}, config.json implies {shape}"
            for name, shape in shapes.items()
            if tuple(state[name].shape) != shape
        ]
        if wrong:
            raise WeightsMismatchError("tensor shapes do not match config.json: " + "; ".join(wrong[:3]))

        mapped: dict[str, torch.Tensor] = {
            "word_embeddings.weight": state["bert.embeddings.word_embeddings.weight"],
            "position_embeddings.weight": state["bert.embeddings.position_embeddings.weight"],
            "token_type_embeddings.weight": state["bert.embeddings.token_type_embeddings.weight"],
            "embedding_norm.weight": state["bert.embeddings.LayerNorm.weight"],
            "embedding_norm.bias": state["bert.embeddings.LayerNorm.bias"],
            "pooler.weight": state["bert.pooler.dense.weight"],
            "pooler.bias": state["bert.pooler.dense.bias"],
        }
        for index in range(config.num_hidden_layers):
            hf = f"bert.encoder.layer.{index}."
            ours = f"layers.{index}."
            for kind in ("weight", "bias"):
                mapped[ours + f"qkv.{kind}"] = torch.cat(
                    [state[f"{hf}attention.self.{part}.{kind}"] for part in ("query", "key", "value")]
                )
                mapped[ours + f"attention_out.{kind}"] = state[f"{hf}attention.output.dense.{kind}"]
                mapped[ours + f"attention_norm.{kind}"] = state[f"{hf}attention.output.LayerNorm.{kind}"]
                mapped[ours + f"ffn_in.{kind}"] = state[f"{hf}intermediate.dense.{kind}"]
                mapped[ours + f"ffn_out.{kind}"] = state[f"{hf}output.dense.{kind}"]
                mapped[ours + f"ffn_norm.{kind}"] = state[f"{hf}output.LayerNorm.{kind}"]
        other = 1 - positive_label
        # Differences in float64 so the folded head is as exact as fp32 can hold.
        weight = state["classifier.weight"].double()
        bias = state["classifier.bias"].double()
        mapped["head.weight"] = (weight[positive_label] - weight[other]).float().unsqueeze(0)
        mapped["head.bias"] = (bias[positive_label] - bias[other]).float().unsqueeze(0)
        model = cls(config)
        model.load_state_dict(
            {name: tensor.float().contiguous() for name, tensor in mapped.items()}, strict=True, assign=True
        )
        return model.eval()


def _normalize_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept the pre-2019 LayerNorm names (gamma/beta) that older BERT checkpoints still carry."""
    renamed = {}
    for name, tensor in state_dict.items():
        if name.endswith("LayerNorm.gamma"):
            name = name[: -len("gamma")] + "weight"
        elif name.endswith("LayerNorm.beta"):
            name = name[: -len("beta")] + "bias"
        renamed[name] = tensor
    return renamed


def hf_tensor_shapes(config: BertConfig, *, num_labels: int = 2) -> dict[str, tuple[int, ...]]:
    """Every float tensor of a Hugging Face `BertForSequenceClassification` checkpoint, name → shape.

    The `bert.embeddings.position_ids` buffer is not listed: it is not a weight (the loader ignores it;
    the checkpoint generator writes it because transformers 5 insists on it).
    """
    hidden, inner = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "bert.embeddings.word_embeddings.weight": (config.vocab_size, hidden),
        "bert.embeddings.position_embeddings.weight": (config.max_position_embeddings, hidden),
        "bert.embeddings.token_type_embeddings.weight": (config.type_vocab_size, hidden),
        "bert.embeddings.LayerNorm.weight": (hidden,),
        "bert.embeddings.LayerNorm.bias": (hidden,),
    }
    for index in range(config.num_hidden_layers):
        layer = f"bert.encoder.layer.{index}."
        for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[f"{layer}{part}.weight"] = (hidden, hidden)
            shapes[f"{layer}{part}.bias"] = (hidden,)
        shapes[f"{layer}attention.output.LayerNorm.weight"] = (hidden,)
        shapes[f"{layer}attention.output.LayerNorm.bias"] = (hidden,)
        shapes[f"{layer}intermediate.dense.weight"] = (inner, hidden)
        shapes[f"{layer}intermediate.dense.bias"] = (inner,)
        shapes[f"{layer}output.dense.weight"] = (hidden, inner)
        shapes[f"{layer}output.dense.bias"] = (hidden,)
        shapes[f"{layer}output.LayerNorm.weight"] = (hidden,)
        shapes[f"{layer}output.LayerNorm.bias"] = (hidden,)
    shapes["bert.pooler.dense.weight"] = (hidden, hidden)
    shapes["bert.pooler.dense.bias"] = (hidden,)
    shapes["classifier.weight"] = (num_labels, hidden)
    shapes["classifier.bias"] = (num_labels,)
    return shapes
