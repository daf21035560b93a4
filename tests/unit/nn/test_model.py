"""3D ResNets: output shapes per params row, the features/classify split, name errors."""

import pytest
import torch

from orchestrator.nn.model import MODEL_PARAMS, build_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (name, stem, input shape, expected logits shape); width 4 keeps every row fast.
SHAPE_ROWS = [
    ("resnet_tiny", "small", (2, 1, 8, 8, 8), (2, 3)),
    ("resnet_tiny", "full", (2, 1, 32, 32, 32), (2, 3)),
    ("resnet10", "full", (2, 1, 32, 32, 32), (2, 3)),
    ("resnet10", "small", (1, 1, 12, 12, 12), (1, 3)),
    ("resnet18", "small", (1, 1, 16, 16, 16), (1, 3)),
    ("resnet18", "full", (2, 1, 40, 40, 40), (2, 3)),
    ("resnet34", "full", (1, 1, 32, 32, 32), (1, 3)),
]


@pytest.mark.parametrize(("name", "stem", "in_shape", "out_shape"), SHAPE_ROWS)
def test_logits_have_one_row_per_volume_and_one_column_per_class(name, stem, in_shape, out_shape):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, width=4, stem=stem).eval()
    with torch.inference_mode():
        assert tuple(model(torch.randn(in_shape)).shape) == out_shape


@pytest.mark.parametrize(("name", "n_stages"), [("resnet_tiny", 2), ("resnet18", 4)])
def test_features_are_the_last_stage_width_wide(name, n_stages):
    model = build_model(name, num_classes=3, width=4, stem="small").eval()
    with torch.inference_mode():
        feats = model.features(torch.randn(2, 1, 8, 8, 8))
    assert tuple(feats.shape) == (2, 4 * 2 ** (n_stages - 1))
    assert model.embedding_dim == 4 * 2 ** (n_stages - 1)


def test_two_channel_input_is_accepted_when_asked_for():
    model = build_model("resnet_tiny", num_classes=2, width=4, stem="small", in_channels=2).eval()
    with torch.inference_mode():
        assert tuple(model(torch.randn(1, 2, 8, 8, 8)).shape) == (1, 2)


def test_features_then_classify_is_forward():
    torch.manual_seed(0)
    model = build_model("resnet10", num_classes=5, width=4, stem="small", dropout=0.5).eval()
    x = torch.randn(3, 1, 8, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(model.classify(model.features(x)), model(x))


def test_dropout_acts_in_train_mode_only():
    torch.manual_seed(0)
    model = build_model("resnet_tiny", num_classes=4, width=4, dropout=0.5)
    feats = torch.randn(8, model.embedding_dim)
    model.eval()
    torch.testing.assert_close(model.classify(feats), model.fc(feats))
    model.train()
    assert not torch.allclose(model.classify(feats), model.fc(feats))


def test_final_layer_is_fc_linear_from_embedding_to_classes():
    model = build_model("resnet18", num_classes=7, width=8)
    assert tuple(model.fc.weight.shape) == (7, 64)


def test_unknown_model_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="resnet1000") as info:
        build_model("resnet1000", num_classes=2)
    for name in MODEL_PARAMS:
        assert name in str(info.value)


def test_unknown_stem_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"'full', 'small'"):
        build_model("resnet10", num_classes=2, stem="huge")


def test_full_stem_shrinks_the_input_fourfold_before_the_stages():
    model = build_model("resnet10", num_classes=2, width=4, stem="full").eval()
    with torch.inference_mode():
        assert tuple(model.stem(torch.randn(1, 1, 32, 32, 32)).shape) == (1, 4, 8, 8, 8)
