"""Every error path of the tracker, each triggered for real (mostly through a tiny ``Trainer.fit``).

Each test checks the error type and that the message names the problem (and, where it matters,
the fix). A few positive twins check that the documented way out of an error really works.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from lightning_influence import (
    InfluenceConfigurationError,
    InfluenceTracker,
    NonFiniteInfluenceError,
    SampleIdError,
    SelfCheckError,
    UnsupportedOptimizerError,
)
from lightning_influence.testing import TinyClassifier, cross_entropy_losses

# ----------------------------------------------------------------------------------------- helpers


def fit(make_trainer, model, loader, tracker, **trainer_kwargs):
    trainer = make_trainer(tracker, **trainer_kwargs)
    trainer.fit(model, train_dataloaders=loader)
    return trainer


def first_half(module, batch):
    return cross_entropy_losses(module.net, batch[0], batch[1])[: len(batch[0]) // 2]


def twice(module, batch):
    losses = cross_entropy_losses(module.net, batch[0], batch[1])
    return torch.cat([losses, losses])  # same mean, same gradient, wrong length


class DictDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class IterableXY(IterableDataset):
    """Yields ``(x, y, id)`` items; has no ``__len__``."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        for i in range(len(self.x)):
            yield self.x[i], self.y[i], i


# --------------------------------------------------------------------------------- sample ids


def test_batch_without_ids_last_element_float_labels(make_trainer, make_model, data):
    x, y = data
    loader = DataLoader(TensorDataset(x, y.double()), batch_size=8)  # (x, y) without IndexedDataset
    with pytest.raises(SampleIdError, match=r"not an IndexedDataset.*labels, as ids.*sample_ids="):
        fit(make_trainer, make_model(), loader, InfluenceTracker())


def test_dict_batch_without_sample_id(make_trainer, make_model, data):
    loader = DataLoader(DictDataset(*data), batch_size=8)
    with pytest.raises(SampleIdError, match=r"not an IndexedDataset.*IndexedDataset\(dataset\)"):
        fit(make_trainer, make_model(), loader, InfluenceTracker())


def test_tensor_batch_has_no_ids(make_trainer, make_model, data):
    loader = DataLoader(data[0], batch_size=8)  # bare tensors
    with pytest.raises(SampleIdError, match=r"not an IndexedDataset.*sample_ids="):
        fit(make_trainer, make_model(), loader, InfluenceTracker(num_samples=24))


@pytest.mark.parametrize(
    ("sample_ids", "match"),
    [
        pytest.param(lambda b: b[-1] + 100, r"Sample ids \[100, .*outside \[0, 24\)", id="too-large"),
        pytest.param(lambda b: b[-1] - 3, r"Sample ids \[-3, -2, -1\] are outside \[0, 24\)", id="negative"),
        pytest.param(
            lambda b: torch.zeros_like(b[-1]), r"Sample ids \[0\] appear more than once in one batch", id="repeated"
        ),
        pytest.param(lambda b: b[-1].double(), r"1-D integer tensor .*dtype=torch.float64", id="float"),
        pytest.param(lambda b: b[-1][:, None], r"1-D integer tensor .*shape=\(8, 1\)", id="2-D"),
        pytest.param(lambda b: b[-1] > 3, r"1-D integer tensor .*dtype=torch.bool", id="bool"),
        pytest.param(lambda b: "ids", r"must be a LongTensor\[B\], got str", id="not-a-tensor"),
        pytest.param(
            lambda b: b[-1][:4], r"loss_fn returned 8 per-sample losses for a batch with 4 sample ids", id="too-few"
        ),
    ],
)
def test_bad_sample_ids(make_trainer, make_model, train_loader, sample_ids, match):
    with pytest.raises(SampleIdError, match=match):
        fit(make_trainer, make_model(), train_loader, InfluenceTracker(sample_ids=sample_ids))


def test_custom_sample_ids_accept_lists_and_int32(make_trainer, make_model, train_loader):
    tracker = InfluenceTracker(sample_ids=lambda b: b[-1].to(torch.int32).tolist())
    fit(make_trainer, make_model(), train_loader, tracker)
    assert torch.isfinite(tracker.influence(next(iter(train_loader))).scores).all()


def test_unknown_training_set_size(make_trainer, make_model, data):
    loader = DataLoader(IterableXY(*data), batch_size=8)
    with pytest.raises(InfluenceConfigurationError, match=r"training set's size.*num_samples="):
        fit(make_trainer, make_model(), loader, InfluenceTracker())
    tracker = InfluenceTracker(num_samples=24, sample_ids=lambda b: b[-1])  # the documented fix
    fit(make_trainer, make_model(), loader, tracker)
    assert tracker.tracked_ids.tolist() == list(range(24))


def test_track_ids_beyond_training_set(make_trainer, make_model, train_loader):
    with pytest.raises(ValueError, match=r"track holds ids >= 24"):
        fit(make_trainer, make_model(), train_loader, InfluenceTracker(track=[0, 24]))


# ----------------------------------------------------------------------------------- loss_fn


def test_missing_per_sample_loss(make_trainer, train_loader):
    class NoPerSampleLoss(TinyClassifier):
        per_sample_loss = None

    model = NoPerSampleLoss(nn.Linear(4, 3).double(), lambda n: torch.optim.SGD(n.parameters(), lr=0.1))
    with pytest.raises(InfluenceConfigurationError, match=r"no `per_sample_loss\(batch\)` method.*loss_fn="):
        fit(make_trainer, model, train_loader, InfluenceTracker())


@pytest.mark.parametrize("self_check_steps", [2, 0])
def test_loss_fn_returns_mean(make_trainer, make_model, train_loader, self_check_steps):
    def mean_loss(module, batch):
        return F.cross_entropy(module.net(batch[0]), batch[1])

    tracker = InfluenceTracker(loss_fn=mean_loss, self_check_steps=self_check_steps)
    with pytest.raises(ValueError, match=r"1-D Tensor\[B\] of per-sample losses \(reduction='none'\), got \(\)"):
        fit(make_trainer, make_model(), train_loader, tracker)


@pytest.mark.parametrize(
    ("loss_fn", "match"),
    [
        pytest.param(first_half, r"loss_fn returned 4 per-sample losses for a batch with 8 sample ids", id="half"),
        pytest.param(twice, r"loss_fn returned 16 per-sample losses for a batch with 8 sample ids", id="twice"),
    ],
)
def test_loss_fn_length_differs_from_ids(make_trainer, make_model, train_loader, loss_fn, match):
    with pytest.raises(SampleIdError, match=match):
        fit(make_trainer, make_model(), train_loader, InfluenceTracker(loss_fn=loss_fn))


def test_loss_fn_length_differs_from_ids_without_self_check(make_trainer, make_model, train_loader):
    with pytest.raises(SampleIdError, match=r"loss_fn returned 16 per-sample losses for a batch with 8 sample ids"):
        fit(make_trainer, make_model(), train_loader, InfluenceTracker(loss_fn=twice, self_check_steps=0))


class L2Penalty(TinyClassifier):
    """training_step adds ``c/2 ‖θ‖²`` to the mean per-sample loss."""

    c = 0.05

    def penalty(self):
        return 0.5 * self.c * sum(p.pow(2).sum() for p in self.net.parameters())

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean() + self.penalty()


def test_loss_fn_misses_a_regulariser(make_trainer, make_model, train_loader):
    with pytest.raises(
        SelfCheckError,
        match=r"step 0, the mean of loss_fn's per-sample losses does not reproduce the gradient.*regularizer=",
    ):
        fit(make_trainer, make_model(cls=L2Penalty), train_loader, InfluenceTracker())


def test_regularizer_reproduces_the_gradient(make_trainer, make_model, train_loader):
    tracker = InfluenceTracker(regularizer=lambda module: module.penalty(), self_check_steps=3)
    fit(make_trainer, make_model(cls=L2Penalty), train_loader, tracker)
    assert torch.isfinite(tracker.influence(next(iter(train_loader))).scores).all()


def test_loss_with_extra_scaling(make_trainer, make_model, train_loader):
    class SumLoss(TinyClassifier):
        def training_step(self, batch, batch_idx):
            return self.per_sample_loss(batch).sum()  # reduction="sum": not the mean

    with pytest.raises(SelfCheckError, match=r"does not reproduce the gradient.*reduction='sum'"):
        fit(make_trainer, make_model(cls=SumLoss), train_loader, InfluenceTracker())


# ----------------------------------------------------------------------------------- optimizers


class MySGD(torch.optim.SGD):
    pass


@pytest.mark.parametrize(
    ("make_optimizer", "match"),
    [
        pytest.param(
            lambda n: torch.optim.Rprop(n.parameters(), lr=0.01),
            r"torch\.optim\.rprop\.Rprop cannot be modelled exactly",
            id="rprop",
        ),
        pytest.param(
            lambda n: torch.optim.ASGD(n.parameters(), lr=0.01), r"ASGD cannot be modelled exactly", id="asgd"
        ),
        pytest.param(
            lambda n: torch.optim.Adagrad(n.parameters(), lr=0.01, differentiable=True),
            r"Adagrad\(differentiable=True\) is not supported",
            id="adagrad-differentiable",
        ),
        pytest.param(
            lambda n: torch.optim.RMSprop(n.parameters(), lr=0.01, maximize=True),
            r"RMSprop\(maximize=True\) is not supported",
            id="rmsprop-maximize",
        ),
        pytest.param(
            lambda n: torch.optim.SGD(n.parameters(), lr=0.1, maximize=True),
            r"SGD\(maximize=True\) is not supported",
            id="sgd-maximize",
        ),
        pytest.param(
            lambda n: torch.optim.Adam(n.parameters(), lr=0.01, maximize=True),
            r"Adam\(maximize=True\) is not supported",
            id="adam-maximize",
        ),
        pytest.param(
            lambda n: MySGD(n.parameters(), lr=0.1),
            r"MySGD cannot be modelled exactly.*not subclasses",
            id="sgd-subclass",
        ),
        pytest.param(
            lambda n: torch.optim.LBFGS(n.parameters(), lr=0.1), r"LBFGS cannot be modelled exactly", id="lbfgs"
        ),
    ],
)
def test_unsupported_optimizer(make_trainer, make_model, train_loader, make_optimizer, match):
    with pytest.raises(UnsupportedOptimizerError, match=match) as err:
        fit(make_trainer, make_model(make_optimizer), train_loader, InfluenceTracker())
    if "maximize" not in match:  # plain SGD cannot stand in for an ascending optimizer either
        assert "optimizer_model='sgd'" in str(err.value)


def test_mixed_coupled_and_decoupled_weight_decay(make_trainer, make_model, train_loader):
    def make_optimizer(net):
        return torch.optim.Adam(
            [
                {"params": [net.weight], "decoupled_weight_decay": True},
                {"params": [net.bias], "decoupled_weight_decay": False},
            ],
            lr=0.01,
            weight_decay=0.1,
        )

    with pytest.raises(UnsupportedOptimizerError, match=r"mixing coupled and decoupled weight decay"):
        fit(make_trainer, make_model(make_optimizer), train_loader, InfluenceTracker())


@pytest.mark.parametrize(
    "make_optimizer",
    [
        pytest.param(lambda n: torch.optim.RMSprop(n.parameters(), lr=0.01), id="rmsprop"),
        pytest.param(lambda n: torch.optim.Adam(n.parameters(), lr=0.01, amsgrad=True), id="amsgrad"),
    ],
)
def test_unsupported_optimizer_as_sgd_approximation(make_trainer, make_model, train_loader, make_optimizer):
    tracker = InfluenceTracker(optimizer_model="sgd")
    fit(make_trainer, make_model(make_optimizer), train_loader, tracker)
    assert tracker.engine.jacobian.blocks == ("theta",)
    assert torch.isfinite(tracker.influence(next(iter(train_loader))).scores).all()


# ------------------------------------------------------------------------------ trainer options


class ManualOptimization(TinyClassifier):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        for opt in self.optimizers() if isinstance(self.optimizers(), list) else [self.optimizers()]:
            opt.zero_grad()
            self.manual_backward(self.per_sample_loss(batch).mean())
            opt.step()


class CustomStrategy(SingleDeviceStrategy):
    """Stands for FSDP / DeepSpeed (which need a GPU): any strategy the tracker does not know."""


class CustomClipping(TinyClassifier):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val / 2, gradient_clip_algorithm)


class TwoOptimizersManual(ManualOptimization):
    def configure_optimizers(self):
        return torch.optim.SGD([self.net.weight], lr=0.1), torch.optim.SGD([self.net.bias], lr=0.1)


@pytest.mark.parametrize(
    ("trainer_kwargs", "cls", "match"),
    [
        pytest.param(
            {"gradient_clip_val": 1.0}, CustomClipping, r"CustomClipping.configure_gradient_clipping", id="custom-clip"
        ),
        pytest.param(
            {"precision": "bf16-true"}, TinyClassifier, r"precision='bf16-true'.*'bf16-mixed'", id="bf16-true"
        ),
        pytest.param(
            {"strategy": CustomStrategy("cpu")},
            TinyClassifier,
            r"the CustomStrategy strategy.*strategy='ddp'",
            id="other-strategy",
        ),
        pytest.param({}, ManualOptimization, r"manual optimization.*automatic optimization", id="manual"),
        # Lightning itself refuses several optimizers under automatic optimization, so the tracker only
        # ever sees them with manual optimization, which it refuses first.
        pytest.param({}, TwoOptimizersManual, r"manual optimization", id="two-optimizers"),
    ],
)
def test_refused_trainer_configuration(make_trainer, make_model, train_loader, trainer_kwargs, cls, match):
    with pytest.raises(InfluenceConfigurationError, match=match):
        fit(make_trainer, make_model(cls=cls), train_loader, InfluenceTracker(), **trainer_kwargs)


def test_batch_norm_with_a_cumulative_average_is_refused_with_the_fix(make_trainer, make_model, train_loader):
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, momentum=None), nn.Linear(5, 3)).double()
    with pytest.raises(InfluenceConfigurationError, match=r"'net.1' has momentum=None.*momentum=0.1"):
        fit(make_trainer, make_model(net=net), train_loader, InfluenceTracker())


def test_dropout_with_p_zero_is_fine(make_trainer, make_model, train_loader):
    net = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.0), nn.Tanh(), nn.Linear(5, 3)).double()
    tracker = InfluenceTracker()
    fit(make_trainer, make_model(net=net), train_loader, tracker)
    assert tracker.engine is not None


class ScalesGradients(TinyClassifier):
    """Changes the gradient after the tracker recorded it (module hooks run after callback hooks)."""

    def on_before_optimizer_step(self, optimizer):
        for p in self.parameters():
            p.grad.mul_(2.0)


class ClipsGradients(TinyClassifier):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm=1e-3)


class ZeroesBiasGradient(TinyClassifier):
    def on_before_optimizer_step(self, optimizer):
        self.net.bias.grad.zero_()


def _sgd_momentum(net):
    return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)


def _adamw(net):
    return torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=0.1)


@pytest.mark.parametrize(
    ("cls", "make_optimizer", "kind"),
    [
        pytest.param(ScalesGradients, _sgd_momentum, "sgd", id="scale-sgd"),
        # Adam's first update is invariant to a global gradient scale; the second step's moments give it away
        pytest.param(ScalesGradients, _adamw, "adamw", id="scale-adamw"),
        pytest.param(ZeroesBiasGradient, _sgd_momentum, "sgd", id="zero-bias-grad-sgd"),
        pytest.param(ZeroesBiasGradient, _adamw, "adamw", id="zero-bias-grad-adamw"),
        pytest.param(ClipsGradients, _sgd_momentum, "sgd", id="clip-sgd"),
        pytest.param(ClipsGradients, _adamw, "adamw", id="clip-adamw"),
    ],
)
def test_gradient_changed_after_recording(make_trainer, make_model, train_loader, cls, make_optimizer, kind):
    match = (
        rf"step [01], the tracker's model of {kind} does not reproduce the observed parameter update.*gradient clipping"
    )
    with pytest.raises(SelfCheckError, match=match):
        fit(make_trainer, make_model(make_optimizer, cls=cls), train_loader, InfluenceTracker())


class ChangesParametersBeforeStep(TinyClassifier):
    """Moves a parameter after the tracker recorded θ_t but before the optimizer step."""

    def on_before_optimizer_step(self, optimizer):
        with torch.no_grad():
            self.net.weight.add_(0.01)


def test_parameters_changed_before_the_step(make_trainer, make_model, train_loader):
    with pytest.raises(SelfCheckError, match=r"parameters changed outside the optimizer"):
        fit(make_trainer, make_model(cls=ChangesParametersBeforeStep), train_loader, InfluenceTracker())


class ProjectsParametersBetweenSteps(TinyClassifier):
    """Rescales the weights after each step (a max-norm projection): θ_{t+1} is not the optimizer's output."""

    def on_train_batch_end(self, outputs, batch, batch_idx):
        with torch.no_grad():
            self.net.weight.mul_(0.5)


def test_parameters_changed_between_steps(make_trainer, make_model, train_loader):
    with pytest.raises(SelfCheckError, match=r"parameters changed outside the optimizer"):
        fit(make_trainer, make_model(cls=ProjectsParametersBetweenSteps), train_loader, InfluenceTracker())


def test_memory_budget(make_trainer, make_model, train_loader):
    with pytest.raises(
        InfluenceConfigurationError,
        match=r"at its peak.*over max_memory_bytes=1 .*Track fewer samples.*fewer parameters",
    ):
        fit(make_trainer, make_model(), train_loader, InfluenceTracker(max_memory_bytes=1))


# ------------------------------------------------------------------------------- constructor


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        pytest.param(
            {"estimator": "influence-functions"}, ValueError, r"estimator must be one of .*'acc'", id="estimator"
        ),
        pytest.param(
            {"optimizer_model": "adam"}, ValueError, r"optimizer_model must be 'auto' or 'sgd'", id="optimizer-model"
        ),
        pytest.param(
            {"estimator": "tracin"}, ValueError, r"estimator='tracin' needs registered queries", id="tracin-no-queries"
        ),
        pytest.param(
            {"track": [1, 2, 1]}, ValueError, r"track must be a non-empty sequence of distinct", id="track-duplicates"
        ),
        pytest.param({"track": [0, -1]}, ValueError, r"non-negative training-set ids", id="track-negative"),
        pytest.param({"track": []}, ValueError, r"track must be a non-empty", id="track-empty"),
        pytest.param(
            {"window_every_n_steps": 2}, ValueError, r"Time windows score the registered queries", id="window-no-query"
        ),
        pytest.param(
            {"window_every_n_epochs": 0, "queries": {"v": torch.zeros(1)}},
            ValueError,
            r"window_every_n_epochs must be a positive integer",
            id="window-zero",
        ),
        pytest.param(
            {"window_every_n_steps": 2, "window_every_n_epochs": 1, "queries": {"v": torch.zeros(1)}},
            ValueError,
            r"not both",
            id="window-both",
        ),
        pytest.param({"log_top_k": 0}, ValueError, r"log_top_k must be a positive integer", id="log-top-k"),
        pytest.param({"hvp_chunk_size": 0}, ValueError, r"hvp_chunk_size must be a positive integer", id="chunk"),
        pytest.param(
            {"curvature": "gauss-newton"}, ValueError, r"curvature='gauss-newton' is not available", id="curvature"
        ),
        pytest.param({"queries": {0: None}}, TypeError, r"queries must map string names", id="query-name"),
    ],
)
def test_bad_constructor_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        InfluenceTracker(**kwargs)


def test_track_with_non_integer_ids():
    with pytest.raises(ValueError, match=r"track"):
        InfluenceTracker(track=[0.5, 2.7])


class WithUnusedParameter(TinyClassifier):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.net.register_parameter("unused", nn.Parameter(torch.zeros(2, dtype=torch.float64)))


@pytest.mark.parametrize(
    ("params", "err", "match"),
    [
        pytest.param(
            ["decoder"], InfluenceConfigurationError, r"selector 'decoder' matches no parameter", id="no-match"
        ),
        pytest.param(
            ["net.weig"],
            InfluenceConfigurationError,
            r"selector 'net.weig' matches no parameter",
            id="prefix-is-not-substring",
        ),
        pytest.param(
            [nn.Linear(2, 2)],
            InfluenceConfigurationError,
            r"selector Linear is not a submodule of",
            id="foreign-module",
        ),
        pytest.param([3], TypeError, r"params= takes name prefixes or nn.Module objects, got int", id="bad-type"),
    ],
)
def test_params_selector_matches_nothing(make_trainer, make_model, train_loader, params, err, match):
    model = make_model()
    with pytest.raises(err, match=match):
        fit(make_trainer, model, train_loader, InfluenceTracker(params=params))


def test_params_selects_a_frozen_parameter(make_trainer, make_model, train_loader):
    model = make_model()
    model.net.bias.requires_grad_(False)
    with pytest.raises(
        InfluenceConfigurationError,
        match=r"\['net.bias'\] are selected for tracking but the optimizer does not train them",
    ):
        fit(make_trainer, model, train_loader, InfluenceTracker(params=["net"]))


def test_params_selects_a_parameter_the_optimizer_lacks(make_trainer, make_model, train_loader):
    model = make_model(lambda n: torch.optim.SGD([n.weight], lr=0.1))
    with pytest.raises(
        InfluenceConfigurationError,
        match=r"\['net.bias'\] are selected for tracking but the optimizer does not train them",
    ):
        fit(make_trainer, model, train_loader, InfluenceTracker(params=["net.bias"]))


def test_parameter_without_gradient(make_trainer, make_model, train_loader):
    with pytest.raises(InfluenceConfigurationError, match=r"'net.unused' received no gradient at step 0.*params="):
        fit(make_trainer, make_model(cls=WithUnusedParameter), train_loader, InfluenceTracker())


def test_parameter_without_gradient_excluded_by_params(make_trainer, make_model, train_loader):
    tracker = InfluenceTracker(params=["net.weight", "net.bias"])
    fit(make_trainer, make_model(cls=WithUnusedParameter), train_loader, tracker)
    assert tracker.engine.theta.shape == (24, 15)


# ---------------------------------------------------------------------------------- influence()


def test_influence_before_fit(train_loader):
    with pytest.raises(RuntimeError, match=r"influence\(\) is available after trainer.fit"):
        InfluenceTracker().influence(next(iter(train_loader)))


@pytest.fixture
def fitted(make_trainer, make_model, train_loader):
    """A tracker after a 1-epoch fit, with the query 'val' registered."""
    tracker = InfluenceTracker(queries={"val": next(iter(train_loader))})
    fit(make_trainer, make_model(), train_loader, tracker)
    return tracker


def test_influence_unknown_query_name(fitted):
    with pytest.raises(KeyError, match=r"No registered query named 'test'; registered: \['val'\]"):
        fitted.influence("test")


@pytest.mark.parametrize(
    ("query", "err", "match"),
    [
        pytest.param(42, TypeError, r"A query must be a batch, a DataLoader .* got int", id="int"),
        pytest.param(
            lambda module: module.net.weight,
            ValueError,
            r"callable query must return a scalar",
            id="non-scalar-callable",
        ),
        pytest.param([], ValueError, r"The query holds no samples", id="empty-list"),
    ],
)
def test_influence_bad_query(fitted, query, err, match):
    with pytest.raises(err, match=match):
        fitted.influence(query)


def test_influence_empty_dataloader(fitted, data):
    x, y = data
    empty = DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4)
    with pytest.raises(ValueError, match=r"The query holds no samples"):
        fitted.influence(empty)


@pytest.fixture
def fitted_tracin(make_trainer, make_model, train_loader):
    tracker = InfluenceTracker(estimator="tracin", queries={"val": next(iter(train_loader))})
    fit(make_trainer, make_model(), train_loader, tracker)
    return tracker


def test_tracin_unregistered_query(fitted_tracin, train_loader):
    assert fitted_tracin.influence("val").scores.abs().sum() > 0
    with pytest.raises(ValueError, match=r"estimator='tracin' only answers registered queries"):
        fitted_tracin.influence(next(iter(train_loader)))


def test_tracin_per_example(fitted_tracin):
    with pytest.raises(ValueError, match=r"per_example=True is not available with estimator='tracin'"):
        fitted_tracin.influence("val", per_example=True)


# --------------------------------------------------------------------------------- divergence


def test_divergence_reaches_the_states(make_trainer, make_model, train_loader):
    model = make_model(lambda n: torch.optim.SGD(n.parameters(), lr=1e200), hidden=5)
    tracker = InfluenceTracker(self_check_steps=0)
    with pytest.raises(
        NonFiniteInfluenceError,
        match=r"NaN/inf appeared in the influence state 'theta' at optimizer step \d+ for sample ids \[.*lower it",
    ):
        fit(make_trainer, model, train_loader, tracker, max_epochs=3)


# ------------------------------------------------------------------------ supported, must not raise


def _momentum_in_one_group(net):
    return torch.optim.SGD([{"params": [net.weight], "momentum": 0.9}, {"params": [net.bias]}], lr=0.1)


def test_momentum_in_one_param_group_only(make_trainer, make_model, train_loader):
    """Groups without momentum keep no buffer; the self-check must still model the others (regression)."""
    tracker = InfluenceTracker(self_check_steps=3)
    fit(make_trainer, make_model(_momentum_in_one_group), train_loader, tracker)
    assert torch.isfinite(tracker.engine.theta).all()


def _adam_frozen_first(net):
    net.weight.requires_grad_(False)  # the group's first parameter keeps no optimizer state
    return torch.optim.Adam([{"params": [net.weight, net.bias]}], lr=0.01)


def _adam_two_groups(net):
    return torch.optim.Adam([{"params": [net.weight], "lr": 0.01}, {"params": [net.bias], "lr": 0.02}])


@pytest.mark.parametrize(
    ("make_optimizer", "params"),
    [
        pytest.param(_adam_frozen_first, None, id="frozen-first-parameter"),
        pytest.param(_adam_two_groups, ["net.bias"], id="untracked-group"),
        pytest.param(
            lambda n: torch.optim.AdamW(n.parameters(), lr=0.01, weight_decay=0.1),
            ["net.bias"],
            id="untracked-first-parameter",
        ),
    ],
)
def test_partially_tracked_or_frozen_groups(make_trainer, make_model, train_loader, make_optimizer, params):
    """The step count and moments must come from tracked parameters (regression: a frozen first parameter)."""
    tracker = InfluenceTracker(params=params, self_check_steps=3)
    fit(make_trainer, make_model(make_optimizer), train_loader, tracker)
    assert torch.isfinite(tracker.engine.theta).all()


class SkipsABatch(TinyClassifier):
    def training_step(self, batch, batch_idx):
        return None if batch_idx == 1 else super().training_step(batch, batch_idx)


def test_training_step_skips_a_batch(make_trainer, make_model, train_loader):
    tracker = InfluenceTracker()
    fit(make_trainer, make_model(cls=SkipsABatch), train_loader, tracker)
    assert torch.isfinite(tracker.engine.theta).all()


def test_accumulation_with_a_skipped_micro_batch(make_trainer, make_model, train_loader):
    """A micro-batch whose training_step returned None adds no gradient, so it is not booked: the
    gradient self-check on every step passes, and its samples were never consumed."""
    tracker = InfluenceTracker(self_check_steps=100)
    fit(make_trainer, make_model(cls=SkipsABatch), train_loader, tracker, accumulate_grad_batches=2)
    assert tracker.steps_booked == 2  # 3 batches -> steps over {0, skipped 1} and {2}
    first_batch = next(iter(train_loader))[-1]
    assert set(tracker.unseen_ids.tolist()).isdisjoint(first_batch.tolist())
    assert len(tracker.unseen_ids) == len(first_batch)  # batch 1's samples


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_ddp_with_worker_processes_is_refused(make_model, start_method):
    from lightning.pytorch.strategies import DDPStrategy

    trainer = pl.Trainer(strategy=DDPStrategy(start_method=start_method), accelerator="cpu", devices=2, logger=False)
    with pytest.raises(InfluenceConfigurationError, match=rf"strategy='ddp_{start_method}'.*Use strategy='ddp'"):
        InfluenceTracker().on_fit_start(trainer, make_model())


def test_fused_optimizer_under_a_grad_scaler_is_refused(make_trainer, make_model, train_loader):
    from lightning.pytorch.plugins import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    model = make_model(lambda n: torch.optim.AdamW(n.parameters(), lr=0.01, fused=True)).float()
    with pytest.raises(InfluenceConfigurationError, match=r"AdamW\(fused=True\) under a GradScaler.*Drop fused=True"):
        fit(make_trainer, model, train_loader, InfluenceTracker(), precision=None, plugins=[plugin])


class FunctionalDropout(TinyClassifier):
    def per_sample_loss(self, batch):
        logits = F.dropout(self.net(batch[0]), 0.5, training=self.training)
        return F.cross_entropy(logits, batch[1], reduction="none")


def test_random_op_inside_the_loss(make_trainer, make_model, train_loader):
    with pytest.raises((SelfCheckError, InfluenceConfigurationError), match=r"random"):
        fit(make_trainer, make_model(cls=FunctionalDropout), train_loader, InfluenceTracker())


def test_resume_from_a_checkpoint_without_tracker_state_is_refused(make_trainer, make_model, train_loader, tmp_path):
    """A checkpoint saved without the tracker: a resumed run would score only the later steps."""
    model = make_model()
    trainer = make_trainer(epochs=1, default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=train_loader)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    with pytest.raises(
        InfluenceConfigurationError, match=r"a checkpoint without this tracker's state.*train from the start"
    ):
        make_trainer(InfluenceTracker(), epochs=2).fit(make_model(), train_dataloaders=train_loader, ckpt_path=ckpt)
