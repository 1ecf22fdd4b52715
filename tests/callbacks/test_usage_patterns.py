"""Real Lightning usage patterns: exact (against leave-one-out retraining in float64) or refused with the fix.

- transformers: ``nn.TransformerEncoderLayer`` (scaled_dot_product_attention) in a classifier and in a tiny
  causal language model (per-sequence next-token loss); tied input/output weights;
- refused at fit start: weight averaging (SWA, EMA), fine-tuning callbacks that unfreeze mid-fit; refused
  when it happens: a training set swapped between epochs, parameters moved outside the optimizer at any
  step or after the last one; refused at train start: a submodule registered twice, gradient checkpointing;
- the learning-rate finder: its trial steps are never booked; inside fit after the tracker it is refused.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint as checkpoint
from lightning.pytorch.callbacks import (
    BackboneFinetuning,
    Callback,
    EMAWeightAveraging,
    LearningRateFinder,
    StochasticWeightAveraging,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import IndexedDataset, InfluenceConfigurationError, InfluenceTracker, SelfCheckError
from lightning_influence.testing import (
    TinyClassifier,
    fixed_loader,
    leave_one_out,
    lightning_trainer,
    random_schedule,
)

N = 12
EXACT = dict(rtol=1e-8, atol=1e-13)


def _adamw(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.01)


class EncoderClassifier(nn.Module):
    """Inputs ``[B, 4·8]`` read as 4 tokens of width 8; a transformer encoder layer; mean pooling; a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x.view(x.shape[0], -1, 8)).mean(1))


class CausalLM(nn.Module):
    """Tokens ``[B, L]`` → next-token logits ``[B, L, V]``; the output layer shares the embedding's weight."""

    def __init__(self, vocab: int = 7, width: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.layer = nn.TransformerEncoderLayer(width, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.out = nn.Linear(width, vocab, bias=False)
        self.out.weight = self.embed.weight  # tied weights: one Parameter under two names

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], dtype=self.embed.weight.dtype)
        return self.out(self.layer(self.embed(tokens), src_mask=mask, is_causal=True))


def _exact_against_retraining(net_factory, x, y, query):
    schedule = random_schedule(N, 4, 2, seed=0)
    tracker = InfluenceTracker(estimator="exact")
    lightning_trainer(2, callbacks=[tracker]).fit(
        TinyClassifier(net_factory().double(), _adamw), fixed_loader(x, y, schedule)
    )
    loo = leave_one_out(net_factory().double(), _adamw, x, y, schedule, query, range(N))
    torch.testing.assert_close(tracker.influence(query).scores, loo, **EXACT)
    return tracker


def test_a_transformer_encoder_classifier_is_exact():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 32, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=gen)
    tracker = _exact_against_retraining(EncoderClassifier, x, y, (x[:4], y[:4]))
    # the other estimators run through attention as well
    acc = InfluenceTracker(estimator="acc")
    lightning_trainer(2, callbacks=[acc]).fit(
        TinyClassifier(EncoderClassifier().double(), _adamw), fixed_loader(x, y, random_schedule(N, 4, 2, seed=0))
    )
    assert torch.isfinite(acc.influence((x[:4], y[:4])).scores).all() and tracker.steps_booked == 6


def test_a_causal_language_model_with_tied_weights_is_exact():
    gen = torch.Generator().manual_seed(1)
    sequences = torch.randint(0, 7, (N, 6), generator=gen)
    x, y = sequences[:, :-1], sequences[:, 1:]  # next-token prediction: each sequence's loss is its mean token loss
    _exact_against_retraining(CausalLM, x, y, (x[:3], y[:3]))


# ------------------------------------------------------------------------------- refused at fit start
def _data():
    gen = torch.Generator().manual_seed(2)
    return torch.randn(N, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (N,), generator=gen)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _fit(tracker, *callbacks, net=None, epochs=2, loader=None, **kwargs):
    x, y = _data()
    module = TinyClassifier(net if net is not None else _mlp(), _adamw)
    trainer = lightning_trainer(epochs, callbacks=[tracker, *callbacks], **kwargs)
    trainer.fit(module, loader or fixed_loader(x, y, random_schedule(N, 4, epochs, seed=0)))
    return trainer


class _Backbone(TinyClassifier):
    @property
    def backbone(self):
        return self.net[0]


@pytest.mark.parametrize(
    ("callback", "match"),
    [
        pytest.param(
            StochasticWeightAveraging(swa_lrs=0.01), "StochasticWeightAveraging: .*averaged weights", id="swa"
        ),
        pytest.param(EMAWeightAveraging(), "EMAWeightAveraging: .*averaged weights", id="ema"),
        pytest.param(
            BackboneFinetuning(unfreeze_backbone_at_epoch=1), "BackboneFinetuning: .*param groups", id="finetune"
        ),
    ],
)
def test_callbacks_that_move_or_unfreeze_parameters_are_refused(callback, match):
    x, y = _data()
    trainer = lightning_trainer(2, callbacks=[InfluenceTracker(), callback])
    with pytest.raises(InfluenceConfigurationError, match=match):
        trainer.fit(_Backbone(_mlp(), _adamw), fixed_loader(x, y, random_schedule(N, 4, 2, seed=0)))


# ------------------------------------------------------------------------------- checked at every step
class _MovesWeightsAt(Callback):
    def __init__(self, hook: str, step: int | None = None) -> None:
        self.hook, self.step = hook, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.hook == "batch" and trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.net[0].weight.mul_(0.9)

    def on_train_end(self, trainer, pl_module):
        if self.hook == "end":
            with torch.no_grad():
                pl_module.net[0].weight.mul_(0.9)


def test_parameters_moved_at_any_step_stop_the_run():
    with pytest.raises(
        SelfCheckError, match=r"changed outside the optimizer .* start of optimizer step 5.*weight-averaging"
    ):
        _fit(InfluenceTracker(), _MovesWeightsAt("batch", 5))


def test_parameters_moved_after_the_last_step_stop_the_run():
    # the moving callback runs before the tracker's on_train_end
    x, y = _data()
    trainer = lightning_trainer(2, callbacks=[_MovesWeightsAt("end"), InfluenceTracker()])
    with pytest.raises(SelfCheckError, match=r"changed outside the optimizer .* the end of fit"):
        trainer.fit(TinyClassifier(_mlp(), _adamw), fixed_loader(x, y, random_schedule(N, 4, 2, seed=0)))


class _Reloading(TinyClassifier):
    """A new dataset object every epoch (reload_dataloaders_every_n_epochs=1), same or shuffled contents."""

    same_dataset: TensorDataset | None = None

    def train_dataloader(self):
        x, y = _data()
        dataset = self.same_dataset or IndexedDataset(TensorDataset(x.flip(0), y.flip(0)))
        return DataLoader(dataset, batch_size=4, shuffle=False)


def test_a_training_set_swapped_between_epochs_is_refused():
    tracker = InfluenceTracker()
    trainer = lightning_trainer(2, callbacks=[tracker], reload_dataloaders_every_n_epochs=1)
    with pytest.raises(InfluenceConfigurationError, match="training set changed at epoch 1"):
        trainer.fit(_Reloading(_mlp(), _adamw))


def test_reloading_the_same_dataset_is_fine():
    x, y = _data()
    module = _Reloading(_mlp(), _adamw)
    module.same_dataset = IndexedDataset(TensorDataset(x, y))
    tracker = InfluenceTracker()
    lightning_trainer(2, callbacks=[tracker], reload_dataloaders_every_n_epochs=1).fit(module)
    reference = InfluenceTracker()
    _fit(reference, loader=DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=4, shuffle=False))
    torch.testing.assert_close(tracker.influence((x, y)).scores, reference.influence((x, y)).scores, rtol=0, atol=0)


# ------------------------------------------------------------------------------- refused at train start
class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = nn.Linear(4, 4), nn.Linear(4, 3)
        self.proj2 = self.proj

    def forward(self, x):
        return self.head(torch.tanh(self.proj2(torch.tanh(self.proj(x)))))


class _Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(checkpoint.checkpoint(lambda t: torch.tanh(self.body(t)), x, use_reentrant=False))


def test_a_submodule_registered_twice_is_refused():
    with pytest.raises(InfluenceConfigurationError, match=r"'net.proj' is also registered as 'net.proj2'.*once"):
        _fit(InfluenceTracker(), net=_Twice().double())


def test_gradient_checkpointing_is_refused():
    with pytest.raises(InfluenceConfigurationError, match=r"gradient checkpointing.*Disable checkpointing"):
        _fit(InfluenceTracker(), net=_Checkpointed().double())


# ------------------------------------------------------------------------------- the learning-rate finder
@pytest.mark.parametrize("finder_first", [True, False], ids=["finder-first", "tracker-first"])
def test_the_learning_rate_finder_books_no_trial_step(finder_first):
    """Lightning runs tuner callbacks first, wherever they sit: their trial steps (and the restore of their
    temporary checkpoint) happen before the tracker's fit starts, so the tracked fit is the plain one."""
    x, y = _data()
    schedule = random_schedule(N, 4, 2, seed=0)
    reference = InfluenceTracker()
    _fit(reference, loader=fixed_loader(x, y, schedule))
    tracker, finder = InfluenceTracker(), LearningRateFinder(num_training_steps=4, update_attr=False)
    trainer = lightning_trainer(2, callbacks=[finder, tracker] if finder_first else [tracker, finder])
    trainer.fit(TinyClassifier(_mlp(), _adamw), fixed_loader(x, y, schedule))
    assert finder.optimal_lr is not None
    assert tracker.steps_booked == reference.steps_booked == 6
    torch.testing.assert_close(tracker.influence((x, y)).scores, reference.influence((x, y)).scores, **EXACT)
