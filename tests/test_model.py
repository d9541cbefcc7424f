import pytest
import torch

from trueface.checkpoint import save_checkpoint
from trueface.config.schema import ModelConfig
from trueface.model import WeightsError, build_model, fake_probability


def test_head_is_dropout_then_two_class_linear():
    model = build_model(ModelConfig(weights="none", dropout=0.3))
    assert isinstance(model.fc[0], torch.nn.Dropout) and model.fc[0].p == 0.3
    assert model.fc[1].out_features == 2


def test_imagenet_weights_missing_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match=r"resnet50-11ad3fa6\.pth.*nothing is downloaded"):
        build_model(ModelConfig(weights="imagenet"))


def test_imagenet_weights_from_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    backbone = build_model(ModelConfig(weights="none"))
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth")
    model = build_model(ModelConfig(weights="imagenet"))
    assert torch.equal(model.conv1.weight, state["conv1.weight"])


def test_weights_file_takes_a_checkpoints_ema(tmp_path):
    source = build_model(ModelConfig(weights="none"))
    save_checkpoint(tmp_path / "best.pt", {"model": {}, "ema": source.state_dict(), "stage": 1, "config": {}})
    loaded = build_model(ModelConfig(weights=str(tmp_path / "best.pt")))
    assert torch.equal(loaded.fc[1].weight, source.fc[1].weight)
    with pytest.raises(WeightsError, match="missing.pt does not exist"):
        build_model(ModelConfig(weights=str(tmp_path / "missing.pt")))


def test_fake_probability_keeps_ranking_where_float32_saturates():
    logits = torch.tensor([[0.0, 20.0], [0.0, 25.0]])
    p = fake_probability(logits)
    assert p[1] > p[0] and p.dtype == torch.float64
