"""``dlcore.nn.LoRALinear``: a drop-in for peft's ``lora.Linear`` on dlcore's fused LoRA ops.

The module keeps peft's structure and state-dict keys (``base_layer.weight``,
``lora_A.<adapter>.weight``, ``lora_B.<adapter>.weight``), so checkpoints load either way and
``from_peft`` shares the very parameters of the peft layer it replaces.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..ops.lora import lora_linear, lora_linear_multi

BASE_ONLY = "__base__"  # peft's name for "no adapter" in a mixed batch


class _AdaptersDisabled:
    """Returned by ``disable_adapters()``: adapters are off now; ``with`` turns them back on."""

    def __init__(self, module: LoRALinear) -> None:
        self.module = module

    def __enter__(self) -> LoRALinear:
        return self.module

    def __exit__(self, *exc) -> None:
        self.module.enable_adapters()


class LoRALinear(nn.Module):
    """``y = base_layer(x) + sum over active adapters of scaling * B(A(dropout(x)))``, fused.

    ``base_layer`` is an ``nn.Linear`` (weight (out, in)) or, with ``fan_in_fan_out``, a layer
    whose weight is stored (in, out) like transformers' ``Conv1D``. Adapters are added with
    :meth:`add_adapter`; :meth:`set_adapter` picks the active ones; ``forward(x,
    adapter_names=[...])`` gives every sample of the batch its own adapter (``"__base__"`` for
    none) in one multi-adapter kernel.
    """

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        weight = base_layer.weight
        if weight.dim() != 2:
            raise ValueError(f"base_layer.weight must be 2-D, got shape {tuple(weight.shape)}")
        self.base_layer = base_layer
        self.fan_in_fan_out = bool(fan_in_fan_out)
        in_f, out_f = weight.shape if fan_in_fan_out else weight.shape[::-1]
        self.in_features, self.out_features = int(in_f), int(out_f)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout_p: dict[str, float] = {}
        self.merged_adapters: list[str] = []
        self._active: list[str] = []
        self._disabled = False
        self._stack_cache: tuple | None = None

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_name: str = "default",
        fan_in_fan_out: bool = False,
    ) -> LoRALinear:
        """Wrap ``linear`` (kept as ``base_layer``) with one new adapter, initialised like peft
        (A Kaiming-uniform, B zero: the output starts equal to the base layer's)."""
        module = cls(linear, fan_in_fan_out=fan_in_fan_out)
        module.add_adapter(adapter_name, r, alpha, dropout, use_rslora)
        return module

    @classmethod
    def from_peft(cls, layer: nn.Module) -> LoRALinear:
        """Take over a peft ``lora.Linear``: the same base layer, adapters (shared parameters),
        scalings, dropout, active and merged state. ``to_peft()`` hands the layer back."""
        for attr in ("base_layer", "lora_A", "lora_B", "scaling", "lora_dropout"):
            if not hasattr(layer, attr):
                raise TypeError(f"from_peft expects a peft lora.Linear, got {type(layer).__name__}")
        if getattr(layer, "lora_variant", None):
            raise ValueError(
                f"from_peft: adapters {sorted(layer.lora_variant)} use a LoRA variant (DoRA, aLoRA"
                ", ...), which dlcore's LoRALinear does not implement"
            )
        for name, b in layer.lora_B.items():
            if getattr(b, "bias", None) is not None:
                raise ValueError(f"from_peft: adapter {name!r} has lora_bias, not supported")
        base = layer.base_layer
        if not isinstance(getattr(base, "weight", None), torch.Tensor) or base.weight.dim() != 2:
            raise ValueError(
                f"from_peft: base layer {type(base).__name__} has no 2-D weight (quantised layers "
                "are not supported)"
            )
        module = cls(base, fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False)))
        module.lora_A, module.lora_B = layer.lora_A, layer.lora_B
        module.r, module.lora_alpha, module.scaling = layer.r, layer.lora_alpha, layer.scaling
        for name in layer.lora_A:
            drop = layer.lora_dropout[name]
            module.lora_dropout_p[name] = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
        module.merged_adapters = layer.merged_adapters  # shared: merging here is seen by peft
        module._active = list(layer.active_adapters)
        module._disabled = bool(layer.disable_adapters)
        module.train(layer.training)
        module.__dict__["_peft_layer"] = layer  # not a submodule: state-dict keys stay peft's
        return module

    def to_peft(self) -> nn.Module:
        """The peft layer this module was built from, with the active/disabled state synced."""
        layer = self.__dict__.get("_peft_layer")
        if layer is None:
            raise ValueError("to_peft: this LoRALinear was not built with from_peft")
        layer._active_adapter = list(self._active)
        layer._disable_adapters = self._disabled
        layer.train(self.training)
        return layer

    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        """Add adapter ``name`` of rank ``r`` (scaling alpha / r, or alpha / sqrt(r) with rsLoRA)
        and make it the active one."""
        if r < 1:
            raise ValueError(f"r must be a positive rank, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        w = self.base_layer.weight
        kw = {"device": w.device, "dtype": w.dtype}
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout_p[name] = float(dropout)
        self.set_adapter(name)

    # ---- adapter state -----------------------------------------------------------------------

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def adapters_disabled(self) -> bool:
        return self._disabled

    def set_adapter(self, names: str | Sequence[str], inference_mode: bool = False) -> None:
        """Activate adapter(s) ``names``; like peft, they become trainable, the others frozen."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.lora_A]
        if unknown:
            raise ValueError(f"set_adapter: unknown adapter(s) {unknown}; have {list(self.lora_A)}")
        for name in self.lora_A:
            train = name in names and not inference_mode
            self.lora_A[name].weight.requires_grad_(train)
            self.lora_B[name].weight.requires_grad_(train)
        self._active = names
        self._sync_peft()

    def disable_adapters(self) -> _AdaptersDisabled:
        """Run the base layer only (unmerging first, as peft does) until ``enable_adapters()``;
        also a context manager: ``with layer.disable_adapters(): ...``."""
        self._disabled = True
        self._sync_peft()
        return _AdaptersDisabled(self)

    def enable_adapters(self, enabled: bool = True) -> None:
        """Turn the adapters back on (``enabled=False`` turns them off, as in peft)."""
        self._disabled = not enabled
        self._sync_peft()

    def _sync_peft(self) -> None:
        layer = self.__dict__.get("_peft_layer")
        if layer is not None:
            layer._active_adapter = list(self._active)
            layer._disable_adapters = self._disabled

    # ---- merging -----------------------------------------------------------------------------

    def _delta(self, name: str) -> torch.Tensor:
        """scaling * B @ A in float64, in the base weight's layout."""
        a = self.lora_A[name].weight.detach().to(torch.float64)
        b = self.lora_B[name].weight.detach().to(torch.float64)
        delta = (b @ a) * self.scaling[name]
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, adapter_names: Iterable[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weight. The sum is formed in
        float64 and rounded once, so the merged layer equals the unmerged one within rounding."""
        w = self.base_layer.weight
        for name in list(adapter_names) if adapter_names is not None else self._active:
            if name in self.merged_adapters or name not in self.lora_A:
                continue
            w.copy_((w.to(torch.float64) + self._delta(name)).to(w.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every merged adapter out of the base weight again (float64, rounded once)."""
        w = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            w.copy_((w.to(torch.float64) - self._delta(name)).to(w.dtype))

    # ---- forward -----------------------------------------------------------------------------

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self.base_layer.weight.dtype

    def forward(self, x: torch.Tensor, adapter_names: Sequence[str] | None = None) -> torch.Tensor:
        if self._disabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(x)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names)
        active = [n for n in self._active if n in self.lora_A]
        if self.merged or not active:
            return self.base_layer(x)
        dt = self._compute_dtype(x)
        weight = self.base_layer.weight.to(dt)
        bias = self.base_layer.bias
        bias = bias.to(dt) if bias is not None else None
        if len(active) == 1:
            name = active[0]
            lora_a = self.lora_A[name].weight.to(dt)
            lora_b = self.lora_B[name].weight.to(dt)
            scaling, p = self.scaling[name], self.lora_dropout_p[name]
        else:
            # Several active adapters are one adapter of the summed rank (scalings folded into
            # B); with dropout they share one mask, so they must share one dropout rate.
            ps = {self.lora_dropout_p[n] for n in active}
            if self.training and len(ps) > 1:
                raise NotImplementedError(
                    f"active adapters {active} have different dropout rates {sorted(ps)}; "
                    "dlcore applies one dropout mask to all active adapters"
                )
            lora_a = torch.cat([self.lora_A[n].weight.to(dt) for n in active])
            lora_b = torch.cat([self.lora_B[n].weight.to(dt) * self.scaling[n] for n in active], 1)
            scaling, p = 1.0, ps.pop()
        return lora_linear(
            x.to(dt), weight, bias, lora_a, lora_b, scaling, p, self.training, self.fan_in_fan_out
        )

    def _stacks(self, dt: torch.dtype):
        """(names, A (n, r_max, in), B (n, out, r_max), scalings): cached while the adapter
        weights are unchanged and no gradient is wanted through them."""
        names = list(self.lora_A)
        weights = [self.lora_A[n].weight for n in names] + [self.lora_B[n].weight for n in names]
        grad = torch.is_grad_enabled() and any(w.requires_grad for w in weights)
        key = (dt, tuple(names), tuple((id(w), w._version, w.data_ptr()) for w in weights))
        if not grad and self._stack_cache is not None and self._stack_cache[0] == key:
            return self._stack_cache[1]
        r_max = max(self.r[n] for n in names)

        def pad(w: torch.Tensor, dim: int) -> torch.Tensor:
            w = w.to(dt)
            extra = r_max - w.shape[dim]
            if not extra:
                return w
            return torch.nn.functional.pad(w, (0, extra) if dim == 1 else (0, 0, 0, extra))

        with torch.set_grad_enabled(grad):
            a = torch.stack([pad(self.lora_A[n].weight, 0) for n in names])
            # Stored (n, r_max, out) and handed over as the (n, out, r_max) view: the CPU path
            # then reads all adapters as one (n * r_max, out) matrix without a copy.
            b = torch.stack([pad(self.lora_B[n].weight, 1).t() for n in names]).transpose(1, 2)
        scal = [float(self.scaling[n]) for n in names]
        value = (names, a, b, scal)
        self._stack_cache = None if grad else (key, value)
        return value

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor:
        if len(adapter_names) != len(x):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call "
                "`unmerge()` first."
            )
        used = {n for n in adapter_names if n in self.lora_A}
        if self.training and any(self.lora_dropout_p[n] > 0 for n in used):
            raise NotImplementedError(
                "adapter_names with LoRA dropout in training mode: the multi-adapter kernel has "
                "no dropout; call eval() or use one adapter per batch"
            )
        if not used:
            return self.base_layer(x)
        dt = self._compute_dtype(x)
        names, a, b, scal = self._stacks(dt)
        pos = {n: i for i, n in enumerate(names)}
        # Unknown names run the base layer only, as in peft.
        per_sample = torch.tensor([pos.get(n, -1) for n in adapter_names], dtype=torch.int32)
        rows = per_sample.repeat_interleave(x[0].numel() // x.shape[-1] if x.dim() > 1 else 1)
        weight = self.base_layer.weight.to(dt)
        bias = self.base_layer.bias
        bias = bias.to(dt) if bias is not None else None
        indices = rows.to(x.device).reshape(x.shape[:-1])
        return lora_linear_multi(
            x.to(dt), weight, bias, a, b, scal, indices, self.fan_in_fan_out, check_indices=False
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"adapters={ {n: self.r[n] for n in self.lora_A} }, active={self._active}"
        )


def convert_peft_lora(model: nn.Module) -> list[str]:
    """Replace every peft ``lora.Linear`` inside ``model`` by a :class:`LoRALinear` in place;
    returns the qualified names replaced. ``restore_peft_lora`` undoes it."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is PeftLinear:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear.from_peft(module))
            replaced.append(name)
    return replaced


def restore_peft_lora(model: nn.Module) -> list[str]:
    """Put back the peft layers that ``convert_peft_lora`` (or ``LoRALinear.from_peft``)
    replaced, with their adapter state synced; returns the names restored."""
    restored = []
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear) and "_peft_layer" in module.__dict__:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.to_peft())
            restored.append(name)
    return restored
