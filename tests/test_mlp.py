"""The MLP denoiser for 2-D data: shapes, errors, and that it learns a mixture of Gaussians."""

import pytest
import torch
import torch.nn.functional as F

from ddpm.nn import MLPConfig, MLPDenoiser, mlp_preset


def test_shapes_and_learned_sigma():
    model = MLPDenoiser(mlp_preset("mlp-2d"))
    x, t = torch.randn(7, 2), torch.randint(0, 1000, (7,))
    assert model(x, t).shape == (7, 2)
    wide = MLPDenoiser(MLPConfig(dim=5, learned_sigma=True))
    assert wide(torch.randn(3, 5), torch.tensor([0, 1, 2])).shape == (3, 10)


def test_output_depends_on_t_and_gradients_flow():
    torch.manual_seed(0)
    model = MLPDenoiser(MLPConfig(dim=2, hidden=32, num_blocks=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # the residual branches start at zero
    x = torch.randn(1, 2).expand(2, -1)
    out = model(x, torch.tensor([0, 500]))
    assert not torch.allclose(out[0], out[1])
    out.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_errors():
    model = MLPDenoiser(MLPConfig(dim=2))
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        model(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"t must have shape"):
        model(torch.randn(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden"):
        MLPConfig(hidden=0)
    with pytest.raises(ValueError, match="mlp-2d"):
        mlp_preset("nope")


def _mixture(n: int, g: torch.Generator) -> torch.Tensor:
    centres = torch.tensor([[-2.0, -2.0], [-2.0, 2.0], [2.0, -2.0], [2.0, 2.0]])
    return centres[torch.randint(0, 4, (n,), generator=g)] + 0.2 * torch.randn(n, 2, generator=g)


def test_learns_mixture_of_gaussians():
    """A few hundred Adam steps on the eps-MSE of Ho et al. (Eq. 14) cut the loss well down."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    T = 100
    betas = torch.linspace(1e-4, 0.2, T, dtype=torch.float64)  # linear schedule, short chain
    alphas_cumprod = torch.cumprod(1 - betas, 0).float()
    model = MLPDenoiser(mlp_preset("mlp-2d"))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def loss_on(x0, t, eps):
        abar = alphas_cumprod[t][:, None]
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps  # Eq. 4: q(x_t | x_0)
        return F.mse_loss(model(x_t, t), eps)

    x_val, t_val = _mixture(2048, g), torch.randint(0, T, (2048,), generator=g)
    eps_val = torch.randn(2048, 2, generator=g)
    with torch.no_grad():
        initial = loss_on(x_val, t_val, eps_val).item()
    for _ in range(300):
        x0, t = _mixture(256, g), torch.randint(0, T, (256,), generator=g)
        loss = loss_on(x0, t, torch.randn(256, 2, generator=g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = loss_on(x_val, t_val, eps_val).item()
    assert final < 0.5 * initial, (initial, final)
