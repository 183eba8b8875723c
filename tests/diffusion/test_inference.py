"""AutoDiffusion on a conjugate Gaussian model: ELBO, log Z and posterior moments; constrained latents."""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoGuideList
from pyro.infer.autoguide.initialization import init_to_value

from pyro_gpx.diffusion import AutoDiffusion, PathELBO


def conjugate(y):
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2, dtype=y.dtype), 2.0).to_event(1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0).to_event(1), obs=y)


def exact(y):
    """Posterior N(m, v I) and log Z of the conjugate model."""
    n = y.shape[0]
    v = 1.0 / (1 / 4 + n)
    m = v * y.sum(0)
    cov = torch.eye(n, dtype=y.dtype) + 4.0  # marginal of one coordinate's observations
    log_z = sum(
        torch.distributions.MultivariateNormal(torch.zeros(n, dtype=y.dtype), cov).log_prob(y[:, j]) for j in range(2)
    )
    return m, v, float(log_z)


@pytest.mark.parametrize("process", ["pis", "dds"])
def test_gaussian_posterior_and_evidence(float64, process):
    y = torch.tensor([[0.8, -1.2], [1.5, -0.4], [0.3, -0.9], [1.1, -1.6]])
    m, v, log_z = exact(y)
    pyro.set_rng_seed(0)
    # sigma ~ the posterior scale, as DDS recommends
    guide = AutoDiffusion(conjugate, process=process, num_steps=16, hidden=32, sigma=0.5)
    svi = SVI(conjugate, guide, pyro.optim.Adam({"lr": 3e-3}), PathELBO(num_paths=64))
    for _ in range(250):
        svi.step(y)
    est = guide.log_normalizer(4000, y)
    assert est["elbo"] <= log_z + 3 * 0.05  # a lower bound (up to Monte Carlo error)
    assert abs(est["log_z"] - log_z) < 0.05
    with torch.no_grad():
        path = guide.sample_paths(4000, y)
    z = path.z
    se_mean = math.sqrt(v / 4000)
    assert (z.mean(0) - m).abs().max() < 5 * se_mean + 0.02
    assert (z.var(0) - v).abs().max() < 0.25 * v
    # the guide's correlation: trained for 250 steps it is about -0.1 (8 Monte Carlo sd, worth < 0.01 nats of KL)
    assert abs(float(torch.cov(z.T)[0, 1])) < 0.2 * v
    # reweighted by its importance weights, the guide's covariance is the posterior's, v I, within Monte Carlo
    # error (sd v sqrt(2 / ESS) on the diagonal, v sqrt(1 / ESS) off it)
    w = torch.softmax(path.log_weight, 0)
    centred = z - w @ z
    cov = (w[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0)
    ess = float(1 / (w**2).sum())
    assert ess > 3000
    assert (cov - v * torch.eye(2)).abs().max() < 4 * v * math.sqrt(2 / ess)


def test_constrained_latents_plates_and_predictive(float64):
    def model(x, y=None):
        scale = pyro.sample("scale", dist.HalfNormal(torch.tensor(1.0)))
        with pyro.plate("groups", 3):
            effect = pyro.sample("effect", dist.Normal(torch.tensor(0.0), scale))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(effect[x], 0.5), obs=y)

    x = torch.tensor([0, 0, 1, 1, 2, 2])
    y = torch.tensor([1.0, 1.2, -0.5, -0.7, 0.1, 0.0])
    guide = AutoDiffusion(model, num_steps=8, hidden=16)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    for _ in range(5):
        assert math.isfinite(svi.step(x, y))
    draws = Predictive(model, guide=guide, num_samples=20, return_sites=["scale", "effect"])(x)
    assert (draws["scale"] > 0).all() and draws["effect"].shape[-1] == 3
    with torch.no_grad():
        path = guide.sample_paths(10, x, y)
    assert path.z.shape == (10, guide.latent_dim) == (10, 4) and torch.isfinite(path.log_weight).all()
    # a prediction call (y left out) samples the posterior of the training data, not the prior: the drift's
    # score comes from the latest training call's arguments (it was the prior's score, w 0.16 against 3.08)
    with torch.no_grad():
        pyro.set_rng_seed(4)
        trained = guide(x, y)
        pyro.set_rng_seed(4)
        predicting = guide(x)
        pyro.set_rng_seed(4)
        other_inputs = guide(torch.tensor([2, 1]))  # new inputs, no targets: still the training posterior
    for name in ("scale", "effect"):
        torch.testing.assert_close(predicting[name], trained[name], rtol=0, atol=0)
        torch.testing.assert_close(other_inputs[name], trained[name], rtol=0, atol=0)
    # median and quantiles: the empirical marginals of fixed-seed draws, the same on every call, and the
    # global random state left alone
    guide.summary_paths = 64  # this model is evaluated one path at a time (effect[x] is not batch-safe)
    state = torch.get_rng_state()
    median, quantiles = guide.median(x, y), guide.quantiles([0.1, 0.5, 0.9], x, y)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(guide.median(x, y)["effect"], median["effect"], rtol=0, atol=0)
    torch.testing.assert_close(guide.median()["effect"], median["effect"], rtol=0, atol=0)  # the training data
    z = guide._summary_draws(x, y)
    torch.testing.assert_close(median["scale"], torch.quantile(z[:, 0].exp(), 0.5))  # HalfNormal: exp bijection
    torch.testing.assert_close(quantiles["effect"], torch.quantile(z[:, 1:], torch.tensor([0.1, 0.5, 0.9]), dim=0))
    assert quantiles["scale"].shape == (3,) and (quantiles["scale"].diff() > 0).all()
    for name in ("scale", "effect"):  # the median is the 0.5 quantile
        torch.testing.assert_close(quantiles[name][1], median[name], rtol=0, atol=0)


def test_median_and_quantiles_are_marginals_of_the_constrained_draws(float64):
    """A simplex's quantiles were the stick-breaking image of the unconstrained coordinates' quantiles (p[3]'s
    0.1-quantile 0.79 above its 0.9-quantile 0.011), and a decreasing bijection (``less_than``) swapped the
    levels; its median stays a point of the simplex."""

    def model():
        pyro.sample("p", dist.Dirichlet(torch.tensor([0.5, 1.0, 2.0, 4.0])))
        pyro.sample("u", dist.Uniform(-1.0, 1.0).expand([2]).to_event(1))
        c = pyro.sample("c", dist.ImproperUniform(dist.constraints.less_than(3.0), (), ()))  # exp, then 3 - .
        pyro.factor("c_prior", dist.Exponential(1.0).log_prob(3.0 - c))

    guide = AutoDiffusion(
        model, num_steps=4, hidden=8, init_scale=1.5, init_loc_fn=init_to_value(values={"c": torch.tensor(2.0)})
    )
    guide()
    guide.summary_paths = 128
    draws = {site["name"]: (value, dist.transforms.biject_to(site["fn"].support)(value))
             for site, value in guide._unpack_latent(guide._summary_draws())}  # fmt: skip
    levels = torch.tensor([0.1, 0.5, 0.9])
    quantiles, median = guide.quantiles(levels.tolist()), guide.median()
    for name, (_, constrained) in draws.items():
        torch.testing.assert_close(quantiles[name], torch.quantile(constrained, levels, dim=0))
        assert (quantiles[name].diff(dim=0) >= 0).all()
    for name in ("u", "c"):
        torch.testing.assert_close(median[name], torch.quantile(draws[name][1], 0.5, dim=0))
    simplex = dist.transforms.biject_to(dist.constraints.simplex)
    torch.testing.assert_close(median["p"], simplex(torch.quantile(draws["p"][0], 0.5, dim=0)))
    assert float(median["p"].sum()) == pytest.approx(1.0)


def test_autoguidelist_diffusion_and_delta(float64):
    def model(y):
        noise = pyro.sample("noise", dist.LogNormal(torch.tensor(0.0), 1.0))
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 2.0).to_event(1))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(mu, noise.unsqueeze(-1)).to_event(1), obs=y)

    y = torch.tensor([[0.8, -1.2], [1.5, -0.4], [0.3, -0.9], [1.1, -1.6]])
    pyro.set_rng_seed(1)
    guide = AutoGuideList(model)
    # the diffusion part sees only its own sites, so it gets no score feature (the score of a
    # blocked model would miss the other sites)
    guide.append(AutoDiffusion(poutine.block(model, expose=["mu"]), num_steps=8, hidden=16, use_score=False))
    guide.append(AutoDelta(poutine.block(model, hide=["mu"])))
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    losses = [svi.step(y) for _ in range(200)]
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-30:]) / 30 < sum(losses[:30]) / 30
    draws = Predictive(model, guide=guide, num_samples=2000, return_sites=["mu", "noise"])(y)
    mu = draws["mu"].reshape(2000, 2)
    assert draws["noise"].std() < 1e-6  # AutoDelta: a point
    assert mu.std(0).min() > 0.05  # the diffusion part: a spread
    torch.testing.assert_close(mu.mean(0), y.mean(0), atol=0.25, rtol=0)


def _slope(x, y=None):
    w = pyro.sample("w", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 1.0))
    with pyro.plate("data", len(x)):
        return pyro.sample("y", dist.Normal(w * x, 0.3), obs=y)


def test_guide_calls_sample_the_trained_posterior_whatever_data_they_get(float64):
    x, x_test = torch.linspace(-1, 1, 12), torch.linspace(-1, 1, 6)
    y, y_test = 2 * x, -2 * x_test  # held-out targets of the opposite slope
    guide = AutoDiffusion(_slope, num_steps=3, hidden=8)
    svi = SVI(_slope, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    svi.step(x[:6], y[:6])
    Trace_ELBO().differentiable_loss(_slope, guide, x[6:], y[6:])  # a hand-written loop's step
    assert torch.equal(guide._train_call[1][0], x[6:])  # training calls (gradients on) move the data
    svi.step(x, y)
    with torch.no_grad():
        draws = {}
        for name, args, kwargs in (("train", (x, y), {}), ("held-out", (x_test, y_test), {}),
                                   ("keyword", (x_test,), {"y": y_test}), ("prediction", (x_test,), {})):  # fmt: skip
            pyro.set_rng_seed(5)
            if name == "train":  # the gradient calls saw three data sets: a warning, once
                with pytest.warns(UserWarning, match=r"trained on changing data.*shapes \[\(12,\), \(12,\)\]"):
                    draws[name] = guide(*args, **kwargs)["w"]
                continue
            draws[name] = guide(*args, **kwargs)["w"]
        for name in ("held-out", "keyword", "prediction"):
            torch.testing.assert_close(draws[name], draws["train"], rtol=0, atol=0)
        # explicit calls score the data they are given, and leave the guide's target alone
        assert guide.target(x_test, y_test).args[0] is x_test
        pyro.set_rng_seed(5)
        torch.testing.assert_close(guide(x_test, y_test)["w"], draws["train"], rtol=0, atol=0)
        guide.set_training_data(x_test, y_test)  # moves it
        pyro.set_rng_seed(5)
        assert not torch.equal(guide(x, y)["w"], draws["train"])


def test_parallel_predictive_is_refused(float64):
    x = torch.linspace(-1, 1, 8)
    guide = AutoDiffusion(_slope, num_steps=2, hidden=4)
    guide(x, 2 * x)
    with pytest.raises(ValueError, match="Predictive\\(parallel=True\\) sizes its plate from the guide alone"):
        Predictive(_slope, guide=guide, num_samples=3, parallel=True)(x)


def test_jit_trace_elbo_matches_trace_elbo_or_names_the_untraceable_score():
    """The score's inner autograd.grad traces for an unconstrained model (same losses as Trace_ELBO for the
    same seeds); for a constrained one the tracer fails, and the error says what to use instead."""
    import warnings

    from pyro.infer import JitTrace_ELBO

    y = torch.randn(20, generator=torch.Generator().manual_seed(1)) + 1.0

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    def constrained(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        s = pyro.sample("s", dist.HalfNormal(2.0))
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(mu, s), obs=y)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings
        pyro.set_rng_seed(0)
        guide = AutoDiffusion(model, num_steps=4, hidden=16)
        guide(y)
        jit = JitTrace_ELBO()
        jit.loss(model, guide, y)  # compiles
        for seed in (1, 2):
            pyro.set_rng_seed(seed)
            traced = jit.loss(model, guide, y)
            pyro.set_rng_seed(seed)
            assert traced == pytest.approx(Trace_ELBO().loss(model, guide, y), rel=1e-6)
        pyro.clear_param_store()
        guide = AutoDiffusion(constrained, num_steps=4, hidden=16)
        with pytest.raises(RuntimeError, match="could not be traced by the JIT.*use_score=False"):
            JitTrace_ELBO().loss_and_grads(constrained, guide, y)  # (the loss alone traces)
