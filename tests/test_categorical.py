"""Categorical diffusion (D3PM) against the seed notes' appendices: stochastic matrices, the probability of a
path of a Markov chain, and the KL divergence of discrete distributions.

The references are written from the definitions in float64 (the matrices from their formulas, marginals
and posteriors by enumerating paths), not from the module under test.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import ddpm
from ddpm.cli import main
from ddpm.config import RunConfig, apply_overrides, load_config
from ddpm.distributions import categorical_kl, discretized_logistic_logits
from ddpm.errors import UserError
from ddpm.likelihood import nll
from ddpm.processes import CategoricalConfig, CategoricalDiffusion, DiffusionProcess, build_process
from ddpm.processes.categorical import Transitions, transition_betas

from .test_cli import write_folder

LOG2 = math.log(2.0)


# ------------------------------------------------------------------------------ references
def reference_matrix(transition: str, K: int, beta: float) -> torch.Tensor:
    """Q_t from its definition (float64): rows are the distribution of the next state."""
    if transition == "uniform":  # (1 - beta) I + beta / K 11^T
        return (1 - beta) * torch.eye(K, dtype=torch.float64) + beta / K * torch.ones(K, K, dtype=torch.float64)
    if transition == "absorbing":  # stay with 1 - beta, else jump to the mask K; the mask stays
        q = torch.zeros(K + 1, K + 1, dtype=torch.float64)
        for i in range(K):
            q[i, i], q[i, K] = 1 - beta, beta
        q[K, K] = 1.0
        return q
    # discretised Gaussian (Austin et al. A.2.4): off-diagonal exp(-4 (i-j)^2 / ((K-1)^2 beta)) / Z
    z = sum(math.exp(-4 * n**2 / ((K - 1) ** 2 * beta)) for n in range(-(K - 1), K))
    q = torch.zeros(K, K, dtype=torch.float64)
    for i in range(K):
        for j in range(K):
            if i != j:
                q[i, j] = math.exp(-4 * (i - j) ** 2 / ((K - 1) ** 2 * beta)) / z
        q[i, i] = 1 - q[i].sum()
    return q


def reference_matrices(process: CategoricalDiffusion, transition: str) -> list[torch.Tensor]:
    """Q_1..Q_T of ``process`` (built by :func:`small`) from the definitions."""
    schedule = None if transition == "absorbing" else "cosine"
    betas = transition_betas(transition, process.num_timesteps, schedule)  # type: ignore[arg-type]
    return [reference_matrix(transition, process.num_states, float(b)) for b in betas]


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of ``counts`` against ``probs`` (bins expecting < 5 merged into one)."""
    n = counts.sum()
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def small(transition: str, K: int = 5, T: int = 12) -> CategoricalDiffusion:
    """A short chain (the cosine schedule: the linear one is for T near 1000)."""
    cfg = CategoricalConfig(transition=transition, num_states=K, timesteps=T,  # type: ignore[arg-type]
                            beta_schedule=None if transition == "absorbing" else "cosine")
    process = build_process(cfg)
    assert isinstance(process, CategoricalDiffusion)
    return process


TRANSITIONS = ("uniform", "absorbing", "gaussian")


# ------------------------------------------------------------------------------ the chain
@pytest.mark.parametrize("transition", TRANSITIONS)
def test_every_one_step_and_cumulative_matrix_is_stochastic_and_qbar_is_their_product(transition: str) -> None:
    process = small(transition, K=6, T=15)
    assert isinstance(process, DiffusionProcess)
    reference = reference_matrices(process, transition)
    running = torch.eye(reference[0].shape[0], dtype=torch.float64)
    for t, q_ref in enumerate(reference):
        running = running @ q_ref
        Q, Qbar = process.transitions.Q[t].double(), process.transitions.Qbar[t].double()
        torch.testing.assert_close(Q, q_ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(Qbar, running, atol=1e-6, rtol=0)
        for m in (Q, Qbar):
            assert bool((m >= 0).all())
            torch.testing.assert_close(m.sum(1), torch.ones(m.shape[0], dtype=torch.float64), atol=1e-6, rtol=0)
        if transition != "absorbing":  # uniform and Gaussian: doubly stochastic and symmetric
            torch.testing.assert_close(Q.sum(0), torch.ones(6, dtype=torch.float64), atol=1e-6, rtol=0)
            torch.testing.assert_close(Q, Q.T, atol=1e-7, rtol=0)
    if transition == "absorbing":  # beta_T = 1: every state is the mask at the end
        torch.testing.assert_close(process.transitions.Qbar[-1][:, -1], torch.ones(7))


def test_the_probability_of_a_path_is_lambda_times_the_product_of_its_transitions() -> None:
    """The notes' theorem, P(X_0 = i_0, ..., X_n = i_n) = lambda_{i_0} p_{i_0 i_1} ... p_{i_{n-1} i_n}: paths drawn
    step by step from the process's matrices (random stochastic matrices, one per step) have these frequencies,
    and summing the theorem over the intermediate states gives the closed form q(x_t | x_0) = x_0 Qbar_t."""
    g = torch.Generator().manual_seed(0)
    K, T, n = 3, 4, 200_000
    steps = [torch.distributions.Dirichlet(torch.ones(K, K, dtype=torch.float64)).sample() for _ in range(T)]
    process = CategoricalDiffusion(Transitions.from_steps(steps, T, K), num_states=K)
    lam = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)

    state = torch.multinomial(lam, n, replacement=True, generator=g)
    path_index = state.clone()
    for t in range(T):  # X_{t+1} ~ row X_t of Q_{t+1}
        state = torch.multinomial(process.transitions.Q[t].double()[state], 1, generator=g).squeeze(1)
        path_index = path_index * K + state
    counts = torch.bincount(path_index, minlength=K ** (T + 1))

    theorem = torch.empty(K ** (T + 1), dtype=torch.float64)
    for index, path in enumerate(itertools.product(range(K), repeat=T + 1)):
        p = lam[path[0]]
        for t in range(T):
            p = p * steps[t][path[t], path[t + 1]]
        theorem[index] = p
    assert float(theorem.sum()) == pytest.approx(1.0, abs=1e-12)
    assert chi_square_p_value(counts, theorem) > 1e-3

    joint = theorem.reshape([K] * (T + 1))  # axes X_0..X_T
    for t in range(1, T + 1):  # P(X_t = j | X_0 = i) from the theorem, against row i of Qbar_t
        marginal = joint.sum(dim=tuple(a for a in range(1, T + 1) if a != t))
        conditional = marginal / lam[:, None]
        x0 = torch.arange(K)
        closed = process.q_probs(x0[:, None], torch.full((K,), t - 1)).squeeze(1).double()
        torch.testing.assert_close(closed, conditional, atol=1e-6, rtol=0)


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_q_sample_and_the_chain_stepped_one_matrix_at_a_time_both_match_the_closed_form(transition: str) -> None:
    K, T, t, n = 6, 20, 9, 40_000
    process = small(transition, K=K, T=T)
    reference = reference_matrices(process, transition)
    g = torch.Generator().manual_seed(1)
    x0_state = 2
    closed = torch.zeros(process.num_total_states, dtype=torch.float64)
    closed[x0_state] = 1.0
    for q in reference[: t + 1]:  # index t is t + 1 steps
        closed = closed @ q

    x0 = process.to_values(torch.full((n, 1), x0_state))
    direct = process.to_states(process.q_sample(x0, torch.full((n,), t), process.draw_noise(x0.shape, g, device="cpu")))
    state = torch.full((n,), x0_state)
    for q in reference[: t + 1]:
        state = torch.multinomial(q[state], 1, generator=g).squeeze(1)
    for sample in (direct.flatten(), state):
        assert chi_square_p_value(torch.bincount(sample, minlength=closed.numel()), closed) > 1e-3


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_the_posterior_is_bayes_rule_over_enumerated_paths(transition: str) -> None:
    K, T = 4, 5
    process = small(transition, K=K, T=T)
    Kp = process.num_total_states
    Q = reference_matrices(process, transition)
    for x0 in range(K):
        # P(x_1..x_T | x_0) for every path, by the product of its transitions
        joint = torch.zeros([Kp] * T, dtype=torch.float64)
        for path in itertools.product(range(Kp), repeat=T):
            p, previous = 1.0, x0
            for s, state in enumerate(path):
                p *= float(Q[s][previous, state])
                previous = state
            joint[path] = p
        for index in range(T):  # index t holds x_{t+1}: the posterior over x_t (x_0 itself at index 0)
            if index == 0:
                pair = torch.zeros(Kp, Kp, dtype=torch.float64)
                pair[x0] = joint.sum(dim=tuple(range(1, T)))
            else:
                pair = joint.sum(dim=tuple(a for a in range(T) if a not in (index - 1, index)))  # [x_t, x_{t+1}]
            for x_t in range(Kp):
                evidence = pair[:, x_t].sum()
                if evidence < 1e-12:  # x_t cannot follow x_0 (the absorbing chain's other levels)
                    continue
                bayes = pair[:, x_t] / evidence
                got = process.q_posterior_log_probs(torch.tensor([[x0]]), torch.tensor([[x_t]]),
                                                    torch.tensor([index])).exp().reshape(-1).double()
                torch.testing.assert_close(got, bayes, atol=2e-5, rtol=0)


def test_the_discrete_kl_matches_torch_distributions_including_zeros() -> None:
    g = torch.Generator().manual_seed(2)
    p = torch.rand(50, 7, generator=g, dtype=torch.float64)
    q = torch.rand(50, 7, generator=g, dtype=torch.float64)
    p[::3, 0] = 0.0  # states P never takes: they contribute nothing, also where Q is 0 there
    q[::6, 0] = 0.0
    p, q = p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)
    expected = torch.distributions.kl_divergence(torch.distributions.Categorical(probs=p),
                                                 torch.distributions.Categorical(probs=q))
    torch.testing.assert_close(categorical_kl(p.log(), q.log()), expected)
    assert bool((categorical_kl(p.log(), q.log()) >= 0).all())
    q[1, 1] = 0.0  # P > 0 where Q = 0: infinite, as in torch
    assert math.isinf(float(categorical_kl(p[1].log(), (q[1] / q[1].sum()).log())))
    logits = p.log().clone().requires_grad_(True)
    categorical_kl(torch.log_softmax(logits, -1), q.log().clamp_min(-1e4)).sum().backward()
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())  # no NaN through the zeros


def test_the_truncated_discretised_logistic_is_a_distribution_over_the_levels() -> None:
    K = 9
    loc = torch.tensor([-3.0, -1.0, -0.3, 0.0, 0.55, 1.0, 4.0], dtype=torch.float64)
    log_scale = torch.tensor([-6.0, -2.0, -1.0, 0.0, -3.0, 1.0, -5.0], dtype=torch.float64)
    log_p = discretized_logistic_logits(loc, log_scale, K)
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(7, dtype=torch.float64))
    levels = torch.linspace(-1, 1, K, dtype=torch.float64)
    edges = torch.cat([torch.tensor([-math.inf]), (levels[:-1] + levels[1:]) / 2, torch.tensor([math.inf])])
    cdf = torch.sigmoid((edges[None, :] - loc[:, None]) / log_scale.exp()[:, None])  # the logistic CDF
    torch.testing.assert_close(log_p.exp(), cdf[:, 1:] - cdf[:, :-1], atol=1e-10, rtol=1e-6)
    param = torch.stack([loc, log_scale]).float().requires_grad_(True)
    discretized_logistic_logits(param[0], param[1], K).logsumexp(-1).sum().backward()
    assert param.grad is not None and bool(torch.isfinite(param.grad).all())


# ------------------------------------------------------------------------------ the bound
class ConstantLogits(nn.Module):
    """p~(x_0 | x_t) = the data's distribution at each pixel, whatever x_t: for data with independent pixels
    the x_0-parameterised reverse step is then exactly q(x_{t-1} | x_t)."""

    def __init__(self, log_probs: torch.Tensor) -> None:  # [D, K]
        super().__init__()
        self.log_probs = log_probs

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B, (D, K) = x.shape[0], self.log_probs.shape
        side = int(math.isqrt(D))
        out = self.log_probs.T.reshape(1, K, side, side)  # channel k, pixel d
        return out.expand(B, -1, -1, -1).float()


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_the_bayes_optimal_denoisers_bound_is_the_entropy_plus_l_t(transition: str) -> None:
    """With the exact reverse chain, E[bound] = H(x_0) + KL(q(x_T) || p(x_T)) exactly (the model's joint is q's
    times p(x_T) / q(x_T)): the bound is never below the entropy, and loses only how far x_T is from the prior."""
    K, T, D, n = 4, 40, 4, 3000
    process = small(transition, K=K, T=T)
    g = torch.Generator().manual_seed(3)
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.05, 0.15, 0.3, 0.5], [0.0, 0.5, 0.5, 0.0]],
                         dtype=torch.float64)  # [D, K]: each pixel independent, one with impossible levels
    entropy = float(-(probs * probs.clamp_min(1e-300).log()).sum() / D / LOG2)  # bits/dim
    states = torch.multinomial(probs, n, replacement=True, generator=g).T.reshape(n, 1, 2, 2)
    x0 = process.to_values(states)

    exact = ConstantLogits(probs.clamp_min(1e-30).log())
    result = nll(process, exact, x0, generator=g, max_batch_size=4096)
    qbar_T = process.transitions.Qbar[-1].double()
    prior = process.prior_log_probs(torch.device("cpu")).double()
    marginal_gap = float(categorical_kl((probs @ qbar_T[:K]).log(), prior).mean() / LOG2)  # KL(q(x_T) || p(x_T))
    mean, stderr = float(result.total_bpd.mean()), float(result.total_bpd.std() / math.sqrt(n))
    assert abs(mean - (entropy + marginal_gap)) < 4 * stderr + 1e-4
    assert mean > entropy - 4 * stderr
    # L_T = KL(q(x_T | x_0) || p(x_T)) of each image: computed, not assumed zero
    l_T = categorical_kl(qbar_T[states].log(), prior).mean(dim=(1, 2, 3)) / LOG2
    torch.testing.assert_close(result.prior_bpd, l_T, atol=1e-5, rtol=0)

    uniform = ConstantLogits(torch.full((D, K), -math.log(K), dtype=torch.float64))
    worse = float(nll(process, uniform, x0, generator=g, max_batch_size=4096).total_bpd.mean())
    assert worse > mean + 0.05  # a denoiser that ignores the data pays for it


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_the_image_chains_end_at_their_prior(transition: str) -> None:
    """K = 256, T = 1000 with the default schedules: uniform and Gaussian chains end at the uniform
    distribution, the absorbing one at the mask, so L_T is small for the darkest and brightest pixels."""
    process = build_process(CategoricalConfig(transition=transition))  # type: ignore[arg-type]
    x0 = torch.tensor([-1.0, 0.0, 1.0]).reshape(3, 1, 1, 1)
    l_T = process.prior_bpd(x0)
    assert bool((l_T >= 0).all()) and float(l_T.max()) < 1e-3, l_T
    if transition == "absorbing":
        assert float(l_T.max()) == 0.0


# ------------------------------------------------------------------------------ respacing
@pytest.mark.parametrize("transition", TRANSITIONS)
def test_a_respaced_step_is_the_product_of_the_steps_it_skips(transition: str) -> None:
    process = small(transition, K=5, T=30)
    short = process.respaced(7)
    kept = short.timestep_map
    assert short.num_timesteps == 7 and int(kept[-1]) == 29
    previous = -1
    running = torch.eye(process.num_total_states, dtype=torch.float64)
    for i, k in enumerate(kept.tolist()):
        product = torch.eye(process.num_total_states, dtype=torch.float64)
        for s in range(previous + 1, k + 1):
            product = product @ process.transitions.Q[s].double()
        running = running @ product
        torch.testing.assert_close(short.transitions.Q[i].double(), product, atol=1e-6, rtol=0)
        torch.testing.assert_close(short.transitions.Qbar[i].double(), running, atol=1e-5, rtol=0)
        previous = k
    assert process.respaced(30) is process
    assert process.respaced(7) is short  # the products are computed once per grid


# ------------------------------------------------------------------------------ the same path as Gaussian models
TINY = ["--process", "categorical", "--timesteps", "20", "--beta-schedule", "cosine", "--batch-size", "8",
        "--log-every", "1",
        "--checkpoint-every", "3", "--sample-every", "0", "--warmup-steps", "1", "--lr", "1e-3", "--device", "cpu",
        "--set", "train.tensorboard=false", "--set", "model.base_channels=8", "--set", "model.channel_mult=1,2",
        "--set", "model.num_groups=8"]


def on_the_8_bit_levels(x: torch.Tensor) -> bool:
    """Every value is one of k / 127.5 - 1, k = 0..255."""
    k = (x.double() + 1) * 127.5
    return bool(((k - k.round()).abs() < 1e-3).all() and (k >= 0).all() and (k <= 255).all())


@pytest.mark.parametrize(("transition", "head"), [("gaussian", "logits"), ("absorbing", "logistic")])
def test_train_resume_sample_bound_and_forward_through_the_command_line(
        tmp_path: Path, capsys: pytest.CaptureFixture, transition: str, head: str) -> None:
    data = write_folder(tmp_path / "data")  # 8-bit PNGs: on the 256 levels
    run = tmp_path / "run"
    flags = [*TINY, "--transition", transition, "--head", head]
    assert main(["train", "--data", str(data), "--steps", "3", "--out", str(run), *flags]) == 0
    assert main(["train", "--data", str(data), "--steps", "5", "--out", str(run), "--resume", *flags]) == 0
    saved = load_config(run / "ckpt-00000005" / "config.toml").diffusion
    assert isinstance(saved, CategoricalConfig) and (saved.transition, saved.head) == (transition, head)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("ce" in m and "ce_by_t_bucket" in m for m in metrics) and max(m["step"] for m in metrics) == 5

    pipe = ddpm.load(run, device="cpu")
    assert isinstance(pipe.process, CategoricalDiffusion) and pipe.process.absorbing == (transition == "absorbing")
    x = pipe.sample(5, seed=1, steps=4)
    assert x.shape == (5, 1, 8, 8) and on_the_8_bit_levels(x)  # every pixel a level, never the mask
    assert torch.equal(x, pipe.sample(5, seed=1, steps=4, batch_size=2))  # sample i from seed (1, i)
    images = pipe.process.to_values(torch.randint(0, 256, (3, 1, 8, 8), generator=torch.Generator().manual_seed(0)))
    exact = pipe.nll(images)
    assert exact.terms_bpd is not None and exact.terms_bpd.shape == (20,)
    assert exact.total_bpd == pytest.approx(exact.prior_bpd + exact.kl_bpd + exact.decoder_bpd, rel=1e-9)
    assert 0.0 < exact.total_bpd < 20.0  # finite; 8 bits/dim is the uniform distribution's
    estimate = pipe.nll(images, estimate=10)
    assert abs(estimate.total_bpd - exact.total_bpd) < 4 * estimate.stderr_bpd + 0.05
    with pytest.raises(UserError, match="needs data on the levels"):
        pipe.nll(images + 0.001)
    with pytest.raises(UserError, match="walks gaussian diffusion, not the 'categorical' process"):
        pipe.sample(2, sampler="ddim")
    with pytest.raises(UserError, match="diffusers has no pipeline for the 'categorical' process"):
        pipe.save_pretrained(tmp_path / "export")

    assert main(["sample", str(run), "-n", "3", "--steps", "5", "--out", str(tmp_path / "s"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "s" / "sample_info.json").read_text())["network_evaluations"] == 5
    assert main(["nll", str(run), "-n", "2", "--out", str(tmp_path / "n"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "n" / "nll.json").read_text())["timesteps"] == 20
    assert main(["forward", str(data / "img0.png"), "--process", "categorical", "--transition", transition,
                 "--timesteps", "20", "--beta-schedule", "cosine", "--out", str(tmp_path / "f.png"),
                 "--channels", "1"]) == 0
    assert (tmp_path / "f.png").is_file()
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "e")]) == 2
    assert "diffusers has no pipeline" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "x"), "--process", "categorical",
                 "--set", "diffusion.transition=sideways"]) == 2
    assert "diffusion.transition" in capsys.readouterr().err


def test_a_class_conditional_categorical_model_samples_the_requested_labels_with_guidance(tmp_path: Path) -> None:
    cfg = apply_overrides(RunConfig(), {
        "diffusion.process": "categorical", "diffusion.timesteps": 10, "diffusion.beta_schedule": "cosine",
        "data.dataset": "digits",
        "model.class_cond": True, "train.steps": 2, "train.batch_size": 8, "train.out_dir": str(tmp_path / "run"),
        "train.device": "cpu", "train.tensorboard": False, "train.sample_every": 0, "model.base_channels": 8,
        "model.channel_mult": (1, 2), "model.num_groups": 8})
    ddpm.fit(cfg, progress=False)
    pipe = ddpm.load(tmp_path / "run", device="cpu")
    x = pipe.sample(4, seed=0, classes=torch.tensor([0, 1, 2, 3]), guidance=2.0)
    assert x.shape == (4, 1, 8, 8) and on_the_8_bit_levels(x)


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_the_bound_terms_are_the_discrete_kls_of_the_posteriors_and_the_decoder_term(transition: str) -> None:
    """The terms' fast form (the likelihood x_t Q_t^T cancelled) equals KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} |
    x_t)) from the two distributions, and at t = 0 equals -log p_theta(x_0 | x_1)."""
    process = small(transition, K=7, T=10)
    g = torch.Generator().manual_seed(4)
    B = 40
    x0_states = torch.randint(0, 7, (B, 1, 3, 3), generator=g)
    t = torch.arange(B) % 10
    x_t = process.q_sample(process.to_values(x0_states), t, process.draw_noise(x0_states.shape, g, device="cpu"))
    x_t_states = process.to_states(x_t)
    log_x0 = torch.log_softmax(3 * torch.randn(B, 1, 3, 3, 7, generator=g), -1)
    if process.absorbing:
        log_x0 = torch.cat([log_x0, torch.full_like(log_x0[..., :1], -math.inf)], -1)
    log_p = process.p_log_probs(log_x0, x_t_states, t)
    kl = categorical_kl(process.q_posterior_log_probs(x0_states, x_t_states, t), log_p)
    decoder = -torch.gather(log_p, -1, x0_states.unsqueeze(-1)).squeeze(-1)
    expected = torch.where((t == 0)[:, None, None, None], decoder, kl).mean(dim=(1, 2, 3)) / LOG2
    torch.testing.assert_close(process._terms(log_x0, x0_states, x_t_states, t), expected, atol=1e-5, rtol=1e-4)
