"""The batched unconstrained log density against a per-point Pyro trace, for shape-safe and unsafe models."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_gpx.diffusion import AutoDiffusion, PathELBO

X = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(6, 2)
Y = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64)


def shape_safe(X, y):  # Pyro's idiom: a batched w is (..., 1, D) and broadcasts against the data plate
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=X.dtype), 1.0).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(torch.tensor(1.0, dtype=X.dtype)))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Bernoulli(logits=s * (X * w).sum(-1)), obs=y)


def shape_unsafe(X, y):  # correct for a single w only: the extra unsqueeze breaks batching
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=X.dtype), 1.0).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(torch.tensor(1.0, dtype=X.dtype)))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Bernoulli(logits=s * (X * w.unsqueeze(-2)).sum(-1)), obs=y)


def reference(z):  # log joint at (w, exp(u)) plus the log-Jacobian u of the HalfNormal's exp bijection
    w, u = z[:2], z[2]
    s = u.exp()
    lp = dist.Normal(torch.zeros(2, dtype=z.dtype), 1.0).log_prob(w).sum() + dist.HalfNormal(1.0).log_prob(s)
    return lp + dist.Bernoulli(logits=s * (X @ w)).log_prob(Y).sum() + u


@pytest.mark.parametrize("model, batched", [(shape_safe, True), (shape_unsafe, False)])
def test_log_density_and_score_match_reference(model, batched):
    pyro.set_rng_seed(0)
    guide = AutoDiffusion(model, num_steps=2, hidden=8)
    if batched:
        guide(X, Y)
    else:  # found (and reported) at the first simulation
        with pytest.warns(RuntimeWarning, match="one path at a time"):
            guide(X, Y)
    target = guide.target(X, Y)
    assert target.vectorized is batched
    z = torch.randn(5, 3, dtype=torch.float64)
    expected = torch.stack([reference(row) for row in z])
    actual = target.log_density(z)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    expected_score = torch.stack([torch.func.grad(reference)(row) for row in z])
    torch.testing.assert_close(target.score(z), expected_score, rtol=1e-10, atol=1e-10)


def mixes_rows(X, y):  # the mean over every entry, not over the last dim: a batch of w's mixes its rows
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=X.dtype), 1.0).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Bernoulli(logits=w.mean() * X.sum(-1)), obs=y)


@pytest.mark.parametrize("process", ["pis", "dds"])
@pytest.mark.parametrize("num_paths", [1, 16])
def test_a_model_that_mixes_paths_is_found_when_all_paths_start_alike(process, num_paths, float64):
    # every PIS path starts at one point, and one path is one row: the check must not run on equal rows
    pyro.set_rng_seed(0)
    guide = AutoDiffusion(mixes_rows, num_steps=3, hidden=8, process=process)
    with pytest.warns(RuntimeWarning, match="one path at a time"):
        paths = guide.sample_paths(num_paths, X, Y)
    target = guide.target(X, Y)
    assert target.vectorized is False
    torch.testing.assert_close(paths.log_target, target._looped(paths.z), rtol=1e-12, atol=1e-12)


def test_log_density_under_an_enclosing_plate_at_the_models_nesting():
    # Trace_ELBO(vectorize_particles=True) runs the guide under a particle plate at dim -max_plate_nesting - 1,
    # exactly where the plate over paths would sit: it must move left, and the result must not change
    guide = AutoDiffusion(shape_safe, num_steps=2, hidden=8)
    guide(X, Y)
    z = torch.randn(5, 3, dtype=torch.float64)
    expected = torch.stack([reference(row) for row in z])
    with pyro.plate("num_particles_vectorized", 4, dim=-2):
        target = guide.target(X, Y)
        torch.testing.assert_close(target.log_density(z), expected, rtol=1e-10, atol=1e-10)
    assert target.vectorized is True


@pytest.mark.parametrize("max_plate_nesting", [None, 1])
def test_score_guide_trains_under_vectorised_particles_and_stays_batched(max_plate_nesting):
    from pyro.infer import SVI, Trace_ELBO

    from pyro_gpx.diffusion import PathELBO

    guide = AutoDiffusion(shape_safe, num_steps=3, hidden=8)  # use_score=True: the model runs inside the guide
    kw = {} if max_plate_nesting is None else {"max_plate_nesting": max_plate_nesting}
    elbo = Trace_ELBO(num_particles=2, vectorize_particles=True, **kw)
    svi = SVI(shape_safe, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "one path at a time" fallback
        losses = [svi.step(X, Y) for _ in range(3)]
        PathELBO(4).loss(shape_safe, guide, X, Y)
    assert all(math.isfinite(loss) for loss in losses)
    found = guide._target_info["vectorized"]
    assert all(found.values()) and any("num_particles_vectorized" in context for context in found)
    assert guide.target(X, Y).vectorized is True


def test_random_subsample_is_replayed_in_the_batching_probe():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2, dtype=y.dtype), 2.0).to_event(1))
        with pyro.plate("data", y.shape[0], subsample_size=10) as idx:
            pyro.sample("y", dist.Normal(mu, 1.0).to_event(1), obs=y[idx])

    y = torch.randn(200, 2, dtype=torch.float64)
    guide = AutoDiffusion(model, num_steps=2, hidden=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        guide(y)
    target = guide.target(y)
    assert target.vectorized is True
    z = torch.randn(3, 2, dtype=torch.float64)
    log_density, subsample = target._batched(z)
    idx = subsample["data"]
    assert idx.shape == (10,)
    expected = dist.Normal(0.0, 2.0).log_prob(z).sum(-1)
    expected = expected + 20.0 * dist.Normal(z[:, None], 1.0).log_prob(y[idx]).sum((-1, -2))  # scale 200 / 10
    torch.testing.assert_close(log_density, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(target._looped(z, subsample), expected, rtol=1e-10, atol=1e-10)


def test_nan_in_the_observed_data_is_named(float64):
    y = Y.clone()
    y[1] = float("nan")
    guide = AutoDiffusion(shape_safe, num_steps=2, hidden=8)
    with pytest.raises(ValueError, match="observed values of site 'y' contain NaN"):
        guide.sample_paths(4, X, y)


def test_observed_values_outside_the_support_are_refused_as_trace_elbo_does():
    """With validation on, a label of 2 for a Bernoulli site raises naming the site, as in ``Trace_ELBO``;
    soft labels of a distribution built with ``validate_args=False`` are scored, as there, and so is any
    value with validation off."""
    y = Y.clone()
    y[2] = 2.0
    guide = AutoDiffusion(shape_safe, num_steps=2, hidden=8)
    guide(X, Y)
    with pytest.raises(ValueError, match="observed values of site 'y' are not valid"):
        guide.sample_paths(4, X, y)
    with pytest.raises(ValueError, match="observed values of site 'y' are not valid"):
        guide.log_normalizer(4, X, y)

    def soft_labels(X, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=X.dtype), 1.0).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Bernoulli(logits=(X * w).sum(-1), validate_args=False), obs=y)

    data = Y.clone()  # checked once per data set: an in-place change is a new data set
    guide.sample_paths(4, X, data)
    data[0] = 2.0
    with pytest.raises(ValueError, match="observed values of site 'y' are not valid"):
        guide.sample_paths(4, X, data)

    soft = torch.full_like(Y, 0.3)
    pyro.clear_param_store()  # a new guide: its drift must not pick up the first one's parameters
    guide = AutoDiffusion(soft_labels, num_steps=2, hidden=8)
    assert torch.isfinite(guide.sample_paths(4, X, soft).log_weight).all()
    assert torch.isfinite(guide.sample_paths(4, X, soft.clone()).log_weight).all()  # other data: the quick check
    pyro.clear_param_store()
    with pyro.validation_enabled(False):
        guide = AutoDiffusion(shape_safe, num_steps=2, hidden=8)
        assert torch.isfinite(guide.sample_paths(4, X, y).log_weight).all()


def test_a_second_guide_of_another_size_names_the_stale_parameter():
    AutoDiffusion(shape_safe, num_steps=2, hidden=8)(X, Y)

    def one_weight(X, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(1, dtype=X.dtype), 1.0).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Bernoulli(logits=(X[:, :1] * w).sum(-1)), obs=y)

    with pytest.raises(ValueError, match="param store holds 'AutoDiffusion.drift.*clear_param_store"):
        AutoDiffusion(one_weight, num_steps=2, hidden=8)(X, Y)


def test_new_minibatches_are_checked_without_another_model_run():
    """After the first data set's full check, a new minibatch's observed values are checked from the
    target's own batched run: the extra model trace per step was a quarter of an implicit-BLL step."""
    runs = [0]

    def counted(X, y):
        runs[0] += 1
        return shape_safe(X, y)

    guide = AutoDiffusion(counted, num_steps=2, hidden=8)
    guide(X, Y)
    z = torch.zeros(3, guide.latent_dim, dtype=X.dtype)
    runs[0] = 0
    guide.target(X[:3], Y[:3].clone()).log_density(z)  # new data of the same model
    quick = runs[0]
    guide._quick_checks = None  # as before: the full check at the prototype for every new data set
    runs[0] = 0
    guide.target(X[:3], Y[:3].clone()).log_density(z)
    assert runs[0] == quick + 1
    bad = Y[:3].clone()
    bad[0] = 2.0
    with pytest.raises(ValueError, match="observed values of site 'y' are not valid"):
        guide.target(X[:3], bad).log_density(z)
    target = guide.target(X[:3], bad.clone())
    target.vectorized = None  # a new plate context: the batching probe reads errors as "not batched"
    with pytest.raises(ValueError, match="observed values of site 'y' are not valid"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        target.log_density(z)


def test_a_support_of_parameters_gets_the_full_check_on_new_data():
    """Binomial(10)'s support depends on its parameters: the quick check skipped it (a count of 4.5 was
    scored), where Trace_ELBO and the guide's first full check refuse it."""

    def counts(y):
        w = pyro.sample("w", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Binomial(10, logits=w), obs=y)

    guide = AutoDiffusion(counts, num_steps=2, hidden=8)
    guide(torch.tensor([3.0, 4.0, 5.0, 6.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="observed values of site 'y' are not valid"):
        guide.sample_paths(4, torch.tensor([3.0, 4.5, 5.0, 6.0], dtype=torch.float64))


def test_a_minibatch_check_does_not_vouch_for_the_rest_of_the_data():
    """The first check traced one random minibatch and stamped the whole data set as checked: a label 2
    outside that minibatch was scored for 300 steps (Trace_ELBO + AutoNormal raises at step 26)."""
    N = 60
    x = torch.linspace(-1, 1, N, dtype=torch.float64)
    y = (x > 0).to(x.dtype)
    y[37] = 2.0

    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 1.0))
        with pyro.plate("data", N, subsample_size=10) as idx:
            pyro.sample("y", dist.Bernoulli(logits=w * x[idx]), obs=y[idx])

    pyro.set_rng_seed(0)
    guide = AutoDiffusion(model, num_steps=2, hidden=8)
    with pytest.raises(ValueError, match="observed values of site 'y' are not valid"):
        for _ in range(100):  # row 37 is drawn with probability 1/6 per minibatch
            guide.sample_paths(2, x, y)


def test_a_dict_argument_changed_in_place_is_checked_again():
    def model(batch):
        w = pyro.sample("w", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))
        with pyro.plate("d", len(batch["y"])):
            pyro.sample("y", dist.Bernoulli(logits=w * batch["X"]), obs=batch["y"])

    x = torch.linspace(-1, 1, 8, dtype=torch.float64)
    batch = {"X": x, "y": (x > 0).to(x.dtype)}
    guide = AutoDiffusion(model, num_steps=2, hidden=8)
    guide(batch)
    bad = batch["y"].clone()
    bad[0] = 2.0
    batch["y"] = bad  # the same dict object (its tensors were not version-stamped)
    with pytest.raises(ValueError, match="observed values of site 'y' are not valid"):
        guide.sample_paths(2, batch)


def test_latents_are_not_data():
    """A latent on the edge of its support after the first data (exp underflow) was blamed on the data by
    the quick check, even with strict=False; a diverged latent was reported as NaN in the observed values."""

    def model(y):
        s = pyro.sample("s", dist.LogNormal(torch.tensor(0.0, dtype=y.dtype), 1.0))
        with pyro.plate("d", len(y)):
            pyro.sample("y", dist.Normal(0.0, s), obs=y)

    y = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    guide = AutoDiffusion(model, num_steps=2, hidden=8)
    guide(y)
    z = torch.tensor([[0.0], [-800.0]], dtype=torch.float64)
    same = guide.target(y).log_density(z, strict=False)
    assert torch.isfinite(same[0]) and same[1] == -math.inf
    torch.testing.assert_close(guide.target(y.clone()).log_density(z, strict=False), same)  # was ValueError on 's'
    with pytest.raises(FloatingPointError, match="log density of site 's' is not finite"):
        guide.target(y).log_density(torch.tensor([[0.0], [800.0]], dtype=torch.float64))


def test_masked_out_placeholders_are_zero_as_in_pyro():
    """poutine.mask was applied by multiplication: a NaN placeholder under a False mask gave NaN * 0."""
    y = torch.tensor([0.5, float("nan"), -0.3, 1.0], dtype=torch.float64)
    keep = ~torch.isnan(y)

    def model(y, keep):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 1.0))
        with pyro.plate("d", 4), pyro.poutine.mask(mask=keep):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    with pyro.validation_enabled(False):  # Pyro's validation refuses NaN observations, masked or not
        guide = AutoDiffusion(model, num_steps=2, hidden=8, use_score=False)
        guide(y, keep)
        value = guide.target(y, keep).log_density(torch.zeros(1, 1, dtype=torch.float64))
    expected = dist.Normal(0.0, 1.0).log_prob(torch.tensor(0.0)) + dist.Normal(0.0, 1.0).log_prob(y[keep]).sum()
    torch.testing.assert_close(value, expected.double().reshape(1))  # mu = 0: prior + three observations


def test_masked_out_nan_placeholders_give_the_score_and_refuse_trace_elbo():
    """The gradient of a NaN placeholder's density is NaN even under a False mask (0 * NaN): the score is
    taken with those entries scored at a draw instead, and a Pyro ELBO, whose gradient is NaN there (as for
    AutoNormal), is refused before its first step."""
    y = torch.tensor([0.5, float("nan"), -0.3, 1.0], dtype=torch.float64)
    keep = ~torch.isnan(y)

    def model(y):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 1.0))
        with pyro.plate("d", 4), pyro.poutine.mask(mask=keep):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    with pyro.validation_enabled(False):
        guide = AutoDiffusion(model, num_steps=2, hidden=8)
        guide.set_training_data(y)
        z = torch.tensor([[0.3], [-1.0]], dtype=torch.float64)
        torch.testing.assert_close(guide.target(y).score(z), -z + y[keep].sum() - 3 * z)  # prior + three observations
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), PathELBO(num_paths=8))
        assert math.isfinite(svi.step(y))
        assert all(torch.isfinite(p).all() for p in guide.parameters())
        with torch.no_grad():
            assert torch.isfinite(guide(y)["mu"])
        before = [p.detach().clone() for p in guide.parameters()]
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
        with pytest.raises(ValueError, match=r"site\(s\) 'y' hold NaN or inf in masked-out entries.*nan_to_num"):
            svi.step(y)
        assert all(torch.equal(p, q) for p, q in zip(guide.parameters(), before))  # no step was taken


@pytest.mark.parametrize("vectorized", [None, False])
def test_a_latent_whose_shape_changes_with_the_data_is_named(vectorized):
    """A latent sized by the data: the score guide named neither the site nor the shapes (torch's broadcasting
    error), whether the shape clashes in a site's log_prob or inside the model's own code."""

    def in_log_prob(y):
        z = pyro.sample("z", dist.Normal(torch.zeros(len(y)), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(z, 1.0).to_event(1), obs=y)

    def in_the_model(X, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal((X * w).sum(-1), 1.0), obs=y)

    y = torch.randn(4)
    for model, first, second, match in [
        (in_log_prob, (torch.randn(3),), (torch.randn(5),), r"site 'z': \(5,\) vs \(3,\)"),
        (in_the_model, (torch.randn(4, 2), y), (torch.randn(4, 3), y), r"site 'w': \(3,\) vs \(2,\)"),
    ]:
        pyro.clear_param_store()
        guide = AutoDiffusion(model, num_steps=2, hidden=8, vectorized=vectorized)
        guide(*first)
        with pytest.raises(ValueError, match="Model and guide shapes disagree at " + match):
            guide(*second)
        with pytest.raises(ValueError, match="Model and guide shapes disagree at " + match):
            guide.sample_paths(4, *second)
