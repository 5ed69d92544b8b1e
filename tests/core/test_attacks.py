"""Properties of PGD under every threat model and attack loss."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmat.core.attacks import ATTACK_LOSSES, cw_loss, default_step_size, kl_loss, l2_sgd, pgd
from tests.conftest import tiny_bn_net

NORMS = {"Linf": (8 / 255, 2 / 255), "L2": (0.5, 0.15)}  # norm -> (eps, step size)
LOSSES = sorted(ATTACK_LOSSES)


def _tiny_net() -> nn.Module:
    return tiny_bn_net(8, 5)


@pytest.fixture
def model() -> nn.Module:
    net = _tiny_net()
    with torch.no_grad():  # non-trivial running statistics for eval mode
        net.train()(torch.rand(64, 3, 8, 8))
    return net.eval()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 8, 8, generator=g)
    x[:4] = x[:4].round()  # saturated pixels exercise the [0, 1] projection
    return x, torch.randint(0, 5, (16,), generator=g)


def _attack(model, x, y, norm, loss, *, steps=5, eps=None, step_size=None, seed=0, **kwargs):
    default_eps, default_step = NORMS[norm]
    with torch.no_grad():
        target = F.softmax(model(x), dim=1)
    return pgd(
        model,
        x,
        y,
        norm=norm,
        eps=default_eps if eps is None else eps,
        step_size=default_step if step_size is None else step_size,
        steps=steps,
        loss=loss,
        target_probs=target,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )


def _distance(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.abs().amax(dim=1) if norm == "Linf" else flat.norm(dim=1)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("step_scale", [1.0, 10.0])
def test_perturbation_stays_in_ball_and_image_range(model, batch, norm, loss, step_scale) -> None:
    x, y = batch
    eps, step = NORMS[norm]
    x_adv = _attack(model, x, y, norm, loss, step_size=step * step_scale)
    assert (_distance(x_adv - x, norm) <= eps * (1 + 1e-5)).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("loss", LOSSES)
def test_more_steps_never_lower_the_attack_loss_on_average(model, batch, norm, loss) -> None:
    x, y = batch
    with torch.no_grad():
        target = F.softmax(model(x), dim=1)
        values = [
            ATTACK_LOSSES[loss](model(_attack(model, x, y, norm, loss, steps=steps)), y, target).item()
            for steps in (0, 1, 3, 10)
        ]
    assert values == sorted(values), values
    assert values[-1] > values[0]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("random_start", [True, False])
def test_zero_eps_returns_the_input_exactly(model, batch, norm, loss, random_start) -> None:
    x, y = batch
    x_adv = _attack(model, x, y, norm, loss, eps=0.0, random_start=random_start)
    assert torch.equal(x_adv, x)


@pytest.mark.parametrize("training", [True, False])
def test_model_mode_flags_and_gradients_are_untouched(model, batch, training) -> None:
    x, y = batch
    model.train(training)
    model[0].bias.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.no_grad():  # the attack must work even when called without autograd
        x_adv = _attack(model, x, y, "Linf", "ce")
    assert all(m.training == training for m in model.modules())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not x_adv.requires_grad and x_adv.grad_fn is None


def test_seeded_generator_makes_the_attack_deterministic(model, batch) -> None:
    x, y = batch
    first, again = (_attack(model, x, y, "L2", "cw", seed=3) for _ in range(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, _attack(model, x, y, "L2", "cw", seed=4))


@pytest.mark.parametrize("norm", NORMS)
def test_random_start_is_uniform_in_the_ball(norm) -> None:
    # In d dimensions a uniform point of the ball lies within half the radius with probability 2^-d.
    x = torch.full((20_000, 1, 1, 2), 0.5)
    eps = 0.1
    y = torch.zeros(20_000, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    start = pgd(
        nn.Identity(), x, y, norm=norm, eps=eps, step_size=0.0, steps=0, loss="ce", generator=generator
    )
    delta = (start - x).flatten(1)
    if norm == "Linf":
        assert delta.abs().max() <= eps
        assert (delta.abs() <= eps / 2).float().mean() == pytest.approx(0.5, abs=0.01)
    else:
        assert (delta.norm(dim=1) <= eps / 2).float().mean() == pytest.approx(0.25, abs=0.01)
        angle = torch.atan2(delta[:, 1], delta[:, 0])
        assert (angle > 0).float().mean() == pytest.approx(0.5, abs=0.01)


def test_cw_loss_is_the_margin_of_the_best_wrong_class() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    assert cw_loss(logits, torch.tensor([0, 1])).item() == pytest.approx((3 - 1) + (2 - 3))


def test_bad_arguments_are_rejected(model, batch) -> None:
    x, y = batch
    with pytest.raises(ValueError, match="target_probs"):
        pgd(model, x, y, norm="Linf", eps=0.1, step_size=0.1, steps=1, loss="kl")
    with pytest.raises(ValueError, match="norm"):
        pgd(model, x, y, norm="L1", eps=0.1, step_size=0.1, steps=1, loss="ce")
    with pytest.raises(ValueError, match="loss"):
        pgd(model, x, y, norm="L2", eps=0.1, step_size=0.1, steps=1, loss="dlr")


# --- the reference's L2 solver for TRADES (l2_sgd) --------------------------------------------------------


def _linear(weight: list[list[float]]) -> nn.Module:
    """logits = W·x on 1×1×2 images: with the CW loss the input gradient is W_other − W_true, everywhere."""
    layer = nn.Linear(2, len(weight), bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
    return nn.Sequential(nn.Flatten(), layer)


def _start(seed: int, n: int = 1) -> torch.Tensor:
    """The solver's start δ0 = 0.001·N(0, I) for n 1×1×2 images, drawn as it draws it."""
    return 0.001 * torch.randn((n, 1, 1, 2), generator=torch.Generator().manual_seed(seed))


def _l2_sgd(model, x, *, eps, step_size, steps, seed=0, loss="cw"):
    y = torch.zeros(len(x), dtype=torch.long)
    return l2_sgd(model, x, y, eps=eps, step_size=step_size, steps=steps, loss=loss,
                  generator=torch.Generator().manual_seed(seed))


def test_l2_sgd_steps_along_the_normalised_gradient_and_rescales_into_the_ball() -> None:
    # Gradient (3, 4): unit direction (0.6, 0.8). eps 0.1, 3 steps of 2·eps/3: the second step leaves the
    # ball and is rescaled onto it, the third too, ending at eps·(0.6, 0.8) up to the 0.001 start.
    model, x, eps, steps = _linear([[0.0, 0.0], [3.0, 4.0]]), torch.full((1, 1, 1, 2), 0.5), 0.1, 3
    lr, direction = 2 * eps / steps, torch.tensor([0.6, 0.8])
    delta = _start(0).flatten()
    for _ in range(steps):  # by hand: x stays inside [0, 1], so only the rescaling acts
        delta = delta + lr * direction
        delta = delta * min(1.0, eps / float(delta.norm()))
    x_adv = _l2_sgd(model, x, eps=eps, step_size=lr, steps=steps)
    torch.testing.assert_close(x_adv.flatten(), 0.5 + delta, rtol=0, atol=1e-7)
    torch.testing.assert_close(x_adv.flatten(), torch.tensor([0.56, 0.58]), rtol=0, atol=2e-3)


def test_l2_sgd_clips_to_the_image_range_before_rescaling() -> None:
    # One step of 0.2 along (1, 1)/√2 from x = (1, 0.5): clipping first zeroes the saturated pixel, then the
    # rescaling gives the other the whole radius: x_adv = (1, 0.6). (Rescaling first would give 0.5 + 0.0707.)
    model, x = _linear([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([1.0, 0.5]).view(1, 1, 1, 2)
    x_adv = _l2_sgd(model, x, eps=0.1, step_size=0.2, steps=1)
    torch.testing.assert_close(x_adv.flatten(), torch.tensor([1.0, 0.6]), rtol=0, atol=1e-6)


def test_l2_sgd_moves_along_a_random_unit_direction_where_the_gradient_is_zero() -> None:
    model, x, lr = _linear([[0.0, 0.0], [0.0, 0.0]]), torch.full((64, 1, 1, 2), 0.5), 0.05
    x_adv = _l2_sgd(model, x, eps=0.5, step_size=lr, steps=1)
    step = (x_adv - x - _start(0, 64)).flatten(1)  # what the one step added to the start
    assert torch.isfinite(x_adv).all()
    torch.testing.assert_close(step.norm(dim=1), torch.full((64,), lr), rtol=0, atol=1e-6)
    assert len({tuple(row.tolist()) for row in step.sign()}) > 1  # not one fixed direction


@pytest.mark.parametrize("step_scale", [1.0, 10.0])
def test_l2_sgd_stays_in_ball_and_image_range(model, batch, step_scale) -> None:
    x, y = batch
    eps = NORMS["L2"][0]
    with torch.no_grad():
        target = F.softmax(model(x), dim=1)
    x_adv = l2_sgd(model, x, y, eps=eps, step_size=0.1 * step_scale, steps=5, loss="kl", target_probs=target,
                   generator=torch.Generator().manual_seed(0))
    assert (_distance(x_adv - x, "L2") <= eps * (1 + 1e-5)).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert kl_loss(model(x_adv), y, target) > kl_loss(model(x), y, target)


def test_l2_sgd_with_zero_eps_returns_the_input_exactly(model, batch) -> None:
    x, y = batch
    x_adv = l2_sgd(model, x, y, eps=0.0, step_size=0.1, steps=2, loss="ce", generator=torch.Generator())
    assert torch.equal(x_adv, x)


def test_default_step_sizes_follow_the_reference() -> None:
    assert default_step_size("Linf", 8 / 255, 10) == pytest.approx(2 / 255)  # the reference's Linf step
    assert default_step_size("L2", 0.5, 10) == pytest.approx(0.1)  # its L2 solver: lr = 2·eps/steps
    assert default_step_size("L2", 0.5, 0) == pytest.approx(1.0)  # no division by zero steps
    with pytest.raises(ValueError, match="norm"):
        default_step_size("L1", 0.5, 10)
