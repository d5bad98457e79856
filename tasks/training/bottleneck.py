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
"""

from __future__ import annotations

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


class BottleneckLayer(nn.Module):
    """A sub-layer with one bottleneck adapter per adapter name (PEFT's `BaseTunerLayer` contract)."""

    adapter_layer_names = ("bottleneck_down", "bottleneck_up", "bottleneck_gate")
    other_param_names = ("bottleneck_settings",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, hidden_size: int, config: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.hidden_size = hidden_size
        self.bottleneck_down = nn.ModuleDict({})
        self.bottleneck_up = nn.ModuleDict({})
        self.bottleneck_gate = nn.ModuleDict({})
        self.bottleneck_act = nn.ModuleDict({})
        self.bottleneck_settings: dict[str, dict[str, Any]] = {}
        self._active_adapter = adapter_name
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: Any) -> None:
        base = self.base_layer
        weight = next((p for p in base.parameters()), None)
        kwargs = {"device": weight.device if weight is not None and weight.device.type != "meta" else None}
        down = nn.Linear(self.hidden_size, config.bottleneck_size, **kwargs)
        up = nn.Linear(config.bottleneck_size, self.hidden_size, **kwargs)
        nn.init.zeros_(up.weight)  # an untrained adapter is the identity
        nn.init.zeros_(up.bias)
        self.bottleneck_down[adapter_name] = down
        self.bottleneck_up[adapter_name] = up
        self.bottleneck_act[adapter_name] = _ACTIVATIONS[config.non_linearity]()
        if config.gated:
            gate = nn.Linear(self.hidden_size, 1, **kwargs)
            self.bottleneck_gate[adapter_name] = gate
        self.bottleneck_settings[adapter_name] = {"placement": config.placement, "scaling": float(config.scaling)}
        self.set_adapter(self.active_adapters)

    def _term(self, adapter: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        settings = self.bottleneck_settings[adapter]
        source = out if settings["placement"] == "sequential" else x
        down = self.bottleneck_down[adapter]
        source = source.to(down.weight.dtype)
        term = self.bottleneck_up[adapter](self.bottleneck_act[adapter](down(source))) * settings["scaling"]
        if adapter in self.bottleneck_gate:
            term = term * torch.sigmoid(self.bottleneck_gate[adapter](x.to(down.weight.dtype)))
        return term.to(out.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        adapter_names = kwargs.pop("adapter_names", None)
        # The sub-layer's input: positional (mlp(x)) or by keyword (self_attn(hidden_states=...)).
        x = args[0] if args else kwargs["hidden_states"]
        result = self.base_layer(*args, **kwargs)
        if self.disable_adapters:
            return result
        out = result[0] if isinstance(result, tuple) else result
        if adapter_names is not None:
            out = self._mixed_batch(x, out, adapter_names)
        else:
            for adapter in self.active_adapters:
                if adapter in self.bottleneck_down:
                    out = out + self._term(adapter, x, out)
        return (out, *result[1:]) if isinstance(result, tuple) else out

    def _mixed_batch(self, x: torch.Tensor, out: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """Each row through its own adapter (rows of `__base__` unchanged)."""
        out = out.clone()
        for adapter in set(adapter_names):
            if adapter == BASE_ADAPTER or adapter not in self.bottleneck_down:
                continue
            rows = [i for i, name in enumerate(adapter_names) if name == adapter]
            out[rows] = out[rows] + self._term(adapter, x[rows], out[rows])
        return out


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


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size)


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _model_class(layer_cls: type) -> type:
    from peft.tuners.tuners_utils import BaseTuner

    class BottleneckModel(BaseTuner):
        """The PEFT tuner: wraps each targeted sub-layer in a `BottleneckLayer`."""

        prefix: str = f"{NAME}_"
        tuner_layer_cls = layer_cls
        target_module_mapping: dict[str, list[str]] = {}

        def _prepare_adapter_config(self, peft_config: Any, model_config: dict) -> Any:
            if not peft_config.target_modules:
                peft_config.target_modules = ["self_attn", "mlp"]
            return peft_config

        @staticmethod
        def _check_target_module_exists(peft_config: Any, key: str) -> bool:
            if not any(key == t or key.endswith("." + t) for t in peft_config.target_modules):
                return False
            match = _LAYER_INDEX.search(key)
            return not (match and int(match.group(1)) < peft_config.drop_first_layers)

        def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kw):
            if isinstance(target, layer_cls):
                target.update_layer(adapter_name, peft_config)
                return
            new = layer_cls(target, adapter_name, _hidden_size(self.model), peft_config)
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
                if self.prefix not in name:
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
            known = {n for m in self.modules() if isinstance(m, layer_cls) for n in m.bottleneck_down}
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
