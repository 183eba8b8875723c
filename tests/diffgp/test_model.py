"""The DiffGP model: its exact SVGP limit, KL terms against GPyTorch, hyperparameters that reach the
likelihood, gradients, shapes, seeds and bad input (float64)."""

import math

import gpytorch
import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_gpx.diffgp import DifferentialGP, FlowKernel, InducingNormal, default_flow_kernel, predict


def _data(n=30, d=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return X, torch.sin(2 * X[:, 0]) + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)


def _log_lik(model, X, y, data):
    tr = poutine.trace(poutine.condition(model, data)).get_trace(X, y)
    site = tr.nodes["y"]
    return (site["fn"].log_prob(site["value"]) * site["scale"]).sum(), tr.nodes["_RETURN"]["value"]


class _SVGP(gpytorch.models.ApproximateGP):
    def __init__(self, Z, kernel):
        q = gpytorch.variational.CholeskyVariationalDistribution(Z.shape[0])
        super().__init__(gpytorch.variational.VariationalStrategy(self, Z, q, learn_inducing_locations=False))
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(torch.zeros_like(x[:, 0]), self.covar_module(x))


def test_zero_flow_is_the_svgp_output_layer(float64):
    """Zero drift and diffusion (u_f = 0, vanishing flow kernel): expected log-likelihood and KL equal
    GPyTorch's SVGP with the same inducing points, kernel and q(u_g)."""
    X, y = _data()
    flow = FlowKernel(2, default_flow_kernel(2, outputscale=1e-30))
    model = DifferentialGP(X, num_inducing=6, flow=flow, noise=0.05, num_paths=3)
    M = model.output_Z.shape[0]
    gen = torch.Generator().manual_seed(1)
    m = 0.5 * torch.randn(M, generator=gen, dtype=torch.float64)
    Lq = torch.tril(0.3 * torch.randn(M, M, generator=gen, dtype=torch.float64), -1) + torch.diag(
        torch.rand(M, generator=gen, dtype=torch.float64) + 0.2)  # fmt: skip
    # the model's log-likelihood is quadratic in u_g: its mean over the 2M sigma points m +- sqrt(M) L e_j is
    # the exact expectation under q(u_g) = N(m, L L^T)
    total = 0.0
    for j in range(M):
        for sign in (1.0, -1.0):
            u_g = (m + sign * math.sqrt(M) * Lq[:, j]).unsqueeze(0)
            ll, out = _log_lik(model, X, y, {"flow_inducing": torch.zeros(2, 6), "output_inducing": u_g})
            total = total + ll / (2 * M)
    torch.testing.assert_close(out.x_T, X.expand_as(out.x_T), rtol=0, atol=1e-8)
    svgp = _SVGP(model.output_Z.detach(), model.output_kernel).double()
    svgp.variational_strategy.variational_params_initialized.fill_(1)  # keep the values set below
    svgp.variational_strategy._variational_distribution.variational_mean.data = m
    svgp.variational_strategy._variational_distribution.chol_variational_covar.data = Lq
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    likelihood.noise = 0.05
    # GPyTorch adds its jitter (1e-6) to the predictive variance of every data point as well
    expected = likelihood.expected_log_prob(y, svgp(X)).sum() + len(y) * 1e-6 / (2 * 0.05)
    torch.testing.assert_close(total, expected, rtol=1e-7, atol=1e-7)
    # the KL term: our guide's closed form against GPyTorch's
    guide = InducingNormal(poutine.block(model, expose=["output_inducing"]))
    guide(X, y)
    guide.locs.output_inducing = m.unsqueeze(0)
    guide.scale_trils.output_inducing = Lq.unsqueeze(0)
    torch.testing.assert_close(guide.kl_divergence(), svgp.variational_strategy.kl_divergence(), rtol=1e-10, atol=1e-10)


def test_mean_field_elbo_uses_the_closed_form_kl(float64):
    X, y = _data()
    model = DifferentialGP(X, num_inducing=5, num_paths=2, num_steps=4)
    guide = InducingNormal(model, init_scale=0.3)
    guide(X, y)
    pyro.set_rng_seed(3)
    loss = TraceMeanField_ELBO().differentiable_loss(model, guide, X, y)
    pyro.set_rng_seed(3)
    tr = poutine.trace(guide).get_trace(X, y)
    ll, _ = _log_lik(model, X, y, {k: tr.nodes[k]["value"] for k in ("flow_inducing", "output_inducing")})
    torch.testing.assert_close(loss, guide.kl_divergence() - ll, rtol=1e-8, atol=1e-8)


def test_kl_of_a_site_with_one_event_dimension(float64):
    # a single row (M,): the guide's posterior is the MultivariateNormal itself, without an Independent around it
    def model():
        pyro.sample("u", dist.MultivariateNormal(torch.zeros(3), torch.eye(3)))

    guide = InducingNormal(model, init_scale=0.5)
    guide()
    expected = 0.5 * (3 * 0.25 - 3 - 3 * math.log(0.25))
    torch.testing.assert_close(guide.kl_divergence(), torch.tensor(expected), rtol=1e-10, atol=1e-10)


def _bayesian_model(X, **kw):
    flow = FlowKernel(
        X.shape[1], lengthscale_prior=dist.LogNormal(0.0, 1.0), outputscale_prior=dist.LogNormal(-2.0, 1.0)
    )
    return DifferentialGP(X, num_inducing=5, flow=flow, num_paths=2, num_steps=6, **kw)


def test_sampled_hyperparameters_enter_the_flow(float64):
    """The likelihood changes with theta, and at theta0 it equals the point model whose kernel holds theta0."""
    X, y = _data()
    model = _bayesian_model(X)
    u = {"flow_inducing": 0.5 * torch.randn(2, 5), "output_inducing": torch.randn(1, 5)}
    ls0, os0 = torch.full((2, 2), 0.8), torch.full((2,), 0.3)
    lls = []
    for scale in (1.0, 3.0):
        pyro.set_rng_seed(7)
        lls.append(_log_lik(model, X, y, {**u, "flow.lengthscale": scale * ls0, "flow.outputscale": os0})[0])
    assert abs(float(lls[0] - lls[1])) > 1e-3
    pyro.clear_param_store()  # the point model's kernel would take the first model's stored tensors
    point = DifferentialGP(X, num_inducing=5, flow=default_flow_kernel(2), num_paths=2, num_steps=6)
    point.flow.kernel.base_kernel.lengthscale = ls0.unsqueeze(-2)
    point.flow.kernel.outputscale = os0
    pyro.set_rng_seed(7)
    ll_point, _ = _log_lik(point, X, y, u)
    torch.testing.assert_close(ll_point, lls[0], rtol=1e-9, atol=1e-9)


def test_gradients_reach_inducing_inputs_outputs_and_hyperparameters(float64):
    X, y = _data()
    model = _bayesian_model(X)
    values = {"flow_inducing": 0.5 * torch.randn(2, 5), "output_inducing": torch.randn(1, 5),
              "flow.lengthscale": torch.full((2, 2), 0.8), "flow.outputscale": torch.full((2,), 0.3)}  # fmt: skip
    for v in values.values():
        v.requires_grad_(True)
    ll, _ = _log_lik(model, X, y, values)
    ll.backward()
    for name, v in values.items():
        assert v.grad is not None and v.grad.abs().sum() > 0, name
    params = dict(pyro.get_param_store().named_parameters())  # unconstrained tensors
    ll, _ = _log_lik(model, X, y, {k: v.detach() for k, v in values.items()})
    names = [
        "flow_Z",
        "output_Z",
        "noise",
        "output_kernel$$$base_kernel.raw_lengthscale",
        "output_kernel$$$raw_outputscale",
    ]
    grads = torch.autograd.grad(ll, [params[n] for n in names], allow_unused=True)
    for name, grad in zip(names, grads):
        assert grad is not None and grad.abs().sum() > 0, name


def test_shapes_with_particles_and_seeded_determinism(float64):
    X, y = _data(n=12, d=3)
    model = _bayesian_model(X)
    with pyro.plate("particles", 4, dim=-3):
        tr = poutine.trace(model).get_trace(X)
    out = tr.nodes["_RETURN"]["value"]
    assert out.loc.shape == (4, 2, 12, 1) and out.x_T.shape == (4, 2, 12, 3)
    assert tr.nodes["y"]["value"].shape == (4, 2, 12)
    path = model(X, keep_path=True).path
    assert path.shape == (7, 2, 12, 3)
    runs = []
    for _ in range(2):
        pyro.set_rng_seed(11)
        runs.append(model(X).loc)
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    # the model runs under vectorised particles (the shape safety Pyro's ELBOs and AutoDiffusion rely on)
    elbo = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=2)
    assert math.isfinite(elbo.loss(model, AutoNormal(model), X, y))


def test_svi_trains_and_predicts(float64):
    X, y = _data(n=60, d=1)
    model = DifferentialGP(X, num_inducing=10, num_paths=3, num_steps=5, noise=0.1)
    guide = InducingNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.03}), TraceMeanField_ELBO())
    losses = [svi.step(X, y) for _ in range(150)]
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    pred = predict(model, guide, X, num_samples=5)
    assert pred.loc.shape == (15, 60)
    assert float(((pred.mean - y) ** 2).mean()) < 0.1 * float(y.var())
    lpd = pred.log_density(y)
    assert lpd.shape == (60,) and torch.isfinite(lpd).all()
    samples = Predictive(model, guide=guide, num_samples=4, return_sites=["y"])(X)["y"]
    assert samples.shape == (4, 3, 60)


def test_classification_likelihoods(float64):
    X, _ = _data(n=20)
    labels = (X[:, 0] > 0).long()
    model = DifferentialGP(X, num_inducing=4, num_paths=2, num_steps=3, likelihood="categorical", num_classes=3)
    guide = InducingNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    assert math.isfinite(svi.step(X, labels))
    probs = predict(model, guide, X, num_samples=2).probs
    torch.testing.assert_close(probs.sum(-1), torch.ones(20, dtype=torch.float64))
    prediction = predict(model, guide, X, num_samples=2)
    with pytest.raises(ValueError, match="integer class labels"):
        prediction.log_density(torch.full((20,), 0.7, dtype=torch.float64))
    for bad in (5, -1):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
            prediction.log_density(torch.full((20,), bad))
    with pytest.raises(ValueError, match=r"shape \(20,\)"):
        prediction.log_density(labels[:5])
    for bad in (0, -1, float("nan"), True):
        with pytest.raises(ValueError, match="mc_samples must be a positive integer"):
            predict(model, guide, X, mc_samples=bad)
    with pytest.raises(ValueError, match="the guide has not run yet"):
        predict(model, InducingNormal(model), X)
    pyro.clear_param_store()
    binary = DifferentialGP(X, num_inducing=4, num_paths=2, num_steps=3, likelihood="bernoulli")
    binary_svi = SVI(binary, InducingNormal(binary), pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    assert math.isfinite(binary_svi.step(X, labels.double()))
    assert math.isfinite(binary_svi.step(X, labels))  # integer 0/1 labels too (they failed inside Bernoulli)
    with pytest.raises(ValueError, match="labels"):
        model(X, torch.full((20,), 3))
    with pytest.raises(ValueError, match="0/1"):
        binary(X, torch.full((20,), 2.0))


def test_bad_input(float64):
    X, y = _data()
    with pytest.raises(ValueError, match="horizon"):
        DifferentialGP(X, horizon=0.0)
    with pytest.raises(ValueError, match="num_steps"):
        DifferentialGP(X, num_steps=0)
    for kwargs, name in (({"num_steps": True}, "num_steps"), ({"num_paths": 2.5}, "num_paths"),
                         ({"num_inducing": True}, "num_inducing"), ({"output_inducing": 0}, "output_inducing"),
                         ({"jitter": -1.0}, "jitter"), ({"jitter": float("nan")}, "jitter")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            DifferentialGP(X, **kwargs)
    with pytest.raises(ValueError, match="NaN"):
        DifferentialGP(torch.full((5, 2), float("nan")))
    with pytest.raises(ValueError, match="dimension"):
        DifferentialGP(X, flow=FlowKernel(3))
    with pytest.raises(ValueError, match="flow has dtype torch.float64 but init_inputs are torch.float32"):
        DifferentialGP(X.float(), flow=FlowKernel(2))
    model = DifferentialGP(X, num_inducing=4, num_paths=1, num_steps=2)
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        model(torch.randn(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        model(torch.full((5, 2), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        model(X, y[:-1])
    with pytest.raises(ValueError, match="num_data"):
        model(X, y, num_data=3)
    for bad in (float("nan"), 25.9):  # NaN failed converting to int, 25.9 was truncated to 25
        with pytest.raises(ValueError, match="num_data must be a positive integer"):
            model(X, y, num_data=bad)
    with pytest.raises(ValueError, match="num_classes"):
        DifferentialGP(X, likelihood="categorical", num_classes=2.5)
    with pytest.raises(ValueError, match="output_kernel's batch shape"):  # it ran, and used output 0 alone
        DifferentialGP(X, output_kernel=gpytorch.kernels.RBFKernel(batch_shape=torch.Size([2])).double())
    with pytest.raises(ValueError, match="init_scale"):
        InducingNormal(model, init_scale=float("inf"))


def test_param_store_round_trip_restores_and_keeps_training_the_kernels(float64, tmp_path):
    X, y = _data(n=20, d=2)

    def build():
        model = DifferentialGP(X, num_inducing=5, num_paths=2, num_steps=3, noise=0.1)
        return model, InducingNormal(model)

    model, guide = build()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    for _ in range(5):
        svi.step(X, y)
    pyro.set_rng_seed(3)
    before = predict(model, guide, X, num_samples=2).loc
    pyro.get_param_store().save(tmp_path / "store.pt")
    pyro.clear_param_store()
    model, guide = build()
    pyro.get_param_store().load(tmp_path / "store.pt")
    guide(X, y)  # a reloaded guide sets itself up at its first call: with the training data
    pyro.set_rng_seed(3)
    torch.testing.assert_close(predict(model, guide, X, num_samples=2).loc, before, rtol=0, atol=0)
    # the GPyTorch kernels use the stored tensors, so training goes on moving them (it had stopped)
    stored = {k: v.detach().clone() for k, v in pyro.get_param_store().items() if "kernel" in k}
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    svi.step(X, y)
    moved = [k for k, v in pyro.get_param_store().items() if k in stored and not torch.equal(v.detach(), stored[k])]
    assert len(moved) == len(stored) > 0


def test_a_state_loaded_into_a_model_with_another_flow_grid_is_refused(float64):
    """horizon and num_steps define the flow the trained inducing values belong to, but no parameter shape
    records them: a state loaded under others predicted silently off (0.19 for num_steps, 0.04 for horizon)."""
    X = torch.randn(12, 2, generator=torch.Generator().manual_seed(0))
    state = DifferentialGP(X, num_inducing=4, num_paths=2, num_steps=3).state_dict()
    assert state["_extra_state"] == {"horizon": 1.0, "num_steps": 3, "likelihood": "gaussian"}
    # a Gaussian model's state loaded into a Bernoulli one without a word (same parameter shapes)
    for kwargs, name in (({"num_steps": 6}, "num_steps"), ({"horizon": 2.0}, "horizon"),
                         ({"likelihood": "bernoulli"}, "likelihood")):  # fmt: skip
        other = DifferentialGP(X, num_inducing=4, num_paths=2, **{"num_steps": 3, **kwargs})
        with pytest.raises(ValueError, match=f"trained with {name}=.*set model.num_steps after loading"):
            other.load_state_dict(state)
    DifferentialGP(X, num_inducing=4, num_paths=5, num_steps=3).load_state_dict(state)  # more paths: fine
    del state["_extra_state"]["likelihood"]  # a state saved before the likelihood was recorded still loads
    DifferentialGP(X, num_inducing=4, num_paths=2, num_steps=3).load_state_dict(state)


def test_inducing_normal_takes_a_state_before_its_first_call(float64):
    """It raised 'Unexpected key(s)' (its parameters are made at the first call); AutoDiffusion and
    AutoSWAG take a state before it, so an AutoGuideList of them could not be restored that way."""
    X = torch.randn(12, 2, generator=torch.Generator().manual_seed(0))
    y = torch.sin(X[:, 0])
    model = DifferentialGP(X, num_inducing=4, num_paths=2, num_steps=3)
    guide = InducingNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    for _ in range(3):
        svi.step(X, y)
    state = guide.state_dict()
    pyro.clear_param_store()
    fresh = InducingNormal(model)
    fresh.load_state_dict(state)
    fresh(X, y)
    for name, value in guide.median().items():
        torch.testing.assert_close(fresh.median()[name], value, rtol=0, atol=0)


def test_log_likelihood_group_is_the_predictive_density_not_the_elbo_term(float64):
    """ArviZ's log-likelihood of a Gaussian DiffGP is log N(y; m, v + noise) per (draw, path, point), as
    ``predict`` scores it; the site's log_prob is the ELBO's variational expectation, a lower bound on it
    (the group recorded the bound: lppd -2.7 against 27.1 on the reviewer's example). A flow with a
    negligible output scale leaves the inputs in place, so every path gives the same density."""
    from pyro_gpx.diagnostics import to_inference_data

    X, y = _data(n=25, d=1)
    flow = FlowKernel(1, default_flow_kernel(1, outputscale=1e-14))
    model = DifferentialGP(X, flow=flow, num_inducing=4, num_paths=3, num_steps=2, noise=0.01, learn_noise=False)
    guide = InducingNormal(model, init_scale=0.3)
    guide(X, y)
    idata = to_inference_data(guide, model=model, model_args=(X, y), num_samples=5, seed=1)
    ll = torch.as_tensor(idata.log_likelihood["y"].values[0]) * model.num_paths  # (draws, paths, n), unscaled
    for i in range(5):
        data = {k: torch.as_tensor(idata.posterior[k].values[0, i]) for k in ("flow_inducing", "output_inducing")}
        fn = poutine.trace(poutine.condition(model, data)).get_trace(X, y).nodes["y"]["fn"]
        exact = dist.Normal(fn.loc, (fn.var + fn.noise).sqrt()).log_prob(y)
        torch.testing.assert_close(ll[i], exact, rtol=1e-5, atol=1e-5)
        assert (fn.log_prob(y) < exact).all() and (exact - fn.log_prob(y)).max() > 0.1  # Jensen, and not close


def test_a_second_model_does_not_take_the_first_ones_parameters(float64):
    """The store is global: a second model with parameters of another shape under the same names is refused
    on its first run (it ran with the first model's 6 inducing points, noise and kernels, silently); with
    ``name`` the two coexist, each with its own sites and parameters."""
    X, y = _data(n=20, d=1)
    first = DifferentialGP(X, num_inducing=6, num_paths=1, num_steps=2)
    first(X, y)
    second = DifferentialGP(X + 5, num_inducing=12, num_paths=1, num_steps=2)
    with pytest.raises(ValueError, match="'flow_Z' with shape \\(6, 1\\).*another model's"):
        second(X + 5, y)
    named = DifferentialGP(X + 5, num_inducing=12, num_paths=1, num_steps=2, noise=0.3, name="b")
    tr = poutine.trace(named).get_trace(X + 5, y)
    assert {"b.flow_inducing", "b.output_inducing", "b.y"} <= set(tr.nodes)
    assert named.flow_Z.shape == (12, 1) and float(named.noise) == pytest.approx(0.3)
    assert pyro.get_param_store()["flow_Z"].shape == (6, 1)  # the first model's, untouched
    guide = InducingNormal(named)
    svi = SVI(named, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    assert math.isfinite(svi.step(X + 5, y))
    assert "b.output_kernel$$$raw_outputscale" in pyro.get_param_store()


def test_predictive_parallel_draws_the_same_predictive_as_the_loop(float64):
    """Predictive(parallel=True) pads samples to the plate nesting counting event dims, so the inducing draws
    came without the model's two size-1 plate dims, and were refused; now a single batch dim is the draws.
    With a flow that leaves the inputs in place, y given each draw is N(m, v + noise) exactly."""
    X, y = _data(n=8, d=1)
    flow = FlowKernel(1, default_flow_kernel(1, outputscale=1e-14))
    model = DifferentialGP(X, flow=flow, num_inducing=3, num_paths=2, num_steps=2, noise=0.05, learn_noise=False)
    guide = AutoNormal(model)
    guide(X, y)
    gen = torch.Generator().manual_seed(0)
    u = {"flow_inducing": torch.randn(2, 1, 3, generator=gen), "output_inducing": torch.randn(2, 1, 3, generator=gen)}
    reps = 400
    samples = {k: v.repeat_interleave(reps, 0) for k, v in u.items()}
    pyro.set_rng_seed(0)
    out = Predictive(model, posterior_samples=samples, parallel=True, return_sites=["y"])(X)["y"]
    assert out.shape == (2 * reps, 2, 8)
    for i in range(2):
        fn = poutine.trace(poutine.condition(model, {k: v[i] for k, v in u.items()})).get_trace(X).nodes["y"]["fn"]
        draws = out[i * reps : (i + 1) * reps].reshape(-1, 8)  # both paths: the same flow
        sd = (fn.var[0] + fn.noise).sqrt()
        assert ((draws.mean(0) - fn.loc[0]).abs() < 5 * sd / math.sqrt(draws.shape[0])).all()
        assert ((draws.std(0) / sd - 1).abs() < 0.15).all()
    parallel = Predictive(model, guide=guide, num_samples=3, parallel=True, return_sites=["y"])(X)["y"]
    assert parallel.shape == (3, 2, 8)


@pytest.mark.parametrize("num_paths", [2, 3])
def test_one_shared_output_kernel_for_several_classes(float64, num_paths):
    """A batch-() output kernel with C = 3 gave var (S, n, 1): predict reshaped it to (-1, n, C), which mixed
    the variances of other points and paths into the class columns (probabilities 0.044 off) or crashed."""
    gen = torch.Generator().manual_seed(0)
    X = 3 * torch.randn(20, 2, generator=gen, dtype=torch.float64)
    labels = (X[:, 0] > 0).long()
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=2)).double()
    kernel.outputscale = 4.0
    model = DifferentialGP(X, num_inducing=4, num_paths=num_paths, num_steps=2, likelihood="categorical",
                           num_classes=3, output_kernel=kernel)  # fmt: skip
    guide = InducingNormal(model, init_scale=1e-6)
    guide(X, labels)
    with torch.no_grad():
        guide.locs.output_inducing.copy_(torch.randn(3, 4, generator=gen, dtype=torch.float64))
    pyro.set_rng_seed(0)
    probs = predict(model, guide, X, num_samples=1, mc_samples=20000).probs
    pyro.set_rng_seed(0)
    out = poutine.block(poutine.replay(model, trace=poutine.trace(guide).get_trace(X)))(X)
    assert out.var.shape == out.loc.shape == (num_paths, 20, 3)
    draws = out.loc.unsqueeze(1) + out.var.sqrt().unsqueeze(1) * torch.randn(
        (num_paths, 20000, 20, 3), generator=gen, dtype=torch.float64)  # fmt: skip
    torch.testing.assert_close(probs, torch.softmax(draws, -1).mean((0, 1)), rtol=0, atol=0.01)


@pytest.mark.parametrize("priors", ["outputscale", "both"])
def test_parallel_predictive_of_a_fully_bayesian_model(float64, priors):
    """Predictive(parallel=True) pads the (Dk,) outputscale's draws to (N, 1) and the (Dk, D) lengthscale's to
    (N,): they were refused, or broadcast together to (N, N)."""
    X, y = _data(n=12, d=2)
    lengthscale_prior = dist.LogNormal(0.0, 1.0) if priors == "both" else None
    flow = FlowKernel(2, outputscale_prior=dist.LogNormal(-2.0, 1.0), lengthscale_prior=lengthscale_prior)
    model = DifferentialGP(X, num_inducing=4, num_paths=2, num_steps=3, flow=flow)
    guide = AutoNormal(model)
    guide(X, y)
    out = Predictive(model, guide=guide, num_samples=3, parallel=True, return_sites=["y"])(X)["y"]
    assert out.shape == (3, 2, 12) and torch.isfinite(out).all()


def test_more_bad_input_is_named(float64):
    X, y = _data()
    for bad in (True, None, "0.1"):
        with pytest.raises(ValueError, match="horizon must be a positive number"):
            DifferentialGP(X, horizon=bad)
        with pytest.raises(ValueError, match="noise must be a positive number"):
            DifferentialGP(X, noise=bad)
    assert DifferentialGP(X, horizon=np.float32(0.5), num_steps=2).horizon == 0.5  # was refused
    for bad in (X[:0], torch.ones(5, 2, dtype=torch.long)):  # "num_inducing must be ..., got 0", a Module.to error
        with pytest.raises(ValueError, match="init_inputs must hold at least one row of floating-point inputs"):
            DifferentialGP(bad, num_inducing=4)
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).to(torch.float32)
    with pytest.raises(ValueError, match="output_kernel has dtype torch.float32 but init_inputs are torch.float64"):
        DifferentialGP(X, output_kernel=kernel)  # ran with its hyperparameters rounded to float32
    model = DifferentialGP(X, num_inducing=4, num_paths=1, num_steps=2)
    with pytest.raises(ValueError, match="n >= 1"):
        model(X[:0])  # was a reshape error
    model.num_steps = 0
    with pytest.raises(ValueError, match="model.num_steps must be a positive integer"):
        model(X, y)  # was ZeroDivisionError
    model.num_steps = 2
    guide = InducingNormal(model)
    guide(X, y)
    prediction = predict(model, guide, X, num_samples=2)
    with pytest.raises(ValueError, match="y contains NaN"):
        prediction.log_density(torch.full_like(y, float("nan")))  # was NaN
