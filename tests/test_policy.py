"""The runtime policy: rules per device, overrides, what it does to a model, and what a run records."""

import json
from pathlib import Path

import pytest
import torch

from ddpm.config import RunConfig, apply_overrides
from ddpm.errors import ConfigError
from ddpm.nn import UNet, UNetConfig
from ddpm.nn.policy import (
    CPU_FEATURES,
    CPU_RULES,
    CudaGraphForward,
    Machine,
    PolicyForward,
    describe_machine,
    detect_machine,
    resolve_policy,
)
from ddpm.nn.unet import AttentionBlock, Upsample
from ddpm.processes import GaussianDiffusion
from ddpm.schedules import make_betas
from ddpm.train.trainer import Trainer

from .test_cli import TINY as TINY_CLI
from .test_cli import write_folder
from .test_train import T, TinyImages, make_config

TINY = UNetConfig(
    in_channels=3, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
    attention_resolutions=(4,), image_size=8, num_groups=4, dropout=0.0,
)
XEON_AMX = Machine("cpu", "Xeon", ("amx_bf16", "avx512_bf16", "avx512", "avx2"), 1)
EPYC_ZEN4 = Machine("cpu", "AMD EPYC", ("avx512_bf16", "avx512_vnni", "avx512", "avx2"), 2)
EPYC_ZEN3 = Machine("cpu", "AMD EPYC", ("avx2",), 2)
H200 = Machine("cuda:0", "NVIDIA H200", ("sm_90", "bf16"), 16)
V100 = Machine("cuda:0", "Tesla V100", ("sm_70",), 8)


def random_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    model = UNet(TINY)
    with torch.no_grad():  # the zero-initialised layers too, so every path shows in the output
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.1)
    return model


# ------------------------------------------------------------------------------------- rules
@pytest.mark.parametrize(
    ("machine", "memory_format", "amp", "attention", "upsample"),
    [
        (XEON_AMX, "channels_last", "bf16", "matmul", "subpixel"),
        (EPYC_ZEN4, CPU_RULES["avx512_bf16"].memory_format, "bf16", "matmul", "subpixel"),
        (EPYC_ZEN3, "contiguous", "none", "sdpa", "subpixel"),
        (Machine("cpu", "old", (), 1), "contiguous", "none", "sdpa", "nearest"),
        (H200, "contiguous", "bf16", "sdpa", "nearest"),
        (V100, "contiguous", "none", "sdpa", "nearest"),
        (Machine("mps", "mps"), "contiguous", "none", "sdpa", "nearest"),
    ],
)
def test_automatic_choices_follow_the_device_rules(machine, memory_format, amp, attention, upsample):
    policy = resolve_policy(machine.device, machine=machine)
    assert (policy.memory_format, policy.amp, policy.attention, policy.upsample) == (
        memory_format, amp, attention, upsample)
    assert policy.forced == () and not policy.compile and policy.evidence
    assert policy.fused_optimizer == (machine.type in ("cpu", "cuda", "mps"))


def test_bf16_matmul_attention_only_comes_with_bf16():
    """Forcing fp32 on a bf16 CPU falls back to the fused attention kernel the rule measured for fp32."""
    policy = resolve_policy("cpu", amp="none", machine=EPYC_ZEN4)
    assert policy.amp == "none" and policy.attention == "sdpa" and policy.forced == ("amp",)


def test_networks_without_convolutions_stay_float32():
    mlp = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.SiLU(), torch.nn.Linear(8, 2))
    assert resolve_policy("cpu", model=mlp, machine=EPYC_ZEN4).amp == "none"
    assert resolve_policy("cpu", model=UNet(TINY), machine=EPYC_ZEN4).amp == "bf16"
    assert resolve_policy("cpu", amp="bf16", model=mlp, machine=EPYC_ZEN4).amp == "bf16"  # forced wins


def test_every_choice_can_be_forced_and_is_listed():
    policy = resolve_policy(
        "cpu", memory_format="channels_last", amp="none", attention="matmul", upsample="nearest",
        fused_optimizer="off", compile=True, machine=EPYC_ZEN3,
    )
    assert (policy.memory_format, policy.amp, policy.attention, policy.upsample) == (
        "channels_last", "none", "matmul", "nearest")
    assert not policy.fused_optimizer and policy.compile
    assert set(policy.forced) == {"memory_format", "amp", "attention", "upsample", "fused_optimizer", "compile"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"memory_format": "nhwc"}, r"train\.memory_format='nhwc' is not valid: expected one of 'auto', "),
        ({"amp": "fp8"}, r"train\.amp='fp8' is not valid"),
        ({"attention": "fast"}, r"train\.attention='fast' is not valid: .*'matmul'"),
        ({"upsample": "bilinear"}, r"train\.upsample='bilinear'"),
        ({"fused_optimizer": "yes"}, r"train\.fused_optimizer='yes' is not valid: .*'on', 'off'"),
        ({"amp": "fp16"}, r"train\.amp='fp16' needs CUDA \(the device is cpu\)"),
    ],
)
def test_bad_choices_name_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        resolve_policy("cpu", machine=EPYC_ZEN4, field_prefix="train.", **kwargs)


def test_config_fields_accept_the_choices_and_refuse_others():
    cfg = apply_overrides(RunConfig(), {"train.memory_format": "channels_last", "train.fused_optimizer": "off",
                                        "train.attention": "matmul", "train.upsample": "nearest"})
    assert cfg.train.memory_format == "channels_last" and cfg.train.fused_optimizer == "off"
    assert RunConfig().train.amp == "auto"  # the policy decides unless the user does
    with pytest.raises(ConfigError, match=r"train\.memory_format='nhwc' is not valid"):
        apply_overrides(RunConfig(), {"train.memory_format": "nhwc"})


# ----------------------------------------------------------------------------- on a model
def test_prepare_sets_layout_and_kernels_without_changing_the_function():
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([1, 50, 300, 999])
    with torch.no_grad():
        ref = random_unet()(x, t)
    policy = resolve_policy("cpu", memory_format="channels_last", amp="none", attention="matmul",
                            upsample="subpixel", machine=EPYC_ZEN4)
    model = policy.prepare(random_unet())
    assert model.memory_format() == torch.channels_last
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(m.kernel == "matmul" for m in model.modules() if isinstance(m, AttentionBlock))
    assert all(m.subpixel for m in model.modules() if isinstance(m, Upsample))
    assert policy.wrap(model) is model  # fp32 and PyTorch's attention dispatch: nothing to wrap
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), ref, rtol=1e-5, atol=1e-5)


def test_bf16_wrapper_returns_float32_close_to_the_fp32_network():
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([1, 50, 300, 999])
    with torch.no_grad():
        ref = random_unet()(x, t)
    policy = resolve_policy("cpu", amp="bf16", machine=EPYC_ZEN4)
    net = policy.wrap(policy.prepare(random_unet()))
    assert isinstance(net, PolicyForward)
    with torch.no_grad():
        out = net(x, t)
    assert out.dtype == torch.float32 and all(p.dtype == torch.float32 for p in net.parameters())
    err = (out - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.05  # bf16 keeps 8 bits of mantissa: close, but not the fp32 result


def test_forced_sdpa_kernel_is_used():
    """attention='efficient' has no CPU kernel: the error shows the choice reaches PyTorch's dispatcher."""
    policy = resolve_policy("cpu", amp="none", attention="efficient", machine=EPYC_ZEN4)
    net = policy.wrap(policy.prepare(random_unet()))
    with pytest.raises(RuntimeError, match="No available kernel|No viable backend"):
        net(torch.randn(1, 3, 8, 8), torch.tensor([3]))


# --------------------------------------------------------------------------------- machine
def test_detected_cpu_matches_proc_cpuinfo(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    machine = detect_machine("cpu")
    assert machine.type == "cpu" and machine.name and machine.threads == torch.get_num_threads()
    assert set(machine.features) <= set(CPU_FEATURES)
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    expected = {"amx_bf16": "amx_bf16", "avx512_bf16": "avx512_bf16", "avx512_vnni": "avx512_vnni",
                "avx512": "avx512f", "avx2": "avx2"}
    assert set(machine.features) == {ours for ours, linux in expected.items() if linux in flags}


def test_an_isa_cap_makes_the_cpu_the_one_it_emulates(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    machine = detect_machine("cpu")
    assert set(machine.features) <= {"avx2"} and "ONEDNN_MAX_CPU_ISA=AVX2" in machine.cap
    assert "capped: ONEDNN_MAX_CPU_ISA=AVX2" in machine.describe()
    assert resolve_policy("cpu").amp == "none"  # no native bf16 left


def test_describe_machine_names_model_features_and_threads():
    text = describe_machine("cpu")
    assert text.startswith(detect_machine("cpu").name) and "thread" in text
    assert EPYC_ZEN4.describe() == "AMD EPYC (avx512_bf16, avx512_vnni, avx512, avx2; no AMX), 2 threads"
    assert H200.describe() == "NVIDIA H200 (sm_90, bf16)"


def test_record_is_json_and_complete():
    record = resolve_policy("cpu", memory_format="contiguous", machine=EPYC_ZEN4).record()
    assert json.loads(json.dumps(record)) == record
    assert record["machine"] == "AMD EPYC" and record["forced"] == ["memory_format"]
    for key in ("memory_format", "amp", "attention", "upsample", "fused_optimizer", "compile", "features", "threads"):
        assert key in record


# ------------------------------------------------------------------------------- in a run
def run_trainer(tmp_path: Path, **overrides: object) -> tuple[Trainer, list[dict]]:
    cfg = make_config(tmp_path, **{"train.steps": 2, "optim.grad_accum": 1, **overrides})
    torch.manual_seed(0)
    trainer = Trainer(cfg, UNet(TINY), GaussianDiffusion(make_betas("linear", T)), TinyImages(n=8, shape=(3, 8, 8)))
    trainer.run()
    return trainer, [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_trainer_applies_forced_choices_and_records_them(tmp_path):
    trainer, lines = run_trainer(tmp_path, **{"train.memory_format": "channels_last", "train.amp": "bf16",
                                              "train.fused_optimizer": "off", "train.upsample": "nearest"})
    runtime = lines[0]["runtime"]  # the first line says how the run computes
    assert lines[0]["step"] == 0 and all("runtime" not in x for x in lines[1:])
    assert (runtime["memory_format"], runtime["amp"], runtime["fused_optimizer"], runtime["upsample"]) == (
        "channels_last", "bf16", False, "nearest")
    assert set(runtime["forced"]) == {"memory_format", "amp", "fused_optimizer", "upsample"}
    assert runtime["machine"] == detect_machine("cpu").name
    assert trainer.model.memory_format() == torch.channels_last
    assert trainer.ema.module.memory_format() == torch.channels_last
    assert not trainer.optimizer.defaults["fused"]
    assert isinstance(trainer.forward_model, PolicyForward)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 master weights


def test_trainer_default_is_the_device_rule(tmp_path):
    _, lines = run_trainer(tmp_path, **{"train.amp": "auto"})
    expected = resolve_policy("cpu", model=UNet(TINY)).record()
    assert lines[0]["runtime"] == expected and expected["forced"] == []


def test_fit_records_the_device_rule_and_the_pipeline_samples_with_it(tmp_path):
    import ddpm

    data = write_folder(tmp_path / "data")
    cfg = apply_overrides(RunConfig(), {
        "data.dataset": str(data), "diffusion.timesteps": 50, "train.steps": 2, "train.batch_size": 4,
        "train.device": "cpu", "train.out_dir": str(tmp_path / "run"), "train.tensorboard": False,
        "train.sample_every": 0, "optim.warmup_steps": 1, "model.base_channels": 8, "model.channel_mult": [1, 2],
        "model.num_groups": 4,
    })
    assert cfg.train.amp == cfg.train.memory_format == cfg.train.upsample == "auto"  # nothing forced
    result = ddpm.fit(cfg, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    runtime = lines[0]["runtime"]
    rule = CPU_RULES[detect_machine("cpu").best_cpu_feature]  # this CPU's rule, whichever CPU runs the test
    assert (runtime["memory_format"], runtime["amp"], runtime["upsample"]) == (rule.memory_format, rule.amp,
                                                                               rule.upsample)
    assert runtime["forced"] == [] and runtime["machine"] == detect_machine("cpu").name

    pipe = ddpm.load(result.checkpoint, device="cpu")  # sampling: the rule's layout and kernels, in float32
    assert (pipe.policy.memory_format, pipe.policy.upsample, pipe.policy.amp) == (rule.memory_format,
                                                                                  rule.upsample, "none")
    assert all(m.subpixel == (rule.upsample == "subpixel") for m in pipe.model.modules() if isinstance(m, Upsample))
    fp32 = pipe.sample(2, sampler="ddim", steps=5, seed=1)
    bf16 = ddpm.load(result.checkpoint, device="cpu", amp="bf16")
    assert isinstance(bf16.policy.wrap(bf16.model), PolicyForward)
    half = bf16.sample(2, sampler="ddim", steps=5, seed=1)
    assert half.dtype == torch.float32 and not torch.equal(half, fp32)
    assert (half - fp32).abs().max() < 0.1  # the same samples, to bf16's precision
    with pytest.raises(ConfigError, match=r"amp='fp16' needs CUDA"):
        ddpm.load(result.checkpoint, device="cpu", amp="fp16")


def test_train_flags_override_the_policy_and_help_shows_the_config_defaults(tmp_path, capsys):
    from ddpm.cli import main

    data = write_folder(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--steps", "1", "--out", str(run), "--amp", "none",
                 "--memory-format", "channels_last", "--attention", "matmul", "--upsample", "nearest",
                 "--fused-optimizer", "off", "--no-compile", *TINY_CLI]) == 0
    runtime = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["runtime"]
    assert (runtime["amp"], runtime["memory_format"], runtime["attention"], runtime["upsample"],
            runtime["fused_optimizer"], runtime["compile"]) == ("none", "channels_last", "matmul", "nearest",
                                                                False, False)
    assert set(runtime["forced"]) == {"amp", "memory_format", "attention", "upsample", "fused_optimizer"}

    assert main(["sample", str(run), "-n", "2", "--steps", "2", "--amp", "bf16", "--device", "cpu",
                 "--out", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "sample_info.json").read_text())["runtime"]["amp"] == "bf16"

    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, key in (("--amp", "train.amp"), ("--memory-format", "train.memory_format"),
                      ("--attention", "train.attention"), ("--upsample", "train.upsample"),
                      ("--fused-optimizer", "train.fused_optimizer")):
        assert f"{flag} {{auto," in text and f"(default: auto) [{key}]" in text
    assert "--compile, --no-compile" in text and "(default: off) [train.compile]" in text


# ---------------------------------------------------------------------------------- sampling
def test_sampling_forward_is_the_wrapped_model_unless_cuda_graphs():
    policy = resolve_policy("cpu", amp="none", machine=EPYC_ZEN4)
    model = policy.prepare(random_unet()).eval()
    assert policy.sampling_forward(model) is model and not policy.cuda_graphs
    with pytest.raises(ConfigError, match=r"cuda_graphs='on' needs CUDA \(the device is cpu\)"):
        resolve_policy("cpu", cuda_graphs="on", machine=EPYC_ZEN4)
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA tensor"):
        CudaGraphForward(model)(torch.randn(1, 3, 8, 8), torch.tensor([1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
def test_cuda_graph_replay_matches_eager_and_follows_weight_updates():
    policy = resolve_policy("cuda", amp="bf16", cuda_graphs="on")
    model = policy.prepare(random_unet()).eval()
    net = policy.sampling_forward(model)
    x, t = torch.randn(4, 3, 8, 8, device="cuda"), torch.tensor([1, 2, 3, 4], device="cuda")
    with torch.inference_mode():
        eager = policy.wrap(model)(x, t)
        torch.testing.assert_close(net(x, t), eager)
        torch.testing.assert_close(net(2 * x, t), policy.wrap(model)(2 * x, t))  # new inputs are copied in
    with torch.no_grad():
        model.conv_out.bias.add_(1.0)  # an in-place update (as the EMA makes) reaches the graph
    with torch.inference_mode():
        torch.testing.assert_close(net(x, t), eager + 1.0, rtol=2e-2, atol=2e-2)
