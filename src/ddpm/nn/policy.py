"""The runtime policy: how a network runs on a device, as opposed to what it computes.

Seven choices, each ``"auto"`` (the rules below) or forced by the user:

* ``memory_format``: ``"channels_last"`` (NHWC) or ``"contiguous"`` (NCHW) for the 4-D weights, and
  so for the activations (:class:`ddpm.nn.UNet` follows the layout of its weights);
* ``amp``: the autocast dtype of the forward pass (``"none"``, ``"bf16"``, ``"fp16"``); weights,
  optimizer state and the diffusion maths stay float32;
* ``attention``: how the U-Net's attention blocks compute softmax(q k^T / sqrt(d)) v: ``"sdpa"``
  (PyTorch picks among its fused kernels), ``"flash"`` or ``"efficient"`` (that fused kernel only),
  or ``"matmul"`` (two batched matmuls around a softmax);
* ``upsample``: ``"subpixel"`` computes each upsampling conv as four 2x2 convs of the low-resolution
  input (2.25x fewer multiply-adds, same function), ``"nearest"`` upsamples and then convolves;
* ``fused_optimizer``: one fused AdamW kernel instead of per-tensor loops;
* ``compile``: ``torch.compile`` of the training forward; never automatic (see below);
* ``cuda_graphs``: for sampling, each network evaluation replayed from a captured CUDA graph
  (:class:`CudaGraphForward`); off under ``"auto"`` until ``benchmarks/gpu.py`` has measured it.

The ``"auto"`` rules (``benchmarks/results/policy-rules.md`` holds the measurement behind each):

* CUDA (:data:`CUDA_RULE`): NCHW, bf16 autocast where the GPU has bf16 (Ampere and later),
  PyTorch's fused attention kernels, the standard upsample (the sub-pixel form is not measured on
  GPUs yet; ``benchmarks/gpu.py`` measures both).
* CPUs: by the best instruction set present (:data:`CPU_RULES`); attention as explicit bf16
  matmuls under bf16 autocast, PyTorch's fused kernel in fp32.
* Other devices (MPS, ...): PyTorch's defaults, nothing measured.

Fused AdamW is used wherever PyTorch has the kernel for the device. ``torch.compile`` is off unless
asked for: on the CPU it gained nothing for its compile time, and on a GPU it must repay its
compile time within the first 1% of a default run (``benchmarks/gpu.py`` measures that) before it
may become a default.

:meth:`RuntimePolicy.record` is what the trainer writes into ``metrics.jsonl`` when a run starts or resumes;
:func:`describe_machine` is the one-line description printed beside every images/s figure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ddpm.choices import (
    AMPS,
    ATTENTIONS,
    MEMORY_FORMATS,
    TOGGLES,
    UPSAMPLES,
    Amp,
    Attention,
    MemoryFormat,
    Toggle,
    Upsample,
)
from ddpm.errors import ConfigError
from ddpm.nn.unet import AttentionBlock
from ddpm.nn.unet import Upsample as UpsampleBlock

__all__ = [
    "CPU_RULES",
    "CUDA_RULE",
    "CudaGraphForward",
    "Rule",
    "Machine",
    "PolicyForward",
    "RuntimePolicy",
    "describe_machine",
    "detect_machine",
    "resolve_policy",
]

ResolvedAmp = Literal["none", "bf16", "fp16"]
ResolvedFormat = Literal["channels_last", "contiguous"]
ResolvedAttention = Literal["sdpa", "flash", "efficient", "matmul"]
ResolvedUpsample = Literal["subpixel", "nearest"]

# CPU instruction sets that change which choice is fastest, most capable first.
CPU_FEATURES: tuple[str, ...] = ("amx_bf16", "avx512_bf16", "avx512_vnni", "avx512", "avx2")


@dataclass(frozen=True)
class Rule:
    """The automatic memory format, autocast dtype and upsampling of one kind of device, and why."""

    memory_format: ResolvedFormat
    amp: ResolvedAmp
    upsample: ResolvedUpsample
    evidence: str


# CPUs, by the best feature of CPU_FEATURES present. The attention rule is separate (see
# _auto_attention): on CPUs, explicit matmuls in bf16, PyTorch's fused kernel in fp32.
CPU_RULES: dict[str, Rule] = {
    "amx_bf16": Rule(
        "channels_last", "bf16", "subpixel",
        "Xeon with AMX (1 thread): NHWC and bf16 faster (benchmarks/results/policy-rules.md)",
    ),
    "avx512_bf16": Rule(
        "contiguous", "bf16", "subpixel", "AMD EPYC with AVX-512 BF16 (2 threads): benchmarks/results/speed.md",
    ),
    "avx512": Rule("contiguous", "none", "subpixel", "AVX-512 without BF16: bf16 would be emulated"),
    "avx2": Rule("contiguous", "none", "subpixel",
                 "2-core Zen 3 (AVX2): NHWC slower (benchmarks/results/policy-rules.md)"),
    "": Rule("contiguous", "none", "nearest", "no vector unit known to the policy: PyTorch's defaults"),
}
CUDA_RULE = Rule("contiguous", "bf16", "nearest",
                 "CUDA: NCHW, bf16 autocast (H200: benchmarks/results/policy-rules.md)")


@dataclass(frozen=True)
class Machine:
    """What the policy looks at: the device, its name and the features that change the rules.

    ``features`` are, on CPUs, those of :data:`CPU_FEATURES` present; on CUDA GPUs the compute
    capability (``"sm_90"``) and ``"bf16"`` where the GPU computes in bfloat16.
    """

    device: str  # "cpu", "cuda:0", "mps"
    name: str  # CPU model or GPU name
    features: tuple[str, ...] = ()
    threads: int = 1  # torch intra-op threads (CPU work)
    cap: str = ""  # instruction-set caps in force (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY), if any

    @property
    def type(self) -> str:
        return self.device.split(":")[0]

    @property
    def best_cpu_feature(self) -> str:
        return next((f for f in CPU_FEATURES if f in self.features), "")

    def describe(self) -> str:
        """E.g. ``"AMD EPYC (avx512_bf16, avx512_vnni, avx512, avx2; no AMX), 2 threads"``."""
        feats = ", ".join(self.features) or "no listed features"
        if self.type != "cpu":
            return f"{self.name} ({feats})"
        amx = "" if "amx_bf16" in self.features else "; no AMX"
        cap = f"; capped: {self.cap}" if self.cap else ""
        return f"{self.name} ({feats}{amx}{cap}), {self.threads} thread{'s' if self.threads != 1 else ''}"


def _cpu_flags() -> tuple[str, set[str]]:
    """(model name, instruction-set flags) of this CPU, from torch or else /proc/cpuinfo."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        caps = get_capabilities()
        flags = {k for k, v in caps.items() if v is True}
        if "avx512_f" in flags:
            flags.add("avx512")
        return str(caps.get("cpu_name") or platform.processor() or "unknown CPU"), flags
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    if "avx512f" in flags:
        flags.add("avx512")
    return name, flags


# What an instruction-set cap leaves usable: ONEDNN_MAX_CPU_ISA caps oneDNN (convolutions, matmuls),
# ATEN_CPU_CAPABILITY PyTorch's own kernels. A capped CPU is treated as the CPU it then emulates.
_ISA_CAPS: dict[str, tuple[str, ...]] = {
    "DEFAULT": (), "SSE41": (), "AVX": (), "AVX2": ("avx2",), "AVX2_VNNI": ("avx2",), "AVX2_VNNI_2": ("avx2",),
    "AVX512_CORE": ("avx512", "avx2"), "AVX512_CORE_VNNI": ("avx512_vnni", "avx512", "avx2"),
    "AVX512_CORE_BF16": ("avx512_bf16", "avx512_vnni", "avx512", "avx2"),
}


def _isa_caps() -> tuple[str, set[str] | None]:
    """(a note naming the caps in force, the features they leave; None: no cap)."""
    notes, allowed = [], None
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if onednn in _ISA_CAPS:
        notes.append(f"ONEDNN_MAX_CPU_ISA={onednn}")
        allowed = set(_ISA_CAPS[onednn])
    aten = torch.backends.cpu.get_cpu_capability().upper()
    if aten in ("DEFAULT", "AVX2", "NO AVX"):
        notes.append(f"PyTorch kernels {aten}")
        aten_allowed = set(_ISA_CAPS.get(aten, ()))
        allowed = aten_allowed if allowed is None else allowed & aten_allowed
    return ", ".join(notes), allowed


def detect_machine(device: torch.device | str = "cpu") -> Machine:
    """The :class:`Machine` of ``device`` on this host."""
    device = torch.device(device)
    threads = torch.get_num_threads()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        feats = (f"sm_{major}{minor}",) + (("bf16",) if torch.cuda.is_bf16_supported() else ())
        return Machine(f"cuda:{index}", torch.cuda.get_device_name(index), feats, threads)
    if device.type == "cpu":
        name, flags = _cpu_flags()
        cap, allowed = _isa_caps()
        feats = tuple(f for f in CPU_FEATURES if f in flags and (allowed is None or f in allowed))
        return Machine("cpu", name, feats, threads, cap=cap)
    return Machine(str(device), device.type, (), threads)


def describe_machine(device: torch.device | str = "cpu") -> str:
    """One line naming the machine, to print beside a speed: ``"AMD EPYC (avx512_bf16, ...), 2 threads"``."""
    return detect_machine(device).describe()


def _fused_adamw_devices() -> tuple[str, ...]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return tuple(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - older torch
        return ("cuda",)


@dataclass(frozen=True)
class RuntimePolicy:
    """The resolved choices for one device (see the module docstring); build with :func:`resolve_policy`."""

    machine: Machine
    memory_format: ResolvedFormat
    amp: ResolvedAmp
    attention: ResolvedAttention
    upsample: ResolvedUpsample
    fused_optimizer: bool
    compile: bool
    cuda_graphs: bool = False  # sampling: replay each network evaluation from a captured CUDA graph
    forced: tuple[str, ...] = ()  # the fields the user set; the others follow the rules
    evidence: str = ""  # the measurement behind the automatic choices

    @property
    def device(self) -> torch.device:
        return torch.device(self.machine.device)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.amp]

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device, in the policy's memory format and kernels (in place; returns it)."""
        fmt = torch.channels_last if self.memory_format == "channels_last" else torch.contiguous_format
        model.to(self.device, memory_format=fmt)  # type: ignore[call-overload]  # Module.to takes it; its stubs do not
        for m in model.modules():
            if isinstance(m, AttentionBlock):
                m.kernel = "matmul" if self.attention == "matmul" else "sdpa"
            elif isinstance(m, UpsampleBlock):
                m.subpixel = self.upsample == "subpixel"
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` itself, or a :class:`PolicyForward` when autocast or a fused attention kernel is set."""
        if self.amp == "none" and self.attention not in ("flash", "efficient"):
            return model
        return PolicyForward(model, self)

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        """Autocast and the choice of fused attention kernel, for the duration of a forward pass."""
        with contextlib.ExitStack() as stack:
            if self.autocast_dtype is not None:
                # No cache of cast weights: each weight is used once per forward, and CUDA graph
                # capture (CudaGraphForward) needs the casts inside the graph.
                stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False))
            if self.attention in ("flash", "efficient"):
                from torch.nn.attention import SDPBackend, sdpa_kernel

                kernel = SDPBackend.FLASH_ATTENTION if self.attention == "flash" else SDPBackend.EFFICIENT_ATTENTION
                stack.enter_context(sdpa_kernel([kernel]))
            yield

    def sampling_forward(self, model: Any) -> Any:
        """The network for sampling (put it in eval mode first): :meth:`wrap`, replayed from CUDA graphs when
        ``cuda_graphs`` is on. ``model`` may be any network callable, e.g. a guided one."""
        net = self.wrap(model)
        return CudaGraphForward(net) if self.cuda_graphs else net

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``torch.optim.AdamW``: ``{"fused": True}``, or ``{}`` for PyTorch's default."""
        return {"fused": True} if self.fused_optimizer else {}

    def record(self) -> dict[str, Any]:
        """JSON-ready: every choice, which of them the user forced, the machine and the evidence."""
        m = self.machine
        return {
            "device": m.device, "machine": m.name, "features": list(m.features), "threads": m.threads,
            "isa_cap": m.cap,
            "memory_format": self.memory_format, "amp": self.amp, "attention": self.attention,
            "upsample": self.upsample, "fused_optimizer": self.fused_optimizer, "compile": self.compile,
            "cuda_graphs": self.cuda_graphs,
            "forced": list(self.forced), "evidence": self.evidence, "torch": torch.__version__,
        }


class CudaGraphForward(nn.Module):
    """``model(x, t)`` for sampling, replayed from a captured CUDA graph: one launch per evaluation.

    The first call with a given input shape captures the forward into a graph with its own input
    and output buffers; every call copies ``x`` and ``t`` in, replays, and returns a copy of the
    output. For inference only (no autograd; the weights must not be replaced, only updated in
    place). Needs CUDA.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self._graphs: dict[tuple, tuple[Any, list[torch.Tensor], torch.Tensor]] = {}

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:  # the sampling driver finds the device
        params = getattr(self.model, "parameters", None)
        return params(recurse) if callable(params) else iter(())

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA tensor, got one on {x.device}")
        inputs = [x, t] if y is None else [x, t, y]
        key = tuple((tuple(a.shape), a.dtype) for a in inputs) + (x.device,)
        if key not in self._graphs:
            self._graphs[key] = self._capture([a.clone() for a in inputs])
        graph, static_inputs, static_out = self._graphs[key]
        for static, value in zip(static_inputs, inputs, strict=True):
            static.copy_(value)
        graph.replay()
        return static_out.clone()

    def _call(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return self.model(*inputs[:2]) if len(inputs) == 2 else self.model(*inputs[:2], y=inputs[2])

    def _capture(self, inputs: list[torch.Tensor]) -> tuple[Any, list[torch.Tensor], torch.Tensor]:
        device = inputs[0].device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the graph: kernels chosen, workspaces allocated
            for _ in range(3):
                self._call(inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._call(inputs)
        return graph, inputs, out


class PolicyForward(nn.Module):
    """Calls ``model`` under the policy's autocast and attention kernel; returns float32 outputs,
    so the diffusion maths around the network stay in float32."""

    def __init__(self, model: nn.Module, policy: RuntimePolicy) -> None:
        super().__init__()
        self.model, self.policy = model, policy

    def forward(self, x: torch.Tensor, t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with self.policy.forward_context():
            out = self.model(x, t, *args, **kwargs)
        return out.float() if self.policy.autocast_dtype is not None else out


def _check(name: str, value: object, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{name}={value!r} is not valid: expected one of {', '.join(map(repr, valid))}")


def _auto_rule(machine: Machine) -> Rule:
    """The automatic choices for ``machine``."""
    if machine.type == "cpu":
        return CPU_RULES[machine.best_cpu_feature]
    if machine.type == "cuda":
        return CUDA_RULE if "bf16" in machine.features else dataclasses.replace(CUDA_RULE, amp="none")
    return Rule("contiguous", "none", "nearest", f"{machine.type}: not measured, PyTorch's defaults")


def _auto_attention(machine: Machine, amp: ResolvedAmp) -> ResolvedAttention:
    """On CPUs PyTorch's fused attention computes bf16 in float32 (no faster than fp32), while bf16
    matmuls run at twice the fp32 rate (benchmarks/results/policy-rules.md). Elsewhere the fused kernels."""
    return "matmul" if machine.type == "cpu" and amp == "bf16" else "sdpa"


def resolve_policy(
    device: torch.device | str,
    *,
    memory_format: MemoryFormat = "auto",
    amp: Amp = "auto",
    attention: Attention = "auto",
    upsample: Upsample = "auto",
    fused_optimizer: Toggle = "auto",
    compile: bool = False,
    cuda_graphs: Toggle = "auto",
    model: nn.Module | None = None,
    machine: Machine | None = None,
    field_prefix: str = "",
) -> RuntimePolicy:
    """The policy for ``device``: each ``"auto"`` resolved by the rules of the module docstring.

    The rules were measured on convolutional networks: for a ``model`` without convolutions (the
    MLP of vector data, where bf16 was no faster on the CPU: benchmarks/results/policy-rules.md)
    ``amp="auto"`` means float32. ``machine`` replaces the detected one (tests; planning for
    another host). Raises
    :class:`~ddpm.errors.ConfigError`, naming the field as ``field_prefix + name``, for a value
    outside its choices and for fp16 autocast off CUDA (fp16 training needs the gradient scaler,
    which runs on GPUs only here).
    """
    chosen = {"memory_format": memory_format, "amp": amp, "attention": attention, "upsample": upsample,
              "fused_optimizer": fused_optimizer, "cuda_graphs": cuda_graphs}
    valid = (MEMORY_FORMATS, AMPS, ATTENTIONS, UPSAMPLES, TOGGLES, TOGGLES)
    for (name, value), options in zip(chosen.items(), valid, strict=True):
        _check(field_prefix + name, value, options)
    machine = machine or detect_machine(device)
    for name, needs_cuda in (("amp", amp == "fp16"), ("cuda_graphs", cuda_graphs == "on")):
        if needs_cuda and machine.type != "cuda":
            raise ConfigError(f"{field_prefix}{name}={chosen[name]!r} needs CUDA (the device is {machine.type})"
                              + ("; use 'bf16' or 'none'" if name == "amp" else ""))
    auto = _auto_rule(machine)
    if model is not None and not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        auto = dataclasses.replace(auto, amp="none", evidence=auto.evidence + "; no convolutions: float32")
    resolved_amp = auto.amp if amp == "auto" else amp
    fused = machine.type in _fused_adamw_devices() if fused_optimizer == "auto" else fused_optimizer == "on"
    forced = tuple(name for name, value in chosen.items() if value != "auto") + (("compile",) if compile else ())
    return RuntimePolicy(
        machine=machine,
        memory_format=auto.memory_format if memory_format == "auto" else memory_format,
        amp=resolved_amp,
        attention=_auto_attention(machine, resolved_amp) if attention == "auto" else attention,
        upsample=auto.upsample if upsample == "auto" else upsample,
        fused_optimizer=fused,
        compile=compile,
        cuda_graphs=cuda_graphs == "on",  # "auto": off until benchmarks/gpu.py shows it pays
        forced=forced,
        evidence=auto.evidence,
    )
