"""The models people train, with their default settings: each one works, forward-tracked and recorded, or is refused
at the start of fit with a message that names the fix (docs/setups.md, "Coverage of real architectures").

Float32, as these models train; a few steps each. The Hugging Face models are built from small configs, with no
weights (the ``hf`` test extra); their default dropout (0.1) is kept.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import IndexedDataset, InfluenceConfigurationError, InfluenceTracker

V, T, N, C = 30, 6, 16, 3


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module, call: str = "plain") -> None:
        super().__init__()
        self.net, self.call = net, call

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.call == "causal-lm":
            return self.net(input_ids=x).logits[:, -1, :C]
        if self.call == "sequence":
            return self.net(input_ids=x).logits
        if self.call == "image":
            return self.net(pixel_values=x).logits
        return self.net(x)

    def per_sample_loss(self, batch):
        return F.cross_entropy(self.logits(batch[0]), batch[1], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.embed, self.rnn, self.head = nn.Embedding(V, 8), cell(8, 8, batch_first=True), nn.Linear(8, C)

    def forward(self, x):
        return self.head(self.rnn(self.embed(x))[0][:, -1])


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)  # default dropout=0.1
        self.head = nn.Linear(16, C)

    def forward(self, x):
        return self.head(self.layer(self.embed(x)).mean(1))


def _tokens():
    return torch.randint(0, V, (N, T))


def _images():
    return torch.randn(N, 1, 8, 8)


def _hf(name: str):
    transformers = pytest.importorskip("transformers")
    if name == "gpt2":
        config = transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=1, n_head=2)
        return transformers.GPT2LMHeadModel(config), "causal-lm", _tokens()
    if name == "bert":
        config = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=16, num_labels=C)  # fmt: skip
        return transformers.BertForSequenceClassification(config), "sequence", _tokens()
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, num_labels=C)  # fmt: skip
    return transformers.ViTForImageClassification(config), "image", _images()


class ResNet(nn.Module):
    """A stem and one basic residual block (conv → BatchNorm2d → ReLU → conv → BatchNorm2d, plus the input), as
    torchvision's ResNets build them: convolutions without bias before a BatchNorm in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
        )  # fmt: skip
        self.head = nn.Linear(4, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(torch.relu(h + self.block(h)).mean(dim=(2, 3)))


def _model(name: str):
    if name == "cnn-dropout":
        conv = [nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5), nn.Linear(4 * 6 * 6, C)]
        return nn.Sequential(*conv), "plain", _images()
    if name == "resnet-batchnorm":
        return ResNet(), "plain", _images()
    if name in ("lstm", "gru"):
        return Recurrent(nn.LSTM if name == "lstm" else nn.GRU), "plain", _tokens()
    if name == "transformer-encoder":
        return Encoder(), "plain", _tokens()
    return _hf(name)


REFUSED = {
    ("transformer-encoder", "recorded"): r"record_trajectory=True with attention dropout \('net.layer.self_attn', 'net",
}
"""(model, mode) → the message of its refusal; every other pair works."""
MODELS = ["cnn-dropout", "transformer-encoder", "resnet-batchnorm", "lstm", "gru", "gpt2", "bert", "vit"]


@pytest.mark.parametrize("mode", ["forward", "recorded"])
@pytest.mark.parametrize("name", MODELS)
def test_a_real_architecture_works_or_is_refused_with_its_fix(name, mode, tmp_path):
    torch.manual_seed(0)
    net, call, x = _model(name)
    y = torch.randint(0, C, (N,))
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=8)
    query = {"val": (x[:4], y[:4])}
    if mode == "forward":
        tracker = InfluenceTracker(track=list(range(6)), queries=query, write_artifacts=False)
    else:
        tracker = InfluenceTracker(track=(), record_trajectory=True, queries=query, dirpath=tmp_path)
    trainer = pl.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[tracker])  # fmt: skip
    refused = REFUSED.get((name, mode))
    if refused is not None:
        with pytest.raises(InfluenceConfigurationError, match=refused):
            trainer.fit(Classifier(net, call), loader)
        return
    trainer.fit(Classifier(net, call), loader)
    result = tracker.influence("val", all_samples=mode == "recorded")
    assert result.scores.numel() == (6 if mode == "forward" else N)
    assert bool(torch.isfinite(result.scores).all()) and bool(result.scores.abs().sum() > 0)
