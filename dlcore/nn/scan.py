"""dlcore.nn.MambaMixer: the Mamba block on dlcore's selective scan, a drop-in for transformers'
``MambaMixer`` (same parameter names and shapes, same cache protocol), plus helpers that swap the
mixers of a transformers Mamba model in place and restore them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.scan import selective_scan, selective_state_update


def _mask_padding(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padded positions (as transformers does, see state-spaces/mamba#66)."""
    if attention_mask is None:
        return hidden_states
    return (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)


class MambaMixer(nn.Module):
    """in_proj -> depthwise causal conv1d -> x_proj -> dt_proj -> selective scan (gated by the
    second half of in_proj) -> out_proj, with ``transformers.MambaMixer``'s parameters
    (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``).

    ``forward(hidden_states, cache=None, attention_mask=None)`` takes (batch, L, hidden) and a
    transformers cache (conv state and ssm state per layer): prefill runs ``selective_scan`` and
    stores the last state; single-token decode runs ``selective_state_update`` in place.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        state_size: int = 16,
        conv_kernel: int = 4,
        time_step_rank: int | None = None,
        use_conv_bias: bool = True,
        use_bias: bool = False,
        activation: str = "silu",
        layer_idx: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.ssm_state_size = state_size
        self.conv_kernel_size = conv_kernel
        self.time_step_rank = time_step_rank or -(-hidden_size // 16)
        self.use_conv_bias = use_conv_bias
        self.use_bias = use_bias
        self.layer_idx = layer_idx
        self.activation = activation
        self.conv1d = nn.Conv1d(
            intermediate_size, intermediate_size, conv_kernel, groups=intermediate_size,
            padding=conv_kernel - 1, bias=use_conv_bias, **kw,
        )  # fmt: skip
        self.act = _activation(activation)
        self.in_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=use_bias, **kw)
        self.x_proj = nn.Linear(intermediate_size, self.time_step_rank + 2 * state_size,
                                bias=False, **kw)  # fmt: skip
        self.dt_proj = nn.Linear(self.time_step_rank, intermediate_size, bias=True, **kw)
        A = torch.arange(1, state_size + 1, dtype=torch.float32, device=device)
        self.A_log = nn.Parameter(torch.log(A).expand(intermediate_size, -1).contiguous())
        self.D = nn.Parameter(torch.ones(intermediate_size, device=device))
        self.out_proj = nn.Linear(intermediate_size, hidden_size, bias=use_bias, **kw)

    @classmethod
    def from_hf(cls, mixer: nn.Module) -> MambaMixer:
        """Wrap a ``transformers`` MambaMixer, sharing its parameters (no copy): training,
        tied weights and state dicts keep working on the same tensors."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        for attr in ("hidden_size", "intermediate_size", "ssm_state_size", "conv_kernel_size",
                     "time_step_rank", "use_conv_bias", "use_bias", "layer_idx"):  # fmt: skip
            setattr(self, attr, getattr(mixer, attr))
        self.activation = mixer.activation
        for name in ("conv1d", "act", "in_proj", "x_proj", "dt_proj", "out_proj"):
            setattr(self, name, getattr(mixer, name))
        self.A_log = mixer.A_log
        self.D = mixer.D
        if hasattr(mixer, "config"):
            self.config = mixer.config
        return self

    def _conv_prefill(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1]
        out = self.conv1d(x.to(self.conv1d.weight.dtype))[..., :length]
        return self.act(out).to(x.dtype)

    def _conv_step(self, x: torch.Tensor, conv_state: torch.Tensor) -> torch.Tensor:
        """One token through the causal conv, shifting the cached window in place."""
        window = torch.cat([conv_state, x], dim=-1).to(self.conv1d.weight.dtype)
        conv_state.copy_(window[..., -conv_state.shape[-1] :])
        out = F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.intermediate_size)
        return self.act(out[..., -x.shape[-1] :]).to(x.dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        length = hidden_states.shape[1]
        dtype = hidden_states.dtype
        conv_state = recurrent_state = None
        if cache is not None:
            conv_state = cache.get_conv_state(self.layer_idx, state_idx=0)
            recurrent_state = cache.get_recurrent_state(self.layer_idx, state_idx=0)

        hidden_states = _mask_padding(hidden_states, attention_mask)
        x, gate = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)
        A = -torch.exp(self.A_log.float())

        decode = conv_state is not None and length == 1
        if decode and not cache.is_recording_past(self.layer_idx):
            x = self._conv_step(x, conv_state)
        else:
            if cache is not None:
                x = cache.update_conv_state(
                    x, self.layer_idx, conv_kernel_size=self.conv_kernel_size
                )
            x = self._conv_prefill(x)
            if cache is not None:
                x = x[..., -length:]

        x = _mask_padding(x.transpose(1, 2), attention_mask)
        time_step, B, C = torch.split(
            self.x_proj(x), [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1
        )
        delta = self.dt_proj.weight @ time_step.transpose(1, 2)
        delta_bias = self.dt_proj.bias.float() if self.dt_proj.bias is not None else None

        if recurrent_state is not None and length == 1:
            y = selective_state_update(
                recurrent_state, x[:, 0], delta[..., 0], A, B[:, 0], C[:, 0], self.D.float(),
                z=gate[..., 0], dt_bias=delta_bias, dt_softplus=True,
            ).unsqueeze(-1)  # fmt: skip
        else:
            result = selective_scan(
                x.transpose(1, 2), delta, A, B.transpose(1, 2), C.transpose(1, 2),
                D=self.D.float(), z=gate, delta_bias=delta_bias, delta_softplus=True,
                return_last_state=cache is not None,
            )  # fmt: skip
            if cache is not None:
                y, last_state = result
                cache.update_recurrent_state(last_state, self.layer_idx)
            else:
                y = result
        return self.out_proj(y.transpose(1, 2).to(dtype))


def _activation(name: str) -> nn.Module:
    acts = {"silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU}
    if name not in acts:
        raise ValueError(
            f"MambaMixer: unsupported activation {name!r}; expected one of {list(acts)}"
        )
    return acts[name]()


def _is_hf_mixer(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "MambaMixer" and cls.__module__.startswith("transformers.")


def replace_mamba_mixers(model: nn.Module) -> dict[str, nn.Module]:
    """Swap every transformers ``MambaMixer`` inside ``model`` for ``dlcore.nn.MambaMixer``
    (sharing parameters), in place. Returns the replaced modules by qualified name, for
    ``restore_mamba_mixers``."""
    replaced = {}
    for name, module in list(model.named_modules()):
        if _is_hf_mixer(module):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, MambaMixer.from_hf(module))
            replaced[name] = module
    return replaced


def restore_mamba_mixers(model: nn.Module, replaced: dict[str, nn.Module]) -> None:
    """Put back the modules that ``replace_mamba_mixers`` returned."""
    for name, module in replaced.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module)
