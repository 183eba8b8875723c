"""Path densities of the PIS, DDS and DIS samplers against independent per-step computations."""

import copy
import math
import re
import warnings

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide.initialization import init_to_mean
from torch.distributions import Normal

from pyro_gpx.diffusion import (
    AutoDiffusion,
    LogVarianceLoss,
    PathELBO,
    UnconstrainedTarget,
    importance_estimate,
    make_process,
)


def gaussian_model(scale=1.0, dim=3):
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(dim, dtype=torch.float64), scale).to_event(1))

    return model


def _frame_matrix(guide):
    """The frame z = loc + S y as a dense S."""
    if guide.affine == "full":
        return guide.scale_tril.detach()
    return torch.diag(guide.scale.detach())


def _dis_betas(num_steps, beta_min, beta_max):
    """DIS's per-step beta: the linear schedule beta(s) = beta_min + s (beta_max - beta_min) at the midpoint
    of each step's noising-time interval [1 - (k+1)/K, 1 - k/K] (its mean over the step)."""
    s_mid = 1.0 - (torch.arange(num_steps, dtype=torch.float64) + 0.5) / num_steps
    return beta_min + s_mid * (beta_max - beta_min)


def _reference_log_path(guide, path, betas=None, grid_power=1.0):
    """L recomputed step by step with torch.distributions, in the frame z = loc + S y (S dense); ``betas``:
    DIS's per-step beta, computed independently; ``grid_power``: PIS's times t_k = T (1 - (1 - k/K)^p)."""
    proc, states = guide.process, path.states
    K = proc.num_steps
    t = [proc.horizon * (1 - (1 - k / K) ** grid_power) for k in range(K + 1)]
    loc, S = guide.loc.detach(), _frame_matrix(guide)
    total = -torch.linalg.slogdet(S).logabsdet.expand(states.shape[0]).clone()
    if proc.kind in ("dds", "dis"):
        total += Normal(0.0, proc.sigma).log_prob(states[:, 0]).sum(-1)
    with torch.no_grad():
        for k in range(K):
            z, z_next = states[:, k], states[:, k + 1]
            score = None
            if guide.drift.use_score:
                score = UnconstrainedTarget(guide, guide._raw_model[0]).score(loc + z @ S.T) @ S
            u = guide.drift(z, t[k] / proc.horizon if proc.kind == "pis" else k / K, score)
            if proc.kind == "pis":  # Brownian bridge back from t_{k+1} to t_k (a point mass at t_0 = 0)
                dt = t[k + 1] - t[k]
                total += Normal(z + u * dt, proc.sigma * math.sqrt(dt)).log_prob(z_next).sum(-1)
                if k > 0:
                    f = t[k] / t[k + 1]
                    total -= Normal(z_next * f, proc.sigma * math.sqrt(dt * f)).log_prob(z).sum(-1)
            elif proc.kind == "dis":
                # Euler-Maruyama: generative drift beta/2 z + sigma^2 beta score, with the network giving
                # score + z / sigma^2; the noising SDE dX = -beta/2 X ds + sigma sqrt(beta) dW stepped backwards
                b, dt, var = float(betas[k]), 1.0 / K, proc.sigma**2 * float(betas[k]) / K
                score = u - z / proc.sigma**2
                mean = z + (0.5 * b * z + proc.sigma**2 * b * score) * dt
                total += Normal(mean, math.sqrt(var)).log_prob(z_next).sum(-1)
                total -= Normal(z_next - 0.5 * b * z_next * dt, math.sqrt(var)).log_prob(z).sum(-1)
            else:
                a = float(proc.alphas[k])
                mean = math.sqrt(1 - a) * z + 2 * proc.sigma**2 * (1 - math.sqrt(1 - a)) * u
                total += Normal(mean, proc.sigma * math.sqrt(a)).log_prob(z_next).sum(-1)
                total -= Normal(math.sqrt(1 - a) * z_next, proc.sigma * math.sqrt(a)).log_prob(z).sum(-1)
    return total


FULL_FRAME = torch.tensor([[0.7, 0.0, 0.0], [0.4, 1.5, 0.0], [-0.3, 0.8, 2.0]], dtype=torch.float64)


@pytest.mark.parametrize("process", ["pis", "pis-grid", "dds", "dis"])
@pytest.mark.parametrize("use_score", [False, True])
@pytest.mark.parametrize("affine", ["diagonal", "full"])
def test_path_log_density_matches_per_step_computation(float64, process, use_score, affine):
    model = gaussian_model(scale=1.7)
    schedule = {"beta_min": 0.3, "beta_max": 8.0} if process == "dis" else {}  # 6 steps: DIS needs beta_max < 12
    grid_power = 2.5 if process == "pis-grid" else 1.0
    if process == "pis-grid":
        process, schedule = "pis", {"grid_power": grid_power, "horizon": 1.7}
    guide = AutoDiffusion(model, process=process, num_steps=6, hidden=8, use_score=use_score, sigma=1.3,
                          affine=affine, **schedule)  # fmt: skip
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
    betas = _dis_betas(6, 0.3, 8.0) if process == "dis" else None
    expected = _reference_log_path(guide, path, betas, grid_power)
    torch.testing.assert_close(path.log_path, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(path.z, guide.loc + path.states[:, -1] @ _frame_matrix(guide).T)
    assert path.states[:, 0].abs().sum() == 0 if process == "pis" else path.states[:, 0].std() > 0


@pytest.mark.parametrize(
    "process, sigma, horizon, grid_power", [("pis", 1.0, 2.0, 1.0), ("pis", 1.2, 2.0, 3.0), ("dds", 1.5, 1.0, 1.0)]
)
def test_untrained_sampler_is_exact_for_its_reference_marginal(float64, process, sigma, horizon, grid_power):
    # zero drift: PIS ends at N(0, sigma^2 T) on any time grid, DDS stays at N(0, sigma^2); for that target
    # every log weight is log Z = 0 and the log-variance loss is exactly zero
    scale = sigma * math.sqrt(horizon) if process == "pis" else sigma
    model = gaussian_model(scale)
    guide = AutoDiffusion(model, process=process, num_steps=10, sigma=sigma, horizon=horizon, hidden=8,
                          init_loc_fn=init_to_mean, grid_power=grid_power)  # fmt: skip
    guide()
    with torch.no_grad():
        path = guide.sample_paths(64)
    torch.testing.assert_close(path.log_weight, torch.zeros(64, dtype=torch.float64), rtol=0, atol=1e-10)
    assert LogVarianceLoss(64).loss(model, guide) < 1e-20
    # the path ratio is exact for any path, so the loss on wider (off-policy) paths is zero too
    states = guide.explore_paths(64, noise_scale=2.5)
    assert states[:, -1].std() > 2.0 * sigma * math.sqrt(horizon if process == "pis" else 1.0)
    assert float(LogVarianceLoss(64, exploration=2.5).differentiable_loss(model, guide).detach()) < 1e-20


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


def _dis_log_weights(process, mean, std, log_z, num_paths):
    """Log weights of DIS paths under the optimal control of the continuous problem, the score of the noised
    target N(mean, std^2) (diagonal): at noising time s it is N(a mean, a^2 std^2 + sigma^2 (1 - a^2)), with
    a = exp(-B(s) / 2), B(s) = int_0^s beta = 0.1 s + 9.95 s^2 (the default schedule)."""
    from pyro_gpx.diffusion import gaussian_log_density

    sigma, K = process.sigma, process.num_steps
    eps = torch.randn(num_paths, K + 1, mean.shape[-1])
    y, log_path = process.initial(eps[:, 0])
    for k in range(K):
        s = 1.0 - k / K
        a = math.exp(-0.5 * (0.1 * s + 9.95 * s**2))
        score = -(y - a * mean) / (a**2 * std**2 + sigma**2 * (1 - a**2))
        y_next, log_f, log_b = process.step(k, y, score + y / sigma**2, eps[:, k + 1])
        log_path = log_path + log_f + gaussian_log_density(eps[:, k + 1], torch.zeros_like(y), 1.0) - log_b
        y = y_next
    return Normal(mean, std).log_prob(y).sum(-1) + log_z - log_path


def test_dis_with_the_optimal_control_is_consistent_on_a_gaussian(float64):
    # target Z N(mean, std^2) in 2-d, log Z = 0.7; the discrete path KL (log Z - ELBO) is >= 0 and vanishes as
    # the Euler-Maruyama steps shrink (gaps 0.12-0.14 at 16 steps, 0.012-0.020 at 64 over 20 seeds, Monte Carlo
    # sd <= 0.01; with each kernel's beta at the start of its own step instead, 6 nats at 32 steps)
    mean, std, log_z = torch.tensor([1.0, -0.5]), torch.tensor([0.6, 1.4]), 0.7
    gaps = {}
    for K in (16, 64):
        torch.manual_seed(K)
        log_w = _dis_log_weights(make_process("dis", K), mean, std, log_z, 4000)
        gaps[K] = log_z - float(log_w.mean())
        assert 0 < gaps[K] < 0.25
        # the importance-sampled log Z: unbiased in Z, so within a few standard errors of the truth
        log_z_hat = torch.logsumexp(log_w, 0) - math.log(4000)
        stderr = float(torch.exp(log_w - log_z_hat).std()) / math.sqrt(4000)
        assert stderr < 0.015 and abs(float(log_z_hat) - log_z) < 4 * stderr
    assert gaps[64] < 0.3 * gaps[16]  # 1/4 at first order; about 1/8 seen


def test_untrained_dis_guide_evidence_and_rescored_paths(float64):
    # zero network: the Euler-Maruyama OU chain (not exactly stationary, so the weights vary even though the
    # frame maps the target close to N(0, sigma^2)); the importance-sampled log Z is still within Monte Carlo
    # error of the truth and the ELBO below it
    def model():
        pyro.sample("x", dist.Normal(torch.tensor([1.0, -0.5]), torch.tensor([1.2, 0.8])).to_event(1))
        pyro.factor("c", torch.tensor(0.7))

    guide = AutoDiffusion(model, process="dis", num_steps=16, hidden=8)
    guide()
    est = guide.log_normalizer(10000, batch_size=10000)
    assert est["elbo"] < 0.7 and est["ess"] > 2000  # ELBO 0.29-0.52, ESS 3500-6800 over 10 seeds
    assert abs(est["log_z"] - 0.7) < 4 * est["stderr"] and est["stderr"] < 0.02
    # the log-variance loss's re-scoring (forward/backward_log_density) agrees with the simulation's densities
    for p in guide.drift.parameters():
        torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():
        path = guide.sample_paths(8, keep_path=True)
        rescored = guide.rescore_paths(path.states)
    torch.testing.assert_close(rescored.log_path, path.log_path, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rescored.log_weight, path.log_weight, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("process, affine", [("pis", "diagonal"), ("pis", "full"), ("dis", "diagonal")])
def test_gradients_reach_the_drift(float64, process, affine):
    model = gaussian_model(scale=2.0)
    schedule = {"beta_max": 8.0} if process == "dis" else {}
    guide = AutoDiffusion(model, process=process, num_steps=5, hidden=8, affine=affine, **schedule)
    guide()
    frame = "AutoDiffusion.scale_tril" if affine == "full" else "AutoDiffusion.scale"
    for loss in (PathELBO(16), LogVarianceLoss(16)):
        guide.drift.zero_grad()
        loss.loss_and_grads(model, guide)
        grads = [p.grad for p in guide.drift.out.parameters()]
        grads += [pyro.param("AutoDiffusion.loc").grad, pyro.param(frame).unconstrained().grad]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("process", ["pis", "dis"])
def test_trace_elbo_uses_the_path_ratio(float64, process):
    model = gaussian_model(scale=1.0)
    schedule = {"beta_max": 7.0} if process == "dis" else {}
    guide = AutoDiffusion(model, process=process, num_steps=4, hidden=8, use_score=False, **schedule)
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
    with pytest.raises(ValueError, match="process must be 'pis', 'dds' or 'dis'"):
        make_process("ddpm", 4)
    for exploration in (0.0, float("inf")):  # inf failed later as 'the drift overflowed'
        with pytest.raises(ValueError, match="exploration must be a finite positive number"):
            LogVarianceLoss(8, exploration=exploration)
    with pytest.raises(ValueError, match="grid_power=9.0 with num_steps=64"):
        make_process("pis", 64, grid_power=9.0)  # the last step rounded to 0: 'math domain error'
    for kind in ("pis", "dds"):
        for sigma in (1e-200, 1e160):  # 'math domain error' and OverflowError
            with pytest.raises(ValueError, match=re.escape(f"sigma={sigma!r} with horizon=1.0")):
                make_process(kind, 8, sigma=sigma)
    tiny = make_process("dds", 8, beta_min=1e-300, beta_max=1e-300)  # 1 - exp(-b) rounded the alphas to 0
    assert (tiny.alphas > 0).all()
    for bad in (torch.zeros(0), torch.tensor([float("nan"), 0.0]), torch.zeros(2, 2)):
        with pytest.raises(ValueError, match="log_weights"):
            importance_estimate(bad)  # NaN gave log_z nan, an empty tensor 'math domain error'
    with pytest.raises(ValueError, match="affine must be"):
        AutoDiffusion(gaussian_model(), affine="dense")
    with pytest.raises(ValueError, match="num_steps must be an integer"):
        AutoDiffusion(gaussian_model(), num_steps=2.5)  # was silently truncated to 2
    with pytest.raises(ValueError, match="sigma must be a positive finite"):
        AutoDiffusion(gaussian_model(), sigma=float("nan"))  # NaN passed `sigma <= 0`
    with pytest.raises(ValueError, match="init_scale must be a positive finite"):
        AutoDiffusion(gaussian_model(), init_scale=float("nan"))
    with pytest.raises(ValueError, match="horizon applies to the PIS process only"):
        AutoDiffusion(gaussian_model(), process="dds", horizon=5.0)  # was silently ignored
    with pytest.raises(ValueError, match="horizon applies to the PIS process only; DIS"):
        AutoDiffusion(gaussian_model(), process="dis", horizon=0.5)
    assert AutoDiffusion(gaussian_model(), process="dis", horizon=1.0).process.horizon == 1.0
    with pytest.raises(ValueError, match="beta_min and beta_max"):
        make_process("dis", 64, beta_max=float("inf"))
    with pytest.raises(ValueError, match="DIS's Euler-Maruyama steps overshoot"):
        make_process("dis", 9)  # the first step's mean beta, 18.9, times dt = 1/9 exceeds 2
    assert make_process("dis", 10).betas.shape == (10,)
    assert make_process("dis", 4, beta_max=7.0).num_steps == 4
    assert AutoDiffusion(gaussian_model(), process="dds", horizon=1.0).process.horizon == 1.0
    assert AutoDiffusion(gaussian_model(), horizon=2.0).process.horizon == 2.0
    with pytest.raises(ValueError, match="beta_min and beta_max"):
        make_process("dds", 4, beta_min=float("nan"))
    with pytest.raises(ValueError, match="grid_power must be a finite number >= 1"):
        AutoDiffusion(gaussian_model(), grid_power=0.5)
    with pytest.raises(ValueError, match="grid_power applies to the PIS process only"):
        make_process("dds", 8, grid_power=2.0)
    grid = make_process("pis", 4, horizon=2.0, grid_power=2.0).grid  # t_k = T (1 - (1 - k/K)^2)
    torch.testing.assert_close(grid, torch.tensor([0.0, 0.875, 1.5, 1.875, 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="num_paths must be an integer >= 1"):
        AutoDiffusion(gaussian_model(), num_steps=2, hidden=4).log_normalizer(0)
    with pytest.raises(ValueError, match="num_paths must be an integer >= 1"):
        AutoDiffusion(gaussian_model(), num_steps=2, hidden=4).sample_paths(2.0)
    for name, value in (("hidden", 16.0), ("depth", 0)):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
            AutoDiffusion(gaussian_model(), **{name: value})  # failed only at the first call, cryptically
    with pytest.raises(ValueError, match="drift_clip must be a positive finite number"):
        AutoDiffusion(gaussian_model(), drift_clip=float("inf"))  # inf * tanh(0) is NaN
    for name, value in (("use_score", "no"), ("use_score", None), ("vectorized", "yes"), ("vectorized", 1)):
        with pytest.raises(TypeError, match=f"{name} must be True or False"):
            AutoDiffusion(gaussian_model(), **{name: value})  # the string "no" turned the score on
    assert AutoDiffusion(gaussian_model(), use_score=torch.tensor(False))._net_config["use_score"] is False

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
    for num_paths in (0, 2.5, float("nan"), True):
        with pytest.raises(ValueError, match="num_paths must be an integer >= 1"):
            PathELBO(num_paths)
    with pytest.raises(ValueError, match="num_paths must be an integer >= 2"):
        LogVarianceLoss(1)


@pytest.mark.parametrize("process", ["pis", "dds"])
def test_float32_path_ratio_of_the_reference_is_zero_to_rounding(process):
    """With zero drift the sampler's path law is the reference's, so every log weight for the reference's
    terminal marginal is 0; float32 sums of about K D terms each left up to 0.05 (PIS, D = 1000,
    K = 256), now accumulated in float64."""
    D = 1000

    def model32():
        pyro.sample("x", dist.Normal(torch.zeros(D), 1.0).to_event(1))

    guide = AutoDiffusion(model32, process=process, num_steps=128, hidden=4, init_loc_fn=init_to_mean)
    guide()
    with torch.no_grad():
        path = guide.sample_paths(16)
    assert path.log_weight.dtype == torch.float32
    assert float(path.log_weight.abs().max()) < 1e-3
    # Trace_ELBO: the Delta's log density less the noise site's, which the ELBO adds back (0.07 per particle)
    for _ in range(4):
        assert abs(Trace_ELBO().loss(model32, guide)) < 1e-3


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


def test_drift_functional_with_precomputed_times_matches_per_call(float64):
    """Given the step times, the time terms are computed once; calls at those times (and at others, and
    on batched latents) give the same drift and gradients as the per-call forward pass."""
    from pyro_gpx.diffusion.drift import DriftNet

    torch.manual_seed(1)
    net = DriftNet(3, hidden=8, depth=3, use_score=True, drift_clip=2.0).double()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.5)
    times = torch.arange(4, dtype=torch.float64) / 4
    z, score = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    fast, slow = net.functional(times), net.functional()
    for t in [*times.tolist(), 0.6]:
        torch.testing.assert_close(fast(z, t, score), slow(z, t, score))
        torch.testing.assert_close(fast(z[0], t, score[0]), slow(z[0], t, score[0]))
    grads = [torch.autograd.grad(f(z[0], 0.25, score[0]).sum(), list(net.parameters())) for f in (fast, slow)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kind, options", [("pis", {}), ("pis", {"grid_power": 2.0}), ("dds", {}), ("dis", {"beta_max": 8.0})]
)
def test_vectorised_path_ratio_equals_the_sum_of_steps(float64, kind, options):
    process = make_process(kind, 6, sigma=1.3, **options)
    torch.manual_seed(2)
    eps = torch.randn(4, 7, 3)
    y, _ = process.initial(eps[:, 0])
    states, expected, expected_backward = [y], torch.zeros(4), torch.zeros(4)
    for k in range(6):
        drift = torch.sin(3 * y) + k  # any drift
        y_next, log_f, log_b = process.step(k, y, drift, eps[:, k + 1])
        expected += log_f + Normal(0.0, 1.0).log_prob(eps[:, k + 1]).sum(-1) - log_b
        expected_backward += log_b
        torch.testing.assert_close(process.advance(k, y, drift, eps[:, k + 1]), y_next)
        states.append(y := y_next)
    states = torch.stack(states, 1)
    torch.testing.assert_close(process.path_log_ratio(states, eps[:, 1:]), expected)
    torch.testing.assert_close(process.path_backward_log_density(states), expected_backward)


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


def test_trace_elbo_names_the_sites_of_a_non_finite_path(float64):
    # an overflowing drift: Trace_ELBO returned inf silently, PathELBO raised naming the site
    def model():
        pyro.sample("a", dist.Normal(torch.zeros(1), 1.0).to_event(1))
        pyro.sample("b", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    guide = AutoDiffusion(model, num_steps=1, horizon=2.0, hidden=4, use_score=False)
    guide()
    with torch.no_grad():
        guide.drift.out.bias[1:] = 1e308  # only b's coordinates overflow: z = drift * dt + noise
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    with pytest.raises(FloatingPointError, match=r"site\(s\) 'b' is not finite \(the drift overflowed"):
        svi.step()
    with torch.no_grad():
        guide.drift.out.bias.fill_(0.0)
        guide.scale = torch.tensor([float("nan"), 1.0, 1.0])  # as after a step on a non-finite loss
    with pytest.raises(FloatingPointError, match="'a' is not finite .*parameters scale_unconstrained"):
        svi.step()
    pyro.clear_param_store()  # the store holds the first guide's overflowing drift
    scored = AutoDiffusion(model, num_steps=3, horizon=2.0, hidden=4)  # the score at a huge state: not the model
    scored()
    with torch.no_grad():
        scored.drift.out.bias[1:] = 1e308
    with pytest.raises(FloatingPointError, match=r"at step 1 of the sampler's SDE.*the drift overflowed"):
        PathELBO(4).loss(model, scored)


def test_score_of_a_blocked_model_warns(float64):
    from pyro.infer.autoguide import AutoDelta, AutoGuideList

    def model():
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(mu, s).to_event(1), obs=torch.ones(2))

    guide = AutoGuideList(model)
    guide.append(AutoDiffusion(poutine.block(model, hide=["s"]), num_steps=2, hidden=4))  # use_score=True
    guide.append(AutoDelta(poutine.block(model, expose=["s"])))
    with pytest.warns(UserWarning, match="blocked model.*use_score=False"):
        warnings.simplefilter("ignore", RuntimeWarning)  # s is redrawn inside the model: it cannot be batched
        guide()
    for use_score, blocked in ((True, True), (False, True), (True, False)):
        pyro.clear_param_store()
        guide = AutoDiffusion(poutine.block(model, expose=["mu"]) if blocked else model, num_steps=2, hidden=4,
                              use_score=use_score)  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            guide()
        warned = any("blocked model" in str(w.message) for w in caught)
        assert warned == (use_score and blocked)  # on its own, built on a model exposing one site


def _conditioned_gaussian(y):
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 2.0).to_event(1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0).to_event(1), obs=y)


@pytest.mark.parametrize("route", ["param_store", "state_dict", "state_dict_after_call"])
@pytest.mark.parametrize("flow", [False, True])
def test_save_and_reload_into_a_fresh_guide_gives_the_same_paths(float64, tmp_path, route, flow):
    y = torch.randn(6, 2) + 1.0

    def build():
        return AutoDiffusion(_conditioned_gaussian, num_steps=3, hidden=8, flow=(lambda d: _iaf(d)) if flow else None)

    guide = build()
    svi = SVI(_conditioned_gaussian, guide, pyro.optim.Adam({"lr": 5e-2}), PathELBO(8))
    for _ in range(3):
        svi.step(y)
    pyro.set_rng_seed(5)
    expected = guide.sample_paths(4, y)
    path = tmp_path / "saved.pt"
    if route == "param_store":
        pyro.get_param_store().save(path)
    else:
        torch.save(guide.state_dict(), path)
    pyro.clear_param_store()
    pyro.set_rng_seed(123)  # a fresh guide: other initial weights
    fresh = build()
    if route == "param_store":
        fresh(y)
        pyro.get_param_store().load(path)
    elif route == "state_dict":
        fresh.load_state_dict(torch.load(path))  # before the first call: loaded once set up
        fresh(y)
    else:
        fresh(y)
        fresh.load_state_dict(torch.load(path))
    pyro.set_rng_seed(5)
    actual = fresh.sample_paths(4, y)
    torch.testing.assert_close(actual.z, expected.z, rtol=0, atol=0)
    torch.testing.assert_close(actual.log_weight, expected.log_weight, rtol=0, atol=0)
    # and training goes on from the loaded values, on the store's tensors
    svi = SVI(_conditioned_gaussian, fresh, pyro.optim.Adam({"lr": 5e-2}), PathELBO(8))
    before = fresh.drift.out.weight.detach().clone()
    svi.step(y)
    assert (fresh.drift.out.weight - before).abs().sum() > 0
    assert fresh.drift.out.weight is pyro.get_param_store().get_param("AutoDiffusion.drift.out.weight").unconstrained()


def test_a_reloaded_guide_whose_first_call_has_no_targets_says_so(float64, tmp_path):
    def regression(x, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(x @ w, 0.3), obs=y)

    x, y = torch.randn(10, 2), torch.randn(10)
    guide = AutoDiffusion(regression, num_steps=2, hidden=4)
    guide(x, y)
    torch.save(guide.state_dict(), tmp_path / "guide.pt")
    pyro.clear_param_store()
    fresh = AutoDiffusion(regression, num_steps=2, hidden=4)
    fresh.load_state_dict(torch.load(tmp_path / "guide.pt"))
    with pytest.raises(ValueError, match="call the guide first with the training data"):  # was a size mismatch
        fresh(x)


@pytest.mark.parametrize("first_call", [False, True])
def test_a_state_loaded_into_a_guide_with_other_process_settings_is_refused(float64, first_call):
    """No parameter shape records the process, its steps, sigma or time grid: a state loaded under other
    settings ran silently (log weights off by 7e8 for 'dds')."""
    y = torch.randn(6, 2) + 1.0
    guide = AutoDiffusion(_conditioned_gaussian, num_steps=3, hidden=4)
    guide(y)
    state = guide.state_dict()
    assert state["_extra_state"]["num_steps"] == 3
    for kwargs in ({"process": "dds"}, {"num_steps": 4}, {"sigma": 2.0}, {"grid_power": 2.0}):
        pyro.clear_param_store()
        other = AutoDiffusion(_conditioned_gaussian, **{"num_steps": 3, "hidden": 4, **kwargs})
        if first_call:
            other(y)
        name = next(iter(kwargs))
        with pytest.raises(ValueError, match=f"trained with {name}=.*build the guide with the saved ones"):
            other.load_state_dict(state)
    pyro.clear_param_store()
    same = AutoDiffusion(_conditioned_gaussian, num_steps=3, hidden=4)
    same.load_state_dict(state)
    # settings in effect, not as passed: the default horizon given explicitly, and a beta schedule, which
    # a PIS guide has none of (both were refused)
    for kwargs in ({"horizon": 1.0}, {"beta_max": 10.0}):
        pyro.clear_param_store()
        AutoDiffusion(_conditioned_gaussian, **{"num_steps": 3, "hidden": 4, **kwargs}).load_state_dict(state)


def test_a_reloaded_guide_first_evaluated_without_gradients_warns_unless_given_its_data(float64, tmp_path):
    """Its first call sets the data it samples the posterior of: under no_grad (an evaluation, e.g.
    to_inference_data on test data) that may be held-out data, so it warns; set_training_data does not."""
    y = torch.randn(6, 2) + 1.0
    guide = AutoDiffusion(_conditioned_gaussian, num_steps=2, hidden=4)
    guide(y)
    torch.save(guide.state_dict(), tmp_path / "guide.pt")
    for first in ("evaluation", "set_training_data"):
        pyro.clear_param_store()
        fresh = AutoDiffusion(_conditioned_gaussian, num_steps=2, hidden=4)
        fresh.load_state_dict(torch.load(tmp_path / "guide.pt"))
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if first == "set_training_data":
                fresh.set_training_data(y)
            fresh(y + 5.0)
        loaded = [w for w in caught if "loaded AutoDiffusion guide" in str(w.message)]
        assert len(loaded) == (first == "evaluation")


def test_log_variance_loss_trains_under_svi(float64):
    # its paths were re-scored outside the guide's Pyro context, so SVI saw no parameters and stepped none
    model = gaussian_model(scale=2.0)
    guide = AutoDiffusion(model, num_steps=3, hidden=8)
    guide()
    before = {name: p.detach().clone() for name, p in pyro.get_param_store().named_parameters()}
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), LogVarianceLoss(8))
    svi.step()
    after = dict(pyro.get_param_store().named_parameters())
    changed = {name for name, value in before.items() if (after[name] - value).abs().sum() > 0}
    # the hidden layers get gradients once the zero-initialised output layer has moved
    assert {"AutoDiffusion.loc", "AutoDiffusion.scale", "AutoDiffusion.drift.out.weight"} <= changed


def test_log_variance_loss_refuses_model_parameters_and_log_z_needs_all_the_data(float64):
    def empirical_bayes(y, subsample_size=None):
        s = pyro.param("prior_scale", torch.tensor(1.0), constraint=dist.constraints.positive)
        mu = pyro.sample("mu", dist.Normal(0.0, s))
        with pyro.plate("data", len(y), subsample_size=subsample_size) as idx:
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y[idx])

    y = torch.linspace(-1, 3, 40)
    guide = AutoDiffusion(empirical_bayes, num_steps=3, hidden=8)
    with pytest.raises(ValueError, match=r"trainable Pyro parameters \['prior_scale'\].*PathELBO"):
        SVI(empirical_bayes, guide, pyro.optim.Adam({"lr": 1e-2}), LogVarianceLoss(8)).step(y)
    SVI(empirical_bayes, guide, pyro.optim.Adam({"lr": 1e-2}), PathELBO(8)).step(y, 10)  # minibatches train
    assert math.isfinite(guide.log_normalizer(16, y)["log_z"])
    # a scaled minibatch likelihood inside a mean of weights is no estimate of Z (it was tens of nats off)
    with pytest.raises(ValueError, match=r"full-data likelihood.*'data' \(10 of 40\)"):
        guide.log_normalizer(16, y, 10)

    # the log-variance loss on minibatches: their noise adds E_b Var_q(n_b), which a narrower sampler makes
    # smaller (a family holding the exact posterior trained to 0.35 times its sd), so it is refused
    def plain(y, subsample_size=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y), subsample_size=subsample_size) as idx:
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y[idx])

    guide = AutoDiffusion(plain, num_steps=3, hidden=8)
    svi = SVI(plain, guide, pyro.optim.Adam({"lr": 1e-2}), LogVarianceLoss(8))
    assert math.isfinite(svi.step(y)) and math.isfinite(svi.step(y, 40))  # all the data
    with pytest.raises(
        ValueError, match=r"LogVarianceLoss needs the full-data likelihood.*'data' \(10 of 40\).*PathELBO"
    ):
        svi.step(y, 10)
    with pytest.raises(ValueError, match="LogVarianceLoss needs the full-data likelihood"):
        svi.evaluate_loss(y, 10)


def test_path_sample_attributes_and_one_weight():
    from pyro_gpx.diffusion import importance_estimate
    from pyro_gpx.diffusion.guide import PathSample

    path = PathSample(z=torch.zeros(2, 1))
    assert not hasattr(path, "log_weight") and getattr(path, "log_weight", None) is None
    assert copy.deepcopy(path).z.shape == (2, 1)
    assert importance_estimate(torch.tensor([0.3]))["stderr"] == math.inf  # no spread to estimate, not NaN


def test_importance_estimate_matches_numpy():
    import numpy as np

    from pyro_gpx.diffusion import importance_estimate

    log_w = torch.tensor([-1.0, 0.5, -3.0, 2.0, 0.0], dtype=torch.float64)
    w = np.exp(log_w.numpy())
    est = importance_estimate(log_w)
    assert est["log_z"] == pytest.approx(np.log(w.mean()), rel=1e-12)
    assert est["stderr"] == pytest.approx(w.std(ddof=1) / (np.sqrt(5) * w.mean()), rel=1e-12)
    assert est["ess"] == pytest.approx(w.sum() ** 2 / (w**2).sum(), rel=1e-12)
    assert est["elbo"] == pytest.approx(float(log_w.mean()), rel=1e-12) and est["num_paths"] == 5
