import pytest
import torch

from trueface.checkpoint import save_checkpoint
from trueface.config.schema import ModelConfig
from trueface.model import WeightsError, build_model, fake_probability


def test_head_is_dropout_then_two_class_linear():
    model = build_model(ModelConfig(weights="none", dropout=0.3))
    assert isinstance(model.fc[0], torch.nn.Dropout) and model.fc[0].p == 0.3
    assert model.fc[1].out_features == 2


def _confident_head(model, images, gap_mean=15.0, gap_std=4.0):
    """Rescale the head so its fp32 logit gaps (fake - real) have the given mean and spread:
    confident scores, which bf16 logits (8 bits of mantissa) round into ties."""
    with torch.no_grad():
        logits = model(images)
        gap = logits[:, 1] - logits[:, 0]
        k = gap_std / gap.std()
        model.fc[1].weight.mul_(k)
        model.fc[1].bias.mul_(k)
        model.fc[1].bias[1] += gap_mean - k * gap.mean()


def test_scores_under_bf16_autocast_do_not_tie():
    torch.manual_seed(0)
    model = build_model(ModelConfig(weights="none")).eval()
    images = torch.rand(96, 3, 32, 32)
    _confident_head(model, images)
    with torch.no_grad():
        fp32 = fake_probability(model(images))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(images)
    assert fp32.unique().numel() == len(images)  # the inputs do give distinct scores
    assert logits.dtype == torch.float32
    distinct = fake_probability(logits).unique().numel()  # 29 of 96 with the head inside autocast
    assert distinct >= 0.99 * len(images)


def test_old_checkpoint_layout_loads(tmp_path):
    # checkpoints written before the fp32 head held an nn.Sequential(Dropout, Linear) as fc
    old = build_model(ModelConfig(weights="none"))
    old.fc = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(2048, 2))
    torch.save(old.state_dict(), tmp_path / "old.pt")
    loaded = build_model(ModelConfig(weights=str(tmp_path / "old.pt")))
    assert torch.equal(loaded.fc[1].weight, old.fc[1].weight)
    assert torch.equal(loaded.fc[1].bias, old.fc[1].bias)


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


def test_resnet18_builds_offline_and_a_resnet50_checkpoint_does_not_fit_it(tmp_path, monkeypatch):
    small = build_model(ModelConfig(arch="resnet18", weights="none"))
    assert small.fc[1].in_features == 512 and small(torch.zeros(2, 3, 32, 32)).shape == (2, 2)
    assert sum(p.numel() for p in small.parameters()) < 0.5 * sum(p.numel() for p in build_model(ModelConfig(weights="none")).parameters())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match=r"(?s)resnet18-f37072fd\.pth.*resnet18\(weights='IMAGENET1K_V1'\)"):
        build_model(ModelConfig(arch="resnet18", weights="imagenet"))
    save_checkpoint(tmp_path / "big.pt", {"model": {}, "ema": build_model(ModelConfig(weights="none")).state_dict(),
                                          "stage": 1, "config": {}})
    with pytest.raises(WeightsError, match="big.pt does not fit this model.arch"):
        build_model(ModelConfig(arch="resnet18", weights=str(tmp_path / "big.pt")))


def test_fake_probability_keeps_ranking_where_float32_saturates():
    logits = torch.tensor([[0.0, 20.0], [0.0, 25.0]])
    p = fake_probability(logits)
    assert p[1] > p[0] and p.dtype == torch.float64
