"""The three models, their padding discipline, weights files, study windows and GPU-side augmentation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ichdata.errors import UserError
from ichmodel.augment import AugmentConfig, augment, to_float
from ichmodel.models import SequenceClassifier, SliceClassifier, create_model, predict_study, study_windows

BACKBONE = "test_efficientnet"  # timm's tiny test model: a CPU step is cheap


def _batch(lengths: list[int], size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    images = torch.rand(len(lengths), t, 3, size, size, generator=g)
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    return images, mask


@pytest.mark.parametrize(
    ("name", "bidirectional", "cls"),
    [
        ("xception", False, SliceClassifier),
        ("xception_lstm", False, SequenceClassifier),
        ("xception_gru", False, SequenceClassifier),
        ("xception_gru", True, SequenceClassifier),
    ],
)
def test_output_shapes_and_structure(name: str, bidirectional: bool, cls: type) -> None:
    torch.manual_seed(0)
    model = create_model(name, backbone=BACKBONE, bidirectional=bidirectional)
    assert isinstance(model, cls)
    images, mask = _batch([5, 2, 3])
    logits = model(images, mask)
    assert logits.shape == (3, 5, 6)
    assert model.fc.in_features == model.encoder.num_features
    assert model.drop.p == pytest.approx(0.2)
    if isinstance(model, SequenceClassifier):
        assert model.rnn.num_layers == 2
        assert model.rnn.hidden_size == 512
        assert model.rnn.bidirectional is bidirectional
        assert isinstance(model.rnn, torch.nn.LSTM if name == "xception_lstm" else torch.nn.GRU)
        assert model.proj.in_features == 512 * (2 if bidirectional else 1)
        assert model.proj.out_features == model.encoder.num_features


def test_legacy_xception_is_the_default_backbone() -> None:
    model = create_model("xception_gru")
    assert isinstance(model, SequenceClassifier)
    assert type(model.encoder.backbone).__name__ == "Xception"
    assert model.encoder.num_features == 2048
    assert model.rnn.input_size == 2048


@pytest.mark.parametrize(
    ("name", "bidirectional"), [("xception", False), ("xception_lstm", True), ("xception_gru", True)]
)
def test_padding_does_not_reach_the_cnn_or_the_rnn(name: str, bidirectional: bool) -> None:
    """A 3-slice study gives the same logits alone and padded to 7 beside a longer study, whatever the padding holds."""
    torch.manual_seed(0)
    model = create_model(name, backbone=BACKBONE, bidirectional=bidirectional).eval()
    alone_images, alone_mask = _batch([3], seed=1)
    images, mask = _batch([3, 7], seed=2)
    images[0, :3] = alone_images[0]
    images[0, 3:] = 123.0  # garbage in the padding
    with torch.no_grad():
        alone = model(alone_images, alone_mask)[0]
        padded = model(images, mask)[0, :3]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


def test_slice_buckets_do_not_change_the_outputs() -> None:
    """Rounding the CNN batch up (repeating real slices, for cuDNN's plan cache) leaves the logits alone."""
    torch.manual_seed(0)
    model = create_model("xception_gru", backbone=BACKBONE).eval()
    images, mask = _batch([3, 7, 2])
    with torch.no_grad():
        plain = model(images, mask)
        model.encoder.slice_bucket = 8  # 12 real slices -> 16 rows through the CNN
        bucketed = model(images, mask)
    torch.testing.assert_close(bucketed, plain, rtol=1e-5, atol=1e-5)


def test_batchnorm_statistics_ignore_padding() -> None:
    """In training mode BatchNorm's batch statistics (and running averages) come from real slices only."""
    import copy

    torch.manual_seed(0)
    a_model = create_model("xception_gru", backbone=BACKBONE)
    b_model = copy.deepcopy(a_model)
    images, mask = _batch([2, 4])
    other = images.clone()
    images[0, 2:] = 50.0
    other[0, 2:] = -7.0
    torch.manual_seed(1)
    a = a_model(images, mask)
    torch.manual_seed(1)
    b = b_model(other, mask)
    torch.testing.assert_close(a[mask], b[mask], rtol=0, atol=0)
    bn_stats = [k for k in a_model.state_dict() if k.endswith("running_mean")]
    assert bn_stats
    for k in bn_stats:
        assert torch.equal(a_model.state_dict()[k], b_model.state_dict()[k]), k


def test_weights_file_loads_into_the_backbone(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(3)
    source = timm.create_model(BACKBONE)  # with its 1000-way ImageNet classifier, like a real weights file
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)
    model = create_model("xception_gru", backbone=BACKBONE, weights=path)
    loaded = model.encoder.backbone.state_dict()
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("classifier.")}
    assert loaded.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k

    other = tmp_path / "other.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), other)
    with pytest.raises(UserError, match=r"other\.pth: does not fit backbone"):
        create_model("xception", backbone=BACKBONE, weights=other)
    with pytest.raises(UserError, match="no such file"):
        create_model("xception", backbone=BACKBONE, weights=tmp_path / "missing.pth")


def test_bad_names_are_user_errors() -> None:
    with pytest.raises(UserError, match="'resnet_gru' is not one of xception, xception_lstm, xception_gru"):
        create_model("resnet_gru")
    with pytest.raises(UserError, match="'no_such_net' is not a timm model name"):
        create_model("xception", backbone="no_such_net")


def test_study_windows_cover_the_study_in_near_equal_parts() -> None:
    assert study_windows(10, None) == [(0, 10)]
    assert study_windows(10, 64) == [(0, 10)]
    assert study_windows(70, 64) == [(0, 35), (35, 70)]
    assert study_windows(7, 1) == [(i, i + 1) for i in range(7)]
    for n in range(1, 60):
        for t in (1, 2, 5, 16):
            w = study_windows(n, t)
            assert w[0][0] == 0
            assert w[-1][1] == n
            assert all(a < b <= a + t for a, b in w)
            assert all(w[i][1] == w[i + 1][0] for i in range(len(w) - 1))


@pytest.mark.parametrize("name", ["xception", "xception_gru"])
def test_predict_study_matches_the_forward_pass(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, backbone=BACKBONE).eval()
    g = torch.Generator().manual_seed(5)
    study = torch.randint(0, 256, (9, 3, 64, 64), dtype=torch.uint8, generator=g)
    probs = predict_study(model, study, max_len=4, chunk=4)
    assert probs.shape == (9, 6)
    assert ((probs > 0) & (probs < 1)).all()
    with torch.no_grad():
        x = to_float(study)
        if name == "xception":
            expected = torch.sigmoid(model(x[:, None], torch.ones(9, 1, dtype=torch.bool))[:, 0])
        else:  # the windows of 9 slices at max_len 4: [0, 3), [3, 6), [6, 9)
            parts = [
                model(x[a:b][None], torch.ones(1, b - a, dtype=torch.bool))[0] for a, b in study_windows(9, 4)
            ]
            expected = torch.sigmoid(torch.cat(parts))
    torch.testing.assert_close(torch.from_numpy(probs), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="expected uint8"):
        predict_study(model, study.float())


def test_augment_identity_flip_and_shared_geometry() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g)
    group = torch.tensor([0, 0, 1, 1])
    gen = torch.Generator().manual_seed(1)
    none = AugmentConfig(hflip=0.0, rotate_deg=0.0, scale=0.0, shift=0.0)
    out = augment(images, group, none, gen)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, images.float() / 255, atol=1e-5, rtol=0)
    flip = AugmentConfig(hflip=1.0, rotate_deg=0.0, scale=0.0, shift=0.0)
    torch.testing.assert_close(
        augment(images, group, flip, gen), images.flip(-1).float() / 255, atol=1e-5, rtol=0
    )

    same = images[:1].expand(4, -1, -1, -1).contiguous()
    full = AugmentConfig(window_jitter=True)
    out = augment(same, group, full, torch.Generator().manual_seed(2))
    assert torch.equal(out[0], out[1])  # one window, one transform
    assert torch.equal(out[2], out[3])
    assert not torch.equal(out[0], out[2])
    assert out.min() >= 0
    assert out.max() <= 1
    # the same generator state draws the same transforms (what resume relies on)
    again = augment(same, group, full, torch.Generator().manual_seed(2))
    assert torch.equal(out, again)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    import copy

    torch.manual_seed(0)
    plain = create_model("xception_gru", backbone=BACKBONE, drop_rate=0.0)
    ckpt = copy.deepcopy(plain)
    ckpt.encoder.grad_checkpointing = True
    ckpt.encoder.checkpoint_chunk = 7  # all 7 real slices in one chunk: BatchNorm sees the same batch
    images, mask = _batch([4, 3])
    for m in (plain, ckpt):
        m(images, mask).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_variant_table_decides_what_each_model_is() -> None:
    from ichmodel.config import TrainConfig
    from ichmodel.models import VARIANTS, variant

    assert set(VARIANTS) == {"xception", "xception_lstm", "xception_gru"}
    for name, traits in VARIANTS.items():
        model = create_model(name, backbone=BACKBONE, rnn_hidden=8, rnn_layers=1)
        assert isinstance(model, SequenceClassifier) == traits.sequence
        if isinstance(model, SequenceClassifier):
            assert type(model.rnn) is traits.rnn
        assert TrainConfig(store="s.zarr", out="run", model=name).resolve().batch_size == traits.batch_size
    with pytest.raises(UserError, match="model 'resnet' is not one of xception, xception_lstm, xception_gru"):
        variant("resnet")


def test_neighbour_differences_read_each_slices_neighbours_within_its_study() -> None:
    from ichmodel.models import neighbour_differences

    features = torch.tensor([[1.0, 4.0, 9.0, 7.0], [2.0, 3.0, 5.0, 8.0]])[..., None]  # (B=2, T=4, F=1)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    out = neighbour_differences(features, mask)
    assert out.shape == (2, 4, 3)
    assert out[0, :3].tolist() == [[1, 0, -3], [4, 3, -5], [9, 5, 0]]  # no next slice after the last real one
    assert out[1].tolist() == [[2, 0, -1], [3, 1, -2], [5, 2, -3], [8, 3, 0]]
    model = create_model("xception_gru", backbone=BACKBONE, rnn_hidden=8, rnn_layers=1, neighbour_diff=True)
    assert isinstance(model, SequenceClassifier)
    assert model.rnn.input_size == 3 * model.encoder.num_features
    images, mask = _batch([3, 2])
    assert model(images, mask).shape == (2, 3, 6)
