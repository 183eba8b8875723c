"""Path densities of the PIS and DDS samplers against independent per-step computations."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide.initialization import init_to_mean
from torch.distributions import Normal

from pyro_gpx.diffusion import AutoDiffusion, LogVarianceLoss, PathELBO, UnconstrainedTarget, make_process


def gaussian_model(scale=1.0, dim=3):
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(dim, dtype=torch.float64), scale).to_event(1))

    return model


def _frame_matrix(guide):
    """The frame z = loc + S y as a dense S."""
    if guide.affine == "full":
        return guide.scale_tril.detach()
    return torch.diag(guide.scale.detach())


def _reference_log_path(guide, path):
    """L recomputed step by step with torch.distributions, in the frame z = loc + S y (S dense)."""
    proc, states = guide.process, path.states
    K = proc.num_steps
    loc, S = guide.loc.detach(), _frame_matrix(guide)
    total = -torch.linalg.slogdet(S).logabsdet.expand(states.shape[0]).clone()
    if proc.kind == "dds":
        total += Normal(0.0, proc.sigma).log_prob(states[:, 0]).sum(-1)
    times = proc.times()
    with torch.no_grad():
        for k in range(K):
            z, z_next = states[:, k], states[:, k + 1]
            score = None
            if guide.drift.use_score:
                score = UnconstrainedTarget(guide, guide._raw_model[0]).score(loc + z @ S.T) @ S
            u = guide.drift(z, float(times[k]), score)
            if proc.kind == "pis":
                total += Normal(z + u * proc.dt, proc.sigma * math.sqrt(proc.dt)).log_prob(z_next).sum(-1)
                if k > 0:
                    f = k / (k + 1)
                    total -= Normal(z_next * f, proc.sigma * math.sqrt(proc.dt * f)).log_prob(z).sum(-1)
            else:
                a = float(proc.alphas[k])
                mean = math.sqrt(1 - a) * z + 2 * proc.sigma**2 * (1 - math.sqrt(1 - a)) * u
                total += Normal(mean, proc.sigma * math.sqrt(a)).log_prob(z_next).sum(-1)
                total -= Normal(math.sqrt(1 - a) * z_next, proc.sigma * math.sqrt(a)).log_prob(z).sum(-1)
    return total


FULL_FRAME = torch.tensor([[0.7, 0.0, 0.0], [0.4, 1.5, 0.0], [-0.3, 0.8, 2.0]], dtype=torch.float64)


@pytest.mark.parametrize("process", ["pis", "dds"])
@pytest.mark.parametrize("use_score", [False, True])
@pytest.mark.parametrize("affine", ["diagonal", "full"])
def test_path_log_density_matches_per_step_computation(float64, process, use_score, affine):
    model = gaussian_model(scale=1.7)
    guide = AutoDiffusion(model, process=process, num_steps=6, hidden=8, use_score=use_score, sigma=1.3,
                          affine=affine)  # fmt: skip
    guide()
    for p in guide.drift.parameters():  # a non-zero drift
        torch.nn.init.normal_(p, std=0.3)
    guide.loc = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)  # a non-trivial affine frame
    if affine == "full":
        guide.scale_tril = FULL_FRAME
    else:
        guide.scale = FULL_FRAME.diagonal().clone()
    with torch.no_grad():
        path = guide.sample_paths(5, keep_path=True)
    torch.testing.assert_close(path.log_path, _reference_log_path(guide, path), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(path.z, guide.loc + path.states[:, -1] @ _frame_matrix(guide).T)
    assert path.states[:, 0].abs().sum() == 0 if process == "pis" else path.states[:, 0].std() > 0


@pytest.mark.parametrize("process, sigma, horizon", [("pis", 1.0, 2.0), ("dds", 1.5, 1.0)])
def test_untrained_sampler_is_exact_for_its_reference_marginal(float64, process, sigma, horizon):
    # zero drift: PIS ends at N(0, sigma^2 T), DDS stays at N(0, sigma^2); for that target every
    # log weight is log Z = 0 and the log-variance loss is exactly zero
    scale = sigma * math.sqrt(horizon) if process == "pis" else sigma
    model = gaussian_model(scale)
    guide = AutoDiffusion(model, process=process, num_steps=10, sigma=sigma, horizon=horizon, hidden=8,
                          init_loc_fn=init_to_mean)  # fmt: skip
    guide()
    with torch.no_grad():
        path = guide.sample_paths(64)
    torch.testing.assert_close(path.log_weight, torch.zeros(64, dtype=torch.float64), rtol=0, atol=1e-10)
    assert LogVarianceLoss(64).loss(model, guide) < 1e-20
    # the path ratio is exact for any path, so the loss on wider (off-policy) paths is zero too
    states = guide.explore_paths(64, noise_scale=2.5)
    assert states[:, -1].std() > 2.0 * sigma * math.sqrt(horizon if process == "pis" else 1.0)
    assert float(LogVarianceLoss(64, exploration=2.5).differentiable_loss(model, guide)) < 1e-20


def test_untrained_dds_in_a_full_frame_is_the_gaussian_it_spans(float64):
    # zero drift: DDS stays at N(0, sigma^2 I) in y, so z = m + L y is exactly N(m, sigma^2 L L^T) and
    # the path density of every sample is that Gaussian's log density
    sigma, loc = 1.3, torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    guide = AutoDiffusion(gaussian_model(), process="dds", num_steps=7, hidden=8, sigma=sigma, affine="full")
    guide()
    guide.loc, guide.scale_tril = loc, FULL_FRAME
    with torch.no_grad():
        path = guide.sample_paths(20000)
    gaussian = dist.MultivariateNormal(loc, scale_tril=sigma * FULL_FRAME)
    torch.testing.assert_close(path.log_path, gaussian.log_prob(path.z), rtol=1e-10, atol=1e-10)
    cov = torch.cov(path.z.T)
    assert (cov - gaussian.covariance_matrix).abs().max() < 0.35  # entries up to 8.0; their MC sd is below 0.08
    assert "AutoDiffusion.scale_tril" in pyro.get_param_store()


@pytest.mark.parametrize("affine", ["diagonal", "full"])
def test_gradients_reach_the_drift(float64, affine):
    model = gaussian_model(scale=2.0)
    guide = AutoDiffusion(model, num_steps=5, hidden=8, affine=affine)
    guide()
    frame = "AutoDiffusion.scale_tril" if affine == "full" else "AutoDiffusion.scale"
    for loss in (PathELBO(16), LogVarianceLoss(16)):
        guide.drift.zero_grad()
        loss.loss_and_grads(model, guide)
        grads = [p.grad for p in guide.drift.out.parameters()]
        grads += [pyro.param("AutoDiffusion.loc").grad, pyro.param(frame).unconstrained().grad]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_trace_elbo_uses_the_path_ratio(float64):
    model = gaussian_model(scale=1.0)
    guide = AutoDiffusion(model, num_steps=4, hidden=8, use_score=False)
    pyro.set_rng_seed(0)
    guide_trace = pyro.poutine.trace(guide).get_trace()
    eps = guide_trace.nodes["_AutoDiffusion_noise"]["value"]
    latent = guide_trace.nodes["_AutoDiffusion_latent"]
    path = guide._simulate(eps[None], (), {})
    total_q = guide_trace.log_prob_sum()  # noise density + (L - noise density) + Jacobians (none here)
    torch.testing.assert_close(total_q, path.log_path[0])
    torch.testing.assert_close(latent["value"], path.z[0])


def test_bad_input():
    with pytest.raises(ValueError, match="num_steps"):
        make_process("pis", 0)
    with pytest.raises(ValueError, match="process must be"):
        make_process("ddpm", 4)
    with pytest.raises(ValueError, match="exploration must be positive"):
        LogVarianceLoss(8, exploration=0.0)
    with pytest.raises(ValueError, match="affine must be"):
        AutoDiffusion(gaussian_model(), affine="dense")

    def discrete():
        pyro.sample("k", dist.Bernoulli(0.3))

    with pytest.raises(ValueError, match="discrete sample site 'k'"):
        AutoDiffusion(discrete, num_steps=2)()

    def bad():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.factor("broken", torch.where(x > 1, float("nan"), 0.0))  # fine at the initial point x = 0

    guide = AutoDiffusion(bad, num_steps=3, hidden=4, use_score=False)
    with pytest.raises(FloatingPointError, match="'broken'"):
        PathELBO(64).loss(bad, guide)
    with pytest.raises(ValueError, match="not the model the AutoDiffusion guide was built on"):
        PathELBO(64).loss(gaussian_model(), guide)  # silently scoring `bad` instead would be wrong


def test_drift_clip_bounds_the_drift_softly(float64):
    from pyro_gpx.diffusion.drift import DriftNet

    net = DriftNet(3, hidden=8, use_score=False, drift_clip=2.0).double()
    torch.nn.init.normal_(net.out.weight, std=50.0)
    z = 10 * torch.randn(64, 3)
    out = net(z, 0.5)
    assert out.abs().max() <= 2.0
    net.drift_clip = None
    unclipped = net(z, 0.5)
    assert unclipped.abs().max() > 2.0
    torch.testing.assert_close(out, 2.0 * torch.tanh(unclipped / 2.0))
    with pytest.raises(ValueError, match="drift_clip"):
        DriftNet(3, drift_clip=0.0)


def test_drift_functional_matches_its_modules_and_passes_gradients(float64):
    """The one-read forward pass equals the network's own layers (as a PyroModule too)."""
    from pyro.nn.module import to_pyro_module_

    from pyro_gpx.diffusion.drift import DriftNet

    torch.manual_seed(0)
    net = DriftNet(3, hidden=8, depth=2, use_score=True).double()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.5)
    z, score, t = torch.randn(5, 3), 200 * torch.randn(5, 3), 0.3
    emb = net.time_embedding(torch.full((5,), t))
    expected = net.out(net.body(torch.cat([z, emb], -1))) + net.score_gate(emb) * score.clamp(-100, 100)
    torch.testing.assert_close(net.functional()(z, t, score), expected)
    to_pyro_module_(net)
    pyro.clear_param_store()
    out = net.functional()(z, t, score)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def _iaf(dim, seed=0):
    """A float64 affine-autoregressive flow with non-trivial (random) weights."""
    from pyro.distributions.transforms import affine_autoregressive

    torch.manual_seed(seed)
    flow = affine_autoregressive(dim, hidden_dims=[8]).to(torch.float64)
    for p in flow.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return flow


def test_untrained_pis_with_a_flow_is_the_flow_guide(float64):
    # zero drift, sigma = T = 1: y_K ~ N(0, I), so z = f(m + S y) has exactly the flow's density,
    # which is the path density of every sample
    flow = _iaf(3)
    guide = AutoDiffusion(gaussian_model(), num_steps=6, hidden=8, flow=flow, affine="fixed", init_loc_fn=init_to_mean)
    guide()
    with torch.no_grad():
        path = guide.sample_paths(50, keep_path=True)
        flow_guide = dist.TransformedDistribution(dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1),
                                                  [flow])  # fmt: skip
        torch.testing.assert_close(path.z, flow(path.states[:, -1]))
        torch.testing.assert_close(path.log_path, flow_guide.log_prob(path.z), rtol=1e-10, atol=1e-10)


def test_flow_path_density_and_pulled_back_score(float64):
    """With a drift, the flow's log-Jacobian enters the path density at the end point, and the drift
    sees the score of log rho(f(m + S y)) + log|det| in y (checked by central differences)."""
    model = gaussian_model(scale=1.7)
    guide = AutoDiffusion(model, num_steps=5, hidden=8, flow=lambda d: _iaf(d, seed=1))
    guide()
    for p in guide.drift.parameters():
        torch.nn.init.normal_(p, std=0.3)
    guide.loc = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    guide.scale = FULL_FRAME.diagonal().clone()
    with torch.no_grad():
        path = guide.sample_paths(4, keep_path=True)
        y = path.states[:, -1]
        x = guide.loc + guide.scale * y
        z = guide.flow(x)
        without_flow = _reference_log_path_affine(guide, path)
        expected = without_flow - guide.flow.log_abs_det_jacobian(x, z)
    torch.testing.assert_close(path.z, z)
    torch.testing.assert_close(path.log_path, expected, rtol=1e-10, atol=1e-10)

    target = guide.target()

    def pulled_back(y):
        z, log_det = guide.frame(y)
        return target.log_density(z) + log_det

    score = guide.state_score(target, y)
    eps = 1e-6
    with torch.no_grad():
        fd = torch.stack([(pulled_back(y + eps * e) - pulled_back(y - eps * e)) / (2 * eps)
                          for e in torch.eye(3, dtype=torch.float64)], -1)  # fmt: skip
    torch.testing.assert_close(score, fd, rtol=1e-6, atol=1e-6)


def _reference_log_path_affine(guide, path):
    """Per-step path density with the drift fed the flow-frame score (the flow's log-Jacobian excluded)."""
    proc, states, K = guide.process, path.states, guide.process.num_steps
    total = -guide.scale.detach().log().sum().expand(states.shape[0]).clone()
    target = guide.target()
    for k in range(K):
        z, z_next = states[:, k], states[:, k + 1]
        u = guide.drift(z, float(proc.times()[k]), guide.state_score(target, z))
        total += Normal(z + u * proc.dt, proc.sigma * math.sqrt(proc.dt)).log_prob(z_next).sum(-1)
        if k > 0:
            f = k / (k + 1)
            total -= Normal(z_next * f, proc.sigma * math.sqrt(proc.dt * f)).log_prob(z).sum(-1)
    return total


def test_flow_parameters_are_trained(float64):
    model = gaussian_model(scale=2.0)
    guide = AutoDiffusion(model, num_steps=4, hidden=8, flow=lambda d: _iaf(d))
    guide()
    names = [n for n in pyro.get_param_store() if n.startswith("AutoDiffusion.flow")]
    assert names
    for loss in (PathELBO(16), LogVarianceLoss(16)):
        pyro.get_param_store().get_param(names[0]).grad = None
        loss.loss_and_grads(model, guide)
        grads = [pyro.param(n).grad for n in names]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
    with pytest.raises(TypeError, match="flow must be"):
        AutoDiffusion(model, flow=3)
