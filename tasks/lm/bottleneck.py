"""Bottleneck adapters as a PEFT method: Adapter Tuning (Houlsby), parallel adapters, AdapterDrop,
and the adapter half of MAM Adapter and UniPELT.

PEFT has no bottleneck adapters and AdapterHub's `adapters` pins transformers 4.x, so they are a
custom PEFT method registered through `peft.utils.register_peft_method` (STACK.md): a
`BottleneckConfig`, a `BottleneckModel` tuner and a `BottleneckLayer` that wraps a sub-layer
(attention, feed-forward). Saving, `PeftModel.from_pretrained`, several adapters on one base,
`set_adapter`, `delete_adapter` and mixed-adapter batches (`adapter_names=`) go through PEFT's own
machinery like for LoRA; `register()` must have run in the process first (peft_methods and the
serving engine call it).

One adapter on a sub-layer f with input x and output f(x) (down: d -> m, up: m -> d, m << d):

    sequential (Houlsby et al. 2019)  h = f(x) + s * up(act(down(f(x))))
    parallel   (He et al. 2022)       h = f(x) + s * up(act(down(x)))
    gated      (UniPELT, Mao et al.)  the adapter term times sigmoid(gate(x)), one gate per token

`up` starts at zero, so an untrained adapter is the identity (the base model's outputs). AdapterDrop
(Rücklé et al. 2021) is `drop_first_layers`: the lowest transformer blocks get no adapter.

The same layer also carries, per adapter, what the hybrid methods add:
    prefix  (MAM, UniPELT)  trainable keys/values prepended in the attention (`prefix_attention`,
                            registered with transformers' AttentionInterface), optionally gated
    LoRA    (UniPELT)       a gated low-rank update on linear layers (q_proj, v_proj)
    fusion  (AdapterFusion) frozen task adapters combined by a learned attention per token
"""

from __future__ import annotations

import copy
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Optional

import torch
from torch import nn

NAME = "bottleneck"
BASE_ADAPTER = "__base__"
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _peft_type() -> Any:
    """PEFT's registry accepts only names in its `PeftType` enum ("add an entry to PeftType"); a
    method living outside peft adds its member the only way an Enum allows after creation."""
    from peft.utils.peft_types import PeftType

    key = NAME.upper()
    if key not in PeftType.__members__:
        member = str.__new__(PeftType, key)
        member._name_ = key
        member._value_ = key
        member.__objclass__ = PeftType
        PeftType._member_map_[key] = member
        PeftType._value2member_map_[key] = member
        PeftType._member_names_.append(key)
        type.__setattr__(PeftType, key, member)
    return PeftType[key]


def _config_class() -> type:
    from peft.config import PeftConfig

    @dataclass
    class BottleneckConfig(PeftConfig):
        """Bottleneck adapters on the outputs of the modules named in `target_modules`."""

        target_modules: Optional[list[str]] = field(
            default=None, metadata={"help": "Sub-layers whose output gets an adapter (e.g. self_attn, mlp)."}
        )
        bottleneck_size: int = field(default=16, metadata={"help": "Width m of the down-projection."})
        placement: str = field(default="sequential", metadata={"help": "sequential (on f(x)) or parallel (on x)."})
        non_linearity: str = field(default="relu", metadata={"help": "Activation between down and up."})
        scaling: float = field(default=1.0, metadata={"help": "s: the adapter term's multiplier."})
        gated: bool = field(default=False, metadata={"help": "UniPELT gate sigmoid(W x) on the adapter term."})
        drop_first_layers: int = field(default=0, metadata={"help": "AdapterDrop: no adapter in the lowest N blocks."})
        prefix_length: int = field(default=0, metadata={"help": "Prefix keys/values per attention module (MAM, UniPELT)."})
        prefix_modules: Optional[list[str]] = field(
            default=None, metadata={"help": "Key projections (k_proj) whose attention module gets the prefix."}
        )
        lora_r: int = field(default=0, metadata={"help": "Rank of the low-rank update on lora_modules (UniPELT)."})
        lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale alpha / r)."})
        lora_modules: Optional[list[str]] = field(default=None, metadata={"help": "Linear layers with a low-rank update."})
        fusion: Optional[list[str]] = field(
            default=None, metadata={"help": "AdapterFusion: names of the frozen task adapters fused at each target module."}
        )
        modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Unused (kept for PEFT)."})

        def __post_init__(self) -> None:
            super().__post_init__()
            self.peft_type = _peft_type()
            if self.placement not in ("sequential", "parallel"):
                raise ValueError(f"placement {self.placement!r}: use sequential or parallel")
            if self.non_linearity not in _ACTIVATIONS:
                raise ValueError(f"non_linearity {self.non_linearity!r}: use one of {sorted(_ACTIVATIONS)}")

    BottleneckConfig.__module__ = __name__
    return BottleneckConfig


PREFIX_ATTENTION = "tunepipe_prefix"


def prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The attention function of an attention module that carries prefixes (registered with
    transformers' `AttentionInterface`): the prefix keys/values are prepended to the layer's keys
    and values (after the cache update, so they are never cached) and every query sees them.

    With a prefix gate (UniPELT) the prefix's share of each token's output is scaled by the token's
    gate: out = attn(q, [P_k; K], [0; V]) + g * (attn(q, [P_k; K], [P_v; V]) - attn(q, [P_k; K], [0; V])).
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    inner = _eager() if getattr(module, "tunepipe_inner_attention", "sdpa") == "eager" else ALL_ATTENTION_FUNCTIONS["sdpa"]
    holder = getattr(module, module.tunepipe_prefix_holder)
    prefix, holder.tunepipe_prefix = getattr(holder, "tunepipe_prefix", None), None
    if prefix is None:
        return inner(module, query, key, value, attention_mask, **kwargs)
    keys, values, keep, gate = prefix  # (b, kv_heads, P, d) twice, (b, P) bool, (b, q) or None
    b, _, q_len, _ = query.shape
    k_len = key.shape[2]
    key = torch.cat([keys.to(key.dtype), key], dim=2)
    mask = _prefixed_mask(attention_mask, keep, b, q_len, k_len, query)
    kwargs.pop("is_causal", None)
    with_prefix, weights = inner(module, query, key, torch.cat([values.to(value.dtype), value], dim=2), mask, is_causal=False, **kwargs)
    if gate is None:
        return with_prefix, weights
    without, _ = inner(module, query, key, torch.cat([torch.zeros_like(values, dtype=value.dtype), value], dim=2), mask,
                       is_causal=False, **kwargs)
    g = gate.to(with_prefix.dtype)[:, :, None, None]  # output is (b, q, heads, d)
    return without + g * (with_prefix - without), weights


def _eager() -> Any:
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward


def _prefixed_mask(mask: torch.Tensor | None, keep: torch.Tensor, b: int, q_len: int, k_len: int, query: torch.Tensor) -> torch.Tensor:
    """The layer's mask with the prefix columns in front: visible to every query of a row that uses
    a prefix. No mask (sdpa's causal shortcut) becomes the explicit causal mask, aligned to the end
    of the keys (a cache holds the earlier ones)."""
    prefix_cols = keep[:, None, None, :].expand(b, 1, q_len, keep.shape[1])
    if mask is None:
        rows = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
        real = (torch.arange(k_len, device=query.device)[None, :] <= rows)[None, None].expand(b, 1, q_len, k_len)
        mask = real
    else:
        mask = mask[..., :k_len].expand(b, -1, q_len, k_len)
    if mask.dtype == torch.bool:
        return torch.cat([prefix_cols, mask], dim=-1)
    blocked = torch.finfo(mask.dtype).min
    prefix = torch.zeros(prefix_cols.shape, dtype=mask.dtype, device=mask.device).masked_fill(~prefix_cols, blocked)
    return torch.cat([prefix, mask], dim=-1)


def use_prefix_attention(attention: nn.Module, holder: str) -> None:
    """Make `attention` call `prefix_attention`, with its prefix held by its child `holder` (the key
    projection). Its config becomes a copy whose attention implementation is `prefix_attention`,
    so other modules and the model's config keep theirs; without a prefix it runs the original
    kernel (sdpa or eager; other kernels take no dense mask, so prefixes use sdpa)."""
    from transformers import AttentionInterface

    if getattr(attention, "tunepipe_prefix_holder", None) is not None:
        return
    AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)
    attention.tunepipe_inner_attention = attention.config._attn_implementation
    attention.tunepipe_prefix_holder = holder
    attention.config = copy.copy(attention.config)
    attention.config._attn_implementation_internal = PREFIX_ATTENTION


def _matches(key: str, names: list[str] | None) -> bool:
    return any(key == t or key.endswith("." + t) for t in (names or []))


FUSION_TENSORS = ("bottleneck_fusion_down_weight", "bottleneck_fusion_down_bias", "bottleneck_fusion_up_weight", "bottleneck_fusion_up_bias")


class BottleneckLayer(nn.Module):
    """A wrapped sub-layer with, per adapter name, any of: a bottleneck adapter on its output, a
    prefix (attention modules), a low-rank update (linear layers). PEFT's `BaseTunerLayer` contract."""

    adapter_layer_names = (
        "bottleneck_down", "bottleneck_up", "bottleneck_gate", "bottleneck_prefix_keys", "bottleneck_prefix_values",
        "bottleneck_prefix_gate", "bottleneck_lora_A", "bottleneck_lora_B", "bottleneck_lora_gate",
        "bottleneck_fusion_query", "bottleneck_fusion_key", "bottleneck_fusion_value",
    )
    # AdapterFusion's task adapters: saved and deleted with their adapter, never trained (not in
    # adapter_layer_names, which set_adapter makes trainable).
    # Stacked over the task adapters (N, ...) rather than a nested dict per task: PEFT's save/load
    # renames keys assuming the adapter name is the last dict level.
    other_param_names = ("bottleneck_settings",) + FUSION_TENSORS

    def __init__(self, base_layer: nn.Module, adapter_name: str, model_config: Any, config: Any, key: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.model_config = model_config
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict({}) if "prefix_keys" in name or "prefix_values" in name else nn.ModuleDict({}))
        for name in FUSION_TENSORS:
            setattr(self, name, nn.ParameterDict({}))
        self.bottleneck_act = nn.ModuleDict({})
        self.bottleneck_settings: dict[str, dict[str, Any]] = {}
        self._active_adapter = adapter_name
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self.update_layer(adapter_name, config, key)

    def _device(self) -> Any:
        weight = next(self.base_layer.parameters(), None)
        return weight.device if weight is not None and weight.device.type != "meta" else None

    def update_layer(self, adapter_name: str, config: Any, key: str) -> None:
        hidden = int(self.model_config.hidden_size)
        device = self._device()
        settings: dict[str, Any] = {"placement": config.placement, "scaling": float(config.scaling)}
        if config.fusion and _matches(key, config.target_modules):
            self._add_fusion(adapter_name, config, hidden, device)
        elif _matches(key, config.target_modules):
            down = nn.Linear(hidden, config.bottleneck_size, device=device)
            up = nn.Linear(config.bottleneck_size, hidden, device=device)
            nn.init.zeros_(up.weight)  # an untrained adapter is the identity
            nn.init.zeros_(up.bias)
            self.bottleneck_down[adapter_name] = down
            self.bottleneck_up[adapter_name] = up
            self.bottleneck_act[adapter_name] = _ACTIVATIONS[config.non_linearity]()
            if config.gated:
                self.bottleneck_gate[adapter_name] = nn.Linear(hidden, 1, device=device)
        if config.prefix_length and _matches(key, config.prefix_modules):
            self._add_prefix(adapter_name, config, device)
            settings["prefix"] = True
        if config.lora_r and _matches(key, config.lora_modules):
            base = self.base_layer
            a = nn.Linear(base.in_features, config.lora_r, bias=False, device=device)
            b = nn.Linear(config.lora_r, base.out_features, bias=False, device=device)
            nn.init.kaiming_uniform_(a.weight, a=5**0.5)
            nn.init.zeros_(b.weight)
            self.bottleneck_lora_A[adapter_name] = a
            self.bottleneck_lora_B[adapter_name] = b
            settings["lora_scaling"] = float(config.lora_alpha) / config.lora_r
            if config.gated:
                self.bottleneck_lora_gate[adapter_name] = nn.Linear(base.in_features, 1, device=device)
        self.bottleneck_settings[adapter_name] = settings
        self.set_adapter(self.active_adapters)

    def _add_fusion(self, adapter_name: str, config: Any, hidden: int, device: Any) -> None:
        """The task adapters (filled from their own files by the caller, frozen) and the fusion's
        query/key/value (Pfeiffer et al.: value starts as the identity, so an untrained fusion
        averages the task adapters)."""
        n, m = len(config.fusion), config.bottleneck_size
        shapes = {"down_weight": (n, m, hidden), "down_bias": (n, m), "up_weight": (n, hidden, m), "up_bias": (n, hidden)}
        for part, shape in shapes.items():
            getattr(self, f"bottleneck_fusion_{part}")[adapter_name] = nn.Parameter(torch.zeros(shape, device=device), requires_grad=False)
        self.bottleneck_act[adapter_name] = _ACTIVATIONS[config.non_linearity]()
        query = nn.Linear(hidden, hidden, device=device)
        key = nn.Linear(hidden, hidden, device=device)
        for layer in (query, key):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        value = nn.Linear(hidden, hidden, device=device)
        if value.weight.device.type != "meta":
            with torch.no_grad():
                value.weight.copy_(torch.eye(hidden, device=value.weight.device))
                value.bias.zero_()
        self.bottleneck_fusion_query[adapter_name] = query
        self.bottleneck_fusion_key[adapter_name] = key
        self.bottleneck_fusion_value[adapter_name] = value

    def _fusion_term(self, adapter: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """sum_n softmax_n(Q(h) . K(h + a_n) / sqrt(d)) V(a_n), a_n the n-th task adapter's term, h the
        sub-layer's output."""
        settings = self.bottleneck_settings[adapter]
        query = self.bottleneck_fusion_query[adapter]
        dtype = query.weight.dtype
        h = out.to(dtype)
        source = h if settings["placement"] == "sequential" else x.to(dtype)
        act = self.bottleneck_act[adapter]
        down = torch.einsum("...d,nmd->...nm", source, self.bottleneck_fusion_down_weight[adapter]) + self.bottleneck_fusion_down_bias[adapter]
        terms = torch.einsum("...nm,ndm->...nd", act(down), self.bottleneck_fusion_up_weight[adapter])
        terms = (terms + self.bottleneck_fusion_up_bias[adapter]) * settings["scaling"]  # (..., N, d): each task adapter's term
        keys = self.bottleneck_fusion_key[adapter](h.unsqueeze(-2) + terms)
        scores = (keys @ query(h).unsqueeze(-1)).squeeze(-1) / h.shape[-1] ** 0.5
        weights = torch.softmax(scores, dim=-1)
        return (weights.unsqueeze(-1) * self.bottleneck_fusion_value[adapter](terms)).sum(-2).to(out.dtype)

    def _add_prefix(self, adapter_name: str, config: Any, device: Any) -> None:
        """Trainable prefix keys and values, held by the attention's key projection (this layer): it
        sees the attention's input (for UniPELT's gate) and the batch's adapter names, and hands the
        prefix to `prefix_attention` (see `use_prefix_attention`)."""
        mc = self.model_config
        head_dim = int(getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads)
        shape = (self.base_layer.out_features // head_dim, config.prefix_length, head_dim)
        self.bottleneck_prefix_keys[adapter_name] = nn.Parameter(torch.randn(shape, device=device) * 0.02)
        self.bottleneck_prefix_values[adapter_name] = nn.Parameter(torch.randn(shape, device=device) * 0.02)
        if config.gated:
            self.bottleneck_prefix_gate[adapter_name] = nn.Linear(int(mc.hidden_size), 1, device=device)

    # ------------------------------------------------------------------ forward

    def _adapter_term(self, adapter: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        settings = self.bottleneck_settings[adapter]
        source = out if settings["placement"] == "sequential" else x
        down = self.bottleneck_down[adapter]
        term = self.bottleneck_up[adapter](self.bottleneck_act[adapter](down(source.to(down.weight.dtype)))) * settings["scaling"]
        if adapter in self.bottleneck_gate:
            term = term * torch.sigmoid(self.bottleneck_gate[adapter](x.to(down.weight.dtype)))
        return term.to(out.dtype)

    def _lora_term(self, adapter: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        a = self.bottleneck_lora_A[adapter]
        term = self.bottleneck_lora_B[adapter](a(x.to(a.weight.dtype))) * self.bottleneck_settings[adapter]["lora_scaling"]
        if adapter in self.bottleneck_lora_gate:
            term = term * torch.sigmoid(self.bottleneck_lora_gate[adapter](x.to(a.weight.dtype)))
        return term.to(out.dtype)

    def _terms(self, adapter: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if adapter in self.bottleneck_lora_A:
            out = out + self._lora_term(adapter, x, out)
        if adapter in self.bottleneck_down:
            out = out + self._adapter_term(adapter, x, out)
        if adapter in self.bottleneck_fusion_query:
            out = out + self._fusion_term(adapter, x, out)
        return out

    def _prefix(self, x: torch.Tensor, row_adapters: list[list[str]]) -> Any:
        """(keys, values, keep, gate) for `prefix_attention`: each row's adapters' prefixes side by side."""
        per_row = [[a for a in names if a in self.bottleneck_prefix_keys] for names in row_adapters]
        width = max((sum(self.bottleneck_prefix_keys[a].shape[1] for a in names) for names in per_row), default=0)
        if width == 0:
            return None
        some = next(a for names in per_row for a in names)
        heads, _, dim = self.bottleneck_prefix_keys[some].shape
        param = self.bottleneck_prefix_keys[some]
        keys = x.new_zeros((len(per_row), heads, width, dim), dtype=param.dtype)
        values = torch.zeros_like(keys)
        keep = torch.zeros((len(per_row), width), dtype=torch.bool, device=x.device)
        gate = None
        for row, names in enumerate(per_row):
            at = 0
            for a in names:
                k, v = self.bottleneck_prefix_keys[a], self.bottleneck_prefix_values[a]
                keys[row, :, at:at + k.shape[1]] = k
                values[row, :, at:at + k.shape[1]] = v
                keep[row, at:at + k.shape[1]] = True
                at += k.shape[1]
            gated = [a for a in names if a in self.bottleneck_prefix_gate]
            if gated:
                if gate is None:
                    gate = torch.ones(x.shape[:2], device=x.device, dtype=param.dtype)
                gate[row] = torch.sigmoid(self.bottleneck_prefix_gate[gated[0]](x[row].to(param.dtype))).squeeze(-1)
        return keys, values, keep, gate

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        adapter_names = kwargs.pop("adapter_names", None)
        # The sub-layer's input: positional (mlp(x)) or by keyword (self_attn(hidden_states=...)).
        x = args[0] if args else kwargs["hidden_states"]
        if self.disable_adapters:
            return self.base_layer(*args, **kwargs)
        if adapter_names is not None:
            row_adapters = [[n] if n != BASE_ADAPTER else [] for n in adapter_names]
        else:
            row_adapters = [list(self.active_adapters)] * x.shape[0]
        if self.bottleneck_prefix_keys:
            self.tunepipe_prefix = self._prefix(x, row_adapters)  # read (and cleared) by prefix_attention
        result = self.base_layer(*args, **kwargs)
        out = result[0] if isinstance(result, tuple) else result
        if adapter_names is None:
            for adapter in self.active_adapters:
                out = self._terms(adapter, x, out)
        else:
            out = out.clone()
            for adapter in {n for names in row_adapters for n in names}:
                rows = [i for i, names in enumerate(row_adapters) if adapter in names]
                out[rows] = self._terms(adapter, x[rows], out[rows])
        return (out, *result[1:]) if isinstance(result, tuple) else out


def _tuner_layer_class() -> type:
    """`BottleneckLayer` with PEFT's `BaseTunerLayer` mixed in (peft is imported lazily)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    class PeftBottleneckLayer(BottleneckLayer, BaseTunerLayer):
        def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
            raise ValueError("bottleneck adapters add a non-linear term: they cannot be merged into the base weights")

        def unmerge(self) -> None:
            return None

    PeftBottleneckLayer.__name__ = "BottleneckLayer"
    PeftBottleneckLayer.__module__ = __name__
    return PeftBottleneckLayer


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _model_class(layer_cls: type) -> type:
    from peft.tuners.tuners_utils import BaseTuner

    class BottleneckModel(BaseTuner):
        """The PEFT tuner: wraps each targeted sub-layer in a `BottleneckLayer`."""

        prefix: str = f"{NAME}_"
        tuner_layer_cls = layer_cls
        target_module_mapping: dict[str, list[str]] = {}

        def _prepare_adapter_config(self, peft_config: Any, model_config: dict) -> Any:
            if peft_config.target_modules is None:
                peft_config.target_modules = ["self_attn", "mlp"]
            return peft_config

        @staticmethod
        def _check_target_module_exists(peft_config: Any, key: str) -> bool:
            wanted = list(peft_config.target_modules or [])
            wanted += list(peft_config.prefix_modules or []) if peft_config.prefix_length else []
            wanted += list(peft_config.lora_modules or []) if peft_config.lora_r else []
            if not _matches(key, wanted):
                return False
            match = _LAYER_INDEX.search(key)
            return not (match and int(match.group(1)) < peft_config.drop_first_layers)

        def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kw):
            if peft_config.prefix_length and _matches(current_key, peft_config.prefix_modules):
                use_prefix_attention(parent, target_name)
            if isinstance(target, layer_cls):
                target.update_layer(adapter_name, peft_config, current_key)
                return
            new = layer_cls(target, adapter_name, _text_config(self.model), peft_config, current_key)
            if adapter_name not in self.active_adapters:
                new.requires_grad_(False)
            self._replace_module(parent, target_name, new, target)

        def _replace_module(self, parent, child_name, new_module, child) -> None:
            setattr(parent, child_name, new_module)
            for name, module in new_module.named_modules():
                if self.prefix in name:
                    weight = next(child.parameters(), None)
                    if weight is not None and weight.device.type != "meta":
                        module.to(weight.device)

        def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
            for name, param in model.named_parameters():
                if self.prefix not in name or any(f".{t}." in name for t in FUSION_TENSORS):
                    param.requires_grad = False

        @contextmanager
        def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
            """Mixed-adapter batches: `generate(..., adapter_names=[...])` reaches every layer."""
            adapter_names = kwargs.pop("adapter_names", None)
            if adapter_names is None:
                yield
                return
            if self.training:
                raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
            known = {n for m in self.modules() if isinstance(m, layer_cls) for n in m.bottleneck_settings}
            unknown = {n for n in adapter_names if n != BASE_ADAPTER} - known
            if unknown:
                raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
            num_beams = kwargs.get("num_beams") or 1
            names = [n for n in adapter_names for _ in range(num_beams)]
            handles = [
                m.register_forward_pre_hook(partial(_inject_names, adapter_names=names), with_kwargs=True)
                for m in self.modules() if isinstance(m, layer_cls)
            ]
            try:
                yield
            finally:
                for handle in handles:
                    handle.remove()

    BottleneckModel.__module__ = __name__
    return BottleneckModel


def _inject_names(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]) -> tuple:
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


_REGISTERED: dict[str, Any] = {}


def register() -> Any:
    """Register the method with PEFT once per process; returns `BottleneckConfig`."""
    if "config" in _REGISTERED:
        return _REGISTERED["config"]
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    peft_type = _peft_type()
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:  # registered by an earlier import of this module
        _REGISTERED["config"] = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
        return _REGISTERED["config"]
    config_cls = _config_class()
    layer_cls = _tuner_layer_class()
    register_peft_method(name=NAME, config_cls=config_cls, model_cls=_model_class(layer_cls), prefix=f"{NAME}_")
    _REGISTERED.update({"config": config_cls, "layer": layer_cls})
    return config_cls


def layer_class() -> type:
    register()
    if "layer" not in _REGISTERED:
        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

        _REGISTERED["layer"] = PEFT_TYPE_TO_TUNER_MAPPING[_peft_type()].tuner_layer_cls
    return _REGISTERED["layer"]
