"""``dlcore.patch(model)``: swap every supported module of a model for its dlcore version.

Covered (``families=`` picks a subset):

- ``"attention"``: ``torch.nn.MultiheadAttention`` -> ``dlcore.nn.MultiheadAttention``;
  transformers models switch to the ``"dlcore"`` attention function through
  ``set_attn_implementation`` (every model that supports ``attn_implementation``); diffusers
  ``Attention`` modules (self and cross attention) get the dlcore attention processor.
- ``"scan"``: transformers ``MambaMixer`` -> ``dlcore.nn.MambaMixer``.
- ``"lora"``: peft LoRA ``Linear`` -> ``dlcore.nn.LoRALinear``.
- ``"sampler"``: a diffusers pipeline's ``DDIMScheduler`` / ``DDPMScheduler`` -> the dlcore ones.

Everything is done in place and recorded on the model, so ``dlcore.unpatch(model)`` puts back
the original objects (holding the parameters the patched modules trained). Patching twice is
harmless: dlcore modules are left alone. State-dict keys do not change. What could not be
patched (a family that is not available, an unsupported configuration, dtype or device) is
listed in the returned :class:`PatchReport` with the reason.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .backends import _check_name, _forced, _runs_on, backend, backends

FAMILIES = ("attention", "sampler", "scan", "lora")
_STATE_ATTR = "_dlcore_patch_state"
# Exceptions a family's ``from_*`` constructor raises for a configuration it does not support.
_UNSUPPORTED = (ValueError, NotImplementedError, TypeError)


@dataclass(frozen=True)
class PatchEntry:
    family: str
    name: str  # where in the model ("" is the model itself)
    target: str  # what was found there
    replacement: str = ""  # what it became (replaced entries)
    reason: str = ""  # why it was left alone (skipped entries)

    def __str__(self) -> str:
        where = self.name or "<root>"
        if self.replacement:
            return f"[{self.family}] {where}: {self.target} -> {self.replacement}"
        return f"[{self.family}] {where}: {self.target} skipped ({self.reason})"


@dataclass
class PatchReport:
    """What one ``dlcore.patch`` call replaced and what it skipped, with reasons."""

    replaced: list[PatchEntry] = field(default_factory=list)
    skipped: list[PatchEntry] = field(default_factory=list)
    backend: str | None = None

    def counts(self) -> dict[str, int]:
        """Number of replacements per family."""
        out: dict[str, int] = {}
        for e in self.replaced:
            out[e.family] = out.get(e.family, 0) + 1
        return out

    def __str__(self) -> str:
        pinned = f", backend pinned to {self.backend!r}" if self.backend else ""
        lines = [
            f"dlcore.patch: {len(self.replaced)} replaced, {len(self.skipped)} skipped{pinned}"
        ]
        lines += [f"  {e}" for e in self.replaced + self.skipped]
        return "\n".join(lines)


@dataclass
class _Undo:
    entry: PatchEntry
    restore: Callable[[], None]
    pin_target: Any = None  # the object whose calls run under the pinned backend


@dataclass
class _PatchState:
    undo: list[_Undo] = field(default_factory=list)
    pins: list[Any] = field(default_factory=list)  # hook handles / restore closures of the pin
    backend: str | None = None


def _qualname(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _dlcore_attr(module: str, name: str) -> tuple[Any, str]:
    """(``dlcore.<module>.<name>``, "") or (None, why it is not available)."""
    try:
        mod = importlib.import_module(f"dlcore.{module}")
    except ImportError as exc:
        return None, f"dlcore.{module} does not import ({exc})"
    obj = getattr(mod, name, None)
    if obj is None:
        return None, f"dlcore.{module}.{name} is not available in this dlcore build"
    return obj, ""


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _why_not(backend: str | None, module: nn.Module) -> str:
    """Why this module's tensors cannot run on dlcore (pinned backend, dtype); "" if they can."""
    t = next(module.parameters(), None)
    if t is None:
        return ""
    if t.dtype not in _DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in _DTYPES)
        return f"dtype: parameters are {str(t.dtype).removeprefix('torch.')}, dlcore takes {names}"
    why = _runs_on(backend, t.device) if backend is not None else None
    return f"device: backend {backend!r} cannot run {t.device.type} tensors ({why})" if why else ""


class _Patcher:
    def __init__(self, root: Any, families: tuple[str, ...], backend: str | None):
        self.root = root
        self.families = families
        self.backend = backend
        self.report = PatchReport(backend=backend)
        state = getattr(root, _STATE_ATTR, None)
        if state is None:
            state = _PatchState()
            object.__setattr__(root, _STATE_ATTR, state)
        self.state = state

    # -- bookkeeping -------------------------------------------------------------------------
    def replaced(self, entry: PatchEntry, restore: Callable[[], None], pin_target: Any) -> None:
        self.report.replaced.append(entry)
        self.state.undo.append(_Undo(entry, restore, pin_target))

    def skip(self, family: str, name: str, target: Any, reason: str) -> None:
        self.report.skipped.append(PatchEntry(family, name, _qualname(target), reason=reason))

    # -- module swaps ------------------------------------------------------------------------
    def swap(
        self,
        family: str,
        modules: dict[str, nn.Module],
        name: str,
        module: nn.Module,
        build: Callable[[nn.Module], nn.Module],
        full: str,
    ) -> bool:
        why = _why_not(self.backend, module)
        if why:
            self.skip(family, full, module, why)
            return False
        try:
            new = build(module)
        except _UNSUPPORTED as exc:
            self.skip(family, full, module, f"unsupported: {exc}")
            return False
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name]
        setattr(parent, attr, new)

        def restore(parent=parent, attr=attr, old=module, new=new) -> None:
            # The original takes the patched module's tensors, so training done while patched
            # (and any .to()) carries over; state-dict keys are the same by construction.
            old.load_state_dict(new.state_dict(), assign=True)
            if hasattr(new, "to_peft"):
                new.to_peft()  # syncs the active/disabled adapter state back into peft's layer
            setattr(parent, attr, old)

        entry = PatchEntry(family, full, _qualname(module), _qualname(new))
        self.replaced(entry, restore, new)
        return True

    def walk_modules(self, model: nn.Module, prefix: str) -> None:
        modules = {"": model} | {n: m for n, m in model.named_modules() if n}
        rules = self.module_rules()
        swapped: list[str] = []
        for name, module in list(modules.items()):
            if not name or any(name.startswith(s + ".") for s in swapped):
                continue
            for family, match, build in rules:
                if family in self.families and match(module):
                    full = f"{prefix}{name}"
                    if build is None:
                        break
                    if isinstance(build, str):
                        self.skip(family, full, module, build)
                    elif self.swap(family, modules, name, module, build, full):
                        swapped.append(name)
                    break
        if "attention" in self.families:
            self.transformers_attention(model, prefix)
            self.diffusers_processors(model, prefix)

    def module_rules(self) -> list[tuple[str, Callable[[nn.Module], bool], Any]]:
        """(family, matches(module), build(module) | reason-string | None=already dlcore)."""
        rules: list[tuple[str, Callable[[nn.Module], bool], Any]] = []

        mha, why = _dlcore_attr("nn", "MultiheadAttention")
        if mha is not None:
            rules.append(("attention", lambda m: isinstance(m, mha), None))
        rules.append(
            (
                "attention",
                lambda m: type(m) is nn.MultiheadAttention,
                mha.from_torch if mha is not None else why,
            )
        )

        mixer, why = _dlcore_attr("nn", "MambaMixer")
        mamba = _optional("transformers.models.mamba.modeling_mamba")
        if mamba is not None:
            if mixer is not None:
                rules.append(("scan", lambda m: isinstance(m, mixer), None))
            rules.append(
                (
                    "scan",
                    lambda m: type(m) is mamba.MambaMixer,
                    mixer.from_hf if mixer is not None else why,
                )
            )

        lora, why = _dlcore_attr("nn", "LoRALinear")
        peft_lora = _optional("peft.tuners.lora.layer")
        if peft_lora is not None:
            if lora is not None:
                rules.append(("lora", lambda m: isinstance(m, lora), None))
            rules.append(
                (
                    "lora",
                    lambda m: type(m) is peft_lora.Linear,
                    lora.from_peft if lora is not None else why,
                )
            )
            # Other peft LoRA layer types (Embedding, Conv, quantised Linear) stay peft's.
            rules.append(
                (
                    "lora",
                    lambda m: isinstance(m, peft_lora.LoraLayer),
                    "only peft lora.Linear layers have a dlcore version",
                )
            )
        return rules

    # -- transformers attention registry ------------------------------------------------------
    def transformers_attention(self, model: nn.Module, prefix: str) -> None:
        tf = _optional("transformers")
        if tf is None:
            return
        seen: set[int] = set()
        for name, module in model.named_modules():
            if not isinstance(module, tf.PreTrainedModel) or id(module.config) in seen:
                continue
            seen.add(id(module.config))
            full = f"{prefix}{name}"
            target = f"{_qualname(module)} attn_implementation"
            current = module.config._attn_implementation
            if current == "dlcore":
                continue
            functions = tf.AttentionInterface._global_mapping
            if "dlcore" not in functions:
                _, why = _dlcore_attr("nn", "attention")
                reason = why or "the 'dlcore' transformers attention function is not registered"
                self.report.skipped.append(PatchEntry("attention", full, target, reason=reason))
                continue
            if not (
                getattr(module, "_supports_attention_backend", False)
                and module._can_set_attn_implementation()
            ):
                reason = (
                    f"{type(module).__name__} does not dispatch attention through "
                    "transformers' AttentionInterface"
                )
                self.report.skipped.append(PatchEntry("attention", full, target, reason=reason))
                continue
            why = _why_not(self.backend, module)
            if why:
                self.report.skipped.append(PatchEntry("attention", full, target, reason=why))
                continue
            try:
                module.set_attn_implementation("dlcore")
            except _UNSUPPORTED as exc:
                reason = f"unsupported: {exc}"
                self.report.skipped.append(PatchEntry("attention", full, target, reason=reason))
                continue

            def restore(module=module, previous=current) -> None:
                module.set_attn_implementation(previous)

            entry = PatchEntry("attention", full, target, f"{current!r} -> 'dlcore'")
            self.replaced(entry, restore, module)

    # -- diffusers attention processors ------------------------------------------------------
    def diffusers_processors(self, model: nn.Module, prefix: str) -> None:
        if _optional("diffusers") is None:
            return
        processor_cls, why = _dlcore_attr("nn", "AttnProcessor")
        for name, module in model.named_modules():
            if not (
                callable(getattr(module, "set_processor", None)) and hasattr(module, "processor")
            ):
                continue
            full = f"{prefix}{name}"
            old = module.processor
            if processor_cls is not None and isinstance(old, processor_cls):
                continue
            if processor_cls is None:
                self.skip("attention", full, old, why)
                continue
            reason = _why_not(self.backend, module)
            if not reason:
                try:
                    new = processor_cls.for_attention(module, old)
                except _UNSUPPORTED as exc:
                    reason = f"unsupported: {exc}"
            if reason:
                self.skip("attention", full, old, reason)
                continue
            module.set_processor(new)

            def restore(module=module, old=old) -> None:
                module.set_processor(old)

            entry = PatchEntry("attention", full, _qualname(old), _qualname(new))
            self.replaced(entry, restore, module)

    # -- diffusers schedulers ----------------------------------------------------------------
    def pipeline_schedulers(self, pipe: Any) -> None:
        for attr, sched in list(getattr(pipe, "components", {}).items()):
            cls_name = type(sched).__name__
            is_diffusers = type(sched).__module__.startswith("diffusers.")
            if not (is_diffusers and cls_name in ("DDIMScheduler", "DDPMScheduler")):
                continue
            dl_cls, why = _dlcore_attr("schedulers", cls_name)
            if dl_cls is None:
                self.skip("sampler", attr, sched, why)
                continue
            try:
                new = dl_cls.from_config(sched.config)
            except _UNSUPPORTED as exc:
                self.skip("sampler", attr, sched, f"unsupported: {exc}")
                continue
            setattr(pipe, attr, new)

            def restore(pipe=pipe, attr=attr, old=sched) -> None:
                setattr(pipe, attr, old)

            self.replaced(
                PatchEntry("sampler", attr, _qualname(sched), _qualname(new)), restore, new
            )

    # -- backend pin -------------------------------------------------------------------------
    def pin(self) -> None:
        """Run every patched object's calls under ``dlcore.backend(self.backend)``."""
        for unpin in self.state.pins:
            unpin()
        self.state.pins.clear()
        self.state.backend = self.backend
        if self.backend is None:
            return
        targets = {id(u.pin_target): u.pin_target for u in self.state.undo}
        for target in targets.values():
            self.state.pins.append(_pin(target, self.backend))


def _pin(target: Any, name: str) -> Callable[[], None]:
    """Make ``target``'s forward (module) or ``step`` (scheduler) run under backend ``name``.

    The backend choice is a context variable read when a dlcore op runs; Dynamo cannot trace
    setting it, so inside ``torch.compile`` the hooks do nothing and the compiled model is to be
    called inside ``dlcore.backend(name)`` (the ops still read it at run time).
    """
    if isinstance(target, nn.Module):
        tokens: list[Any] = []

        def enter(module: nn.Module, args: Any) -> None:
            if not torch.compiler.is_compiling():
                tokens.append(_forced.set(name))

        def leave(module: nn.Module, args: Any, output: Any) -> None:
            if not torch.compiler.is_compiling() and tokens:
                _forced.reset(tokens.pop())

        handles = [
            target.register_forward_pre_hook(enter),
            target.register_forward_hook(leave, always_call=True),
        ]

        def unpin_module() -> None:
            for h in handles:
                h.remove()

        return unpin_module

    step = target.step

    def pinned_step(*args: Any, **kwargs: Any) -> Any:
        with backend(name):
            return step(*args, **kwargs)

    target.step = pinned_step

    def unpin_step() -> None:
        del target.step  # the class's step shows through again

    return unpin_step


def _check_families(families: str | Iterable[str] | None) -> tuple[str, ...]:
    if families is None:
        return FAMILIES
    if isinstance(families, str):
        families = (families,)
    families = tuple(families)
    for f in families:
        if f not in FAMILIES:
            raise ValueError(f"families: unknown family {f!r}; expected some of {FAMILIES}")
    return families


def patch(
    model: Any,
    families: str | Iterable[str] | None = None,
    backend: str | None = None,
) -> PatchReport:
    """Replace, in place, every module of ``model`` that dlcore accelerates; returns a report.

    ``model`` is an ``nn.Module`` (a transformers, peft or plain torch model) or a diffusers
    pipeline (its module components are walked and its DDIM/DDPM scheduler is swapped).
    ``families`` restricts the swap to some of ``"attention", "sampler", "scan", "lora"``.
    ``backend`` pins a dlcore backend (``"cpu"``, ``"triton"``, ``"cuda"``, ``"eager"``) for the
    patched modules: their calls run as inside ``dlcore.backend(backend)``; modules on a device
    that backend cannot run are skipped with the reason. Under ``torch.compile`` call the
    compiled model inside ``dlcore.backend(backend)`` instead (Dynamo cannot trace the pin).
    Calling ``patch`` again is harmless; ``dlcore.unpatch(model)`` undoes every call.
    """
    families = _check_families(families)
    if backend is not None:
        _check_name(backend, "dlcore.patch(backend=)")
        status = backends()[backend]
        if not status.available:
            raise RuntimeError(
                f"dlcore.patch: backend {backend!r} cannot run here: {status.detail}"
            )
    if isinstance(model, nn.Module):
        patcher = _Patcher(model, families, backend)
        patcher.walk_modules(model, "")
    elif hasattr(model, "components") and isinstance(model.components, dict):
        patcher = _Patcher(model, families, backend)
        for attr, component in model.components.items():
            if isinstance(component, nn.Module):
                patcher.walk_modules(component, f"{attr}.")
        if "sampler" in families:
            patcher.pipeline_schedulers(model)
    else:
        raise TypeError(
            f"model: expected a torch.nn.Module or a diffusers pipeline, got {_qualname(model)}"
        )
    patcher.pin()
    return patcher.report


def unpatch(model: Any) -> list[PatchEntry]:
    """Undo every ``dlcore.patch`` of ``model``; returns the entries that were undone."""
    state: _PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        return []
    for unpin in state.pins:
        unpin()
    undone = []
    while state.undo:
        u = state.undo.pop()
        u.restore()
        undone.append(u.entry)
    object.__delattr__(model, _STATE_ATTR)
    return undone
