"""The paper's three detectors: Xception, Xception-LSTM and Xception-GRU, on any timm backbone.

All three run every slice of a study through one 2D CNN, a timm model created with `num_classes=0`
(pooled features per slice; `legacy_xception` is the paper's Xception). `SliceClassifier`
(`xception`) classifies each slice on its own; `SequenceClassifier` (`xception_lstm`,
`xception_gru`) gates each slice's features with an RNN over the study's slices. What tells the
variants apart is `VARIANTS`, beside their names: every stage reads it. Inputs are float images in
[0, 1] shaped (B, T, 3, H, W) with a (B, T) bool mask whose True entries come first in each row
(`ichmodel.data.collate_studies`); outputs are logits (B, T, 6). `forward_head` takes the per-slice
features (B, T, F) instead, which is how the sequence stage trains on cached features
(`ich train --features`). `predict_study` turns a uint8 study into probabilities; `load_model`
rebuilds a model from a checkpoint (`ichmodel.checkpoint`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.checkpoint import checkpoint

from ichdata.errors import UserError

DEFAULT_BACKBONE = "legacy_xception"
#: The `create_model` arguments a checkpoint records (`ichmodel.checkpoint`), with their types. A model
#: is rebuilt from these alone, never with `pretrained` or a weights file, whatever else a file holds.
RECORDED_ARGS: dict[str, type] = {
    "name": str,
    "backbone": str,
    "bidirectional": bool,
    "num_classes": int,
    "drop_rate": float,
    "rnn_hidden": int,
    "rnn_layers": int,
    "neighbour_diff": bool,
    "ensemble": int,
}
# A name in timm's registry, with an optional pretrained tag (`resnet50.a1_in1k`): no source prefix
# (`hf-hub:`, `local-dir:`) and no path, for which timm fetches or reads a configuration even
# without pretrained weights.
_PLAIN_TIMM_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?")


@dataclass(frozen=True)
class Variant:
    """What tells one detector from the others: a row of `VARIANTS`.

    Attributes:
        rnn: the recurrent layer over a study's slices, or None for the model that classifies each
            slice on its own.
        batch_size: the default `ich train --batch-size`: study windows per step for a sequence
            model, single slices for the slice model.
    """

    rnn: type[nn.LSTM] | type[nn.GRU] | None
    batch_size: int

    @property
    def sequence(self) -> bool:
        """Whether the model reads study windows: trains on them, and on cached features (`--features`)."""
        return self.rnn is not None


#: The detectors by name (`ich train --model`), with their traits.
VARIANTS: dict[str, Variant] = {
    "xception": Variant(rnn=None, batch_size=64),
    "xception_lstm": Variant(rnn=nn.LSTM, batch_size=4),
    "xception_gru": Variant(rnn=nn.GRU, batch_size=4),
}
MODEL_NAMES: tuple[str, ...] = tuple(VARIANTS)


def variant(name: str) -> Variant:
    """The traits of model `name`; a `UserError` naming the choices for an unknown one."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise UserError(f"model {name!r} is not one of {', '.join(MODEL_NAMES)}") from None


class _Encoder(nn.Module):
    """A timm backbone (pooled features, no classifier) plus the input normalisation it expects.

    `grad_checkpointing` trades compute for memory on long studies: the slices go through the
    backbone in chunks of `checkpoint_chunk`, each recomputed in the backward pass, so only one
    chunk's activations are alive at a time (works for every timm backbone, including
    `legacy_xception`, which has no checkpointing of its own). With BatchNorm in training mode each
    chunk is normalised by its own batch statistics (use chunks of ≥ 32 slices), and the running
    statistics are updated once more when a chunk is recomputed.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_features = int(
            getattr(backbone, "head_hidden_size", None) or cast(Any, backbone).num_features
        )
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.grad_checkpointing = False
        self.checkpoint_chunk = 32
        self.channels_last = False  # set with `model.to(memory_format=torch.channels_last)` on GPU
        #: Round the number of slices per CNN call up to a multiple of this (None: 32 on CUDA, 1 on CPU).
        #: cuDNN builds an execution plan for every new input shape (costly for Xception's many
        #: convolutions, forward and backward); study batches hold a different number of slices each
        #: time, so without rounding nearly every step pays that again. The extra rows repeat real
        #: slices of the batch (never padding) and their outputs are dropped.
        self.slice_bucket: int | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float in [0, 1] -> (N, F) pooled features."""
        x = (images - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            chunks = x.split(self.checkpoint_chunk)
            return torch.cat([checkpoint(self.backbone, c, use_reentrant=False) for c in chunks])
        return self.backbone(x)


class _MeanOfBackbones(nn.Module):
    """K backbones of one architecture whose pooled features are averaged, slice by slice.

    The per-slice CNN of a sequence model trained on out-of-fold features (`ich features RUN_0 …
    RUN_{K-1}`): patients that no fold model trained on got the mean of the K models' features, and
    so does every study this model sees later.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        first = cast(Any, members[0])
        self.num_features = int(getattr(first, "head_hidden_size", None) or first.num_features)
        self.pretrained_cfg = getattr(first, "pretrained_cfg", {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, F), the mean of the members' pooled features."""
        return torch.stack([m(x) for m in self.members]).mean(0)


def mean_encoder(encoders: Sequence[nn.Module]) -> nn.Module:
    """One per-slice CNN whose features are the mean of `encoders`' (their weights shared, not copied).

    `encoders` are the `.encoder` of models on one backbone (one input normalisation): what
    `create_model(..., ensemble=K)` builds, for the rows of out-of-fold features that no fold model
    trained on.
    """
    first = cast(_Encoder, encoders[0])
    mean = first.mean.reshape(-1).tolist()
    std = first.std.reshape(-1).tolist()
    encoder = _Encoder(_MeanOfBackbones([cast(_Encoder, e).backbone for e in encoders]), mean, std)
    encoder.channels_last = first.channels_last
    return encoder.to(first.mean.device)


def neighbour_differences(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, F) -> (B, T, 3F): each slice's features, minus the previous slice's, minus the next's.

    The 2nd place's sequence input (embedding ‖ Δprevious ‖ Δnext). A study's first and last real
    slices have no neighbour on one side: that difference is zero. `mask` (B, T) marks the real
    slices, True first.
    """
    prev = torch.cat([features[:, :1], features[:, :-1]], 1)
    nxt = torch.cat([features[:, 1:], features[:, -1:]], 1)
    has_next = torch.cat([mask[:, 1:], mask.new_zeros(mask.shape[0], 1)], 1)
    d_next = (features - nxt) * has_next.to(features.device, non_blocking=True)[..., None]
    return torch.cat([features, features - prev, d_next], -1)


def real_index(mask: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Flat indices (into B*T) of the real slices, moved to `device`.

    Computed where `mask` lives: with the loader's CPU mask no GPU synchronisation is needed (boolean
    indexing of a GPU tensor by a GPU mask waits for the GPU to finish all queued work).
    """
    return mask.reshape(-1).nonzero().squeeze(1).to(device, non_blocking=True)


def _masked_features(encoder: _Encoder, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Run the CNN on the real slices only and scatter the features back to (B, T, F), zeros at padding."""
    b, t = mask.shape
    idx = mask.reshape(-1).nonzero().squeeze(1)  # where the mask lives: no GPU sync for a CPU mask
    n = idx.numel()
    bucket = encoder.slice_bucket or (32 if images.is_cuda else 1)
    rows = idx
    if n and bucket > 1 and n % bucket:
        rows = torch.cat([idx, idx[torch.arange(bucket - n % bucket, device=idx.device) % n]])
    idx = idx.to(images.device, non_blocking=True)
    rows = rows.to(images.device, non_blocking=True)
    feats = encoder(images.flatten(0, 1).index_select(0, rows))[:n]  # (N, F), N = number of real slices
    return feats.new_zeros(b * t, feats.shape[-1]).index_copy(0, idx, feats).view(b, t, -1)


class SliceClassifier(nn.Module):
    """`xception`: each slice classified on its own (CNN features -> dropout -> linear)."""

    def __init__(self, encoder: _Encoder, num_classes: int = 6, drop_rate: float = 0.2) -> None:
        super().__init__()
        self.encoder = encoder
        self.num_classes = num_classes
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(encoder.num_features, num_classes)

    def forward_features(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-slice CNN features (B, T, F) of images (B, T, 3, H, W), zeros at padding."""
        return _masked_features(self.encoder, images, mask)

    def forward_head(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, num_classes) of per-slice features (B, T, F); `mask` is unused here."""
        return self.fc(self.drop(features))

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, num_classes) of images (B, T, 3, H, W) float and mask (B, T) bool."""
        return self.forward_head(self.forward_features(images, mask), mask)


class SequenceClassifier(nn.Module):
    """`xception_lstm` / `xception_gru`: CNN features gated by an RNN over the study's slices.

    `rnn` is an `nn.LSTM` or `nn.GRU` with `batch_first=True` whose input size is the encoder's
    feature width (three times it with `neighbour_diff`: the RNN then reads each slice's features
    with their differences to its neighbours, `neighbour_differences`); `proj` maps its output
    (hidden size, doubled when bidirectional) to the feature width.

    Our reading of the paper (section IV.B.2.c and its Fig. 3), which says only that "the output of
    these [RNN] layers is then multiplied with the output of the CNN network", then a 6-node sigmoid
    layer with dropout 0.2: the product is element-wise, per slice, between the slice's CNN features
    `f_t` and the RNN's hidden state `h_t` at that slice, so the recurrent context gates the slice's
    own features (`z_t = f_t * W h_t + b`). We project the RNN output up to the CNN's width rather
    than shrinking the CNN features, so the classifier still sees the full per-slice representation.
    The RNN runs over the slices in store order (ascending position along the slice normal);
    `bidirectional=True` (the paper's future work) lets slices below a slice inform it too. Padding
    never reaches the RNN (`pack_padded_sequence`) nor the CNN (only real slices go through it, which
    keeps padding out of BatchNorm's statistics). The mask may stay on the CPU while the images are
    on the GPU (what training does): then the forward pass never waits for the GPU.
    """

    def __init__(
        self,
        encoder: _Encoder,
        rnn: nn.RNNBase,
        num_classes: int = 6,
        drop_rate: float = 0.2,
        neighbour_diff: bool = False,
    ) -> None:
        super().__init__()
        if not rnn.batch_first:
            raise ValueError("the RNN must be batch_first")
        width = encoder.num_features * (3 if neighbour_diff else 1)
        if rnn.input_size != width:
            raise ValueError(f"the RNN reads {rnn.input_size} features per slice, {width} expected")
        self.encoder = encoder
        self.rnn = rnn
        self.neighbour_diff = neighbour_diff
        self.num_classes = num_classes
        rnn_width = rnn.hidden_size * (2 if rnn.bidirectional else 1)
        self.proj = nn.Linear(rnn_width, encoder.num_features)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(encoder.num_features, num_classes)

    def forward_features(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-slice CNN features (B, T, F) of images (B, T, 3, H, W), zeros at padding."""
        return _masked_features(self.encoder, images, mask)

    def forward_head(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, num_classes) of per-slice features (B, T, F) gated by the RNN over real slices."""
        lengths = mask.sum(1).cpu()
        # The RNN runs in float32 even under bf16 autocast: it is a small part of the cost, and
        # cuDNN's reduced-precision RNN paths differ between versions.
        seq = neighbour_differences(features, mask) if self.neighbour_diff else features
        with torch.autocast(features.device.type, enabled=False):
            packed = pack_padded_sequence(seq.float(), lengths, batch_first=True, enforce_sorted=False)
            out, _ = self.rnn(packed)
            context, _ = pad_packed_sequence(out, batch_first=True, total_length=mask.shape[1])
        gated = features * self.proj(context).to(features.dtype)
        return self.fc(self.drop(gated))

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, num_classes) of images (B, T, 3, H, W) float and mask (B, T) bool (True first)."""
        return self.forward_head(self.forward_features(images, mask), mask)


def _load_backbone_weights(backbone: nn.Module, weights: Path) -> None:
    """Load a local timm/PyTorch weights file (.pth, .bin or .safetensors) into `backbone`.

    Classifier weights in the file (e.g. ImageNet's 1000-way `fc`) are dropped; any other mismatch is
    an error, so a file for another architecture cannot load silently half-way.
    """
    from timm.models import load_state_dict

    if not weights.is_file():
        raise UserError(f"--weights {weights}: no such file")
    try:
        state = load_state_dict(str(weights))
    except Exception as exc:  # a corrupt or foreign file: say which
        raise UserError(f"--weights {weights}: cannot read weights ({exc})") from exc
    classifier = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier")
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    for name in classifiers:
        state.pop(f"{name}.weight", None)
        state.pop(f"{name}.bias", None)
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same names, other shapes
        first = str(exc).split("\n\t")[1] if "\n\t" in str(exc) else str(exc)
        raise UserError(
            f"--weights {weights}: does not fit backbone {type(backbone).__name__}: {first}"
        ) from exc
    if result.missing_keys or result.unexpected_keys:
        raise UserError(
            f"--weights {weights}: does not fit backbone {type(backbone).__name__}: "
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
        )


def create_model(
    name: str,
    *,
    backbone: str = DEFAULT_BACKBONE,
    pretrained: bool = False,
    weights: str | Path | None = None,
    bidirectional: bool = False,
    num_classes: int = 6,
    drop_rate: float = 0.2,
    rnn_hidden: int = 512,
    rnn_layers: int = 2,
    grad_checkpointing: bool = False,
    neighbour_diff: bool = False,
    ensemble: int = 1,
) -> SliceClassifier | SequenceClassifier:
    """Build `xception`, `xception_lstm` or `xception_gru` on the timm backbone `backbone`.

    `backbone` is a name in timm's registry (`check_backbone`). `pretrained=True` downloads the
    backbone's weights through timm (needs internet); `weights=FILE` loads a local weights file
    instead. Both only touch the backbone.
    `neighbour_diff` feeds the RNN each slice's features with their differences to its neighbours;
    `ensemble=K` makes the per-slice CNN the mean of K backbones (a sequence model trained on
    out-of-fold features composed with its K fold CNNs).
    """
    import timm

    kind = variant(name)
    check_backbone(backbone)
    if ensemble < 1:
        raise ValueError(f"ensemble {ensemble}: expected at least one backbone")
    try:
        nets = [
            timm.create_model(backbone, pretrained=pretrained and weights is None, num_classes=0)
            for _ in range(ensemble)
        ]
    except RuntimeError as exc:
        if "Unknown model" in str(exc) or "Invalid pretrained tag" in str(exc):
            raise UserError(f"backbone {backbone!r} is not a timm model name") from exc
        raise
    if weights is not None:
        for net in nets:
            _load_backbone_weights(net, Path(weights))
    net = nets[0] if ensemble == 1 else _MeanOfBackbones(nets)
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    encoder = _Encoder(net, cfg.get("mean", (0.5, 0.5, 0.5)), cfg.get("std", (0.5, 0.5, 0.5)))
    encoder.grad_checkpointing = grad_checkpointing
    if kind.rnn is None:
        return SliceClassifier(encoder, num_classes=num_classes, drop_rate=drop_rate)
    width = encoder.num_features * (3 if neighbour_diff else 1)
    rnn = kind.rnn(width, rnn_hidden, num_layers=rnn_layers, batch_first=True, bidirectional=bidirectional)
    return SequenceClassifier(
        encoder, rnn, num_classes=num_classes, drop_rate=drop_rate, neighbour_diff=neighbour_diff
    )


def check_backbone(name: str) -> None:
    """Refuse a backbone that is not a plain timm model name, in one line.

    Plain: registered in timm (`timm.list_models()`), optionally with one of its pretrained tags. A
    Hugging Face Hub name (`hf-hub:…`, `timm/…`), a local folder (`local-dir:…`) or a path is refused:
    timm reaches the network or the file system for those even when no weights are asked for.
    """
    from timm.models import is_model, list_pretrained

    arch, _, tag = name.partition(".")
    if not (_PLAIN_TIMM_NAME.fullmatch(name) and is_model(arch) and (not tag or list_pretrained(name))):
        raise UserError(
            f"backbone {name!r} is not a timm model name (one of `timm.list_models()`, optionally "
            "with a pretrained tag; no hf-hub: or path)"
        )


def load_model(
    checkpoint: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained model from an `ich train` checkpoint (`best.pt` or `last.pt`).

    The model is built from the checkpoint's `RECORDED_ARGS` (checked by `read_checkpoint`) with
    `pretrained=False` and no weights file, then given the checkpoint's weights: loading reaches
    neither the network nor any other file.

    Returns `(model, info)`: the model in eval mode on `device`, and the checkpoint's description
    without tensors: `model` (the `create_model` keyword arguments incl. `name`), `classes`,
    `image_size`, `max_len`, `windows`, `config` (the resolved `TrainConfig` as a dict), `epoch`,
    `val_loss`.
    """
    from ichmodel.checkpoint import checkpoint_info, read_checkpoint

    ckpt = read_checkpoint(checkpoint)
    kwargs = {k: v for k, v in ckpt["model"].items() if k in RECORDED_ARGS}
    name = kwargs.pop("name")
    try:
        model = create_model(name, **kwargs, pretrained=False, weights=None)
        model.load_state_dict(ckpt["state_dict"])
    except UserError as exc:  # an unknown model or backbone name
        raise UserError(f"checkpoint {checkpoint}: {exc}") from None
    except (RuntimeError, TypeError, ValueError) as exc:  # metadata and weights disagree (names or shapes)
        first = str(exc).replace("\n\t", " ").splitlines()[0][:300]
        raise UserError(
            f"checkpoint {checkpoint}: its weights do not fit model {name} on backbone "
            f"{kwargs.get('backbone')!r} ({first})"
        ) from None
    model.to(device).eval()
    return model, checkpoint_info(ckpt)


def study_windows(n_slices: int, max_len: int | None) -> list[tuple[int, int]]:
    """Cut a study of `n_slices` into near-equal contiguous windows of at most `max_len` slices.

    Equal sizes (70 slices, T=64 -> 35 + 35, not 64 + 6) give every window enough context.
    """
    if max_len is None or n_slices <= max_len:
        return [(0, n_slices)]
    k = -(-n_slices // max_len)
    bounds = np.linspace(0, n_slices, k + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


@torch.no_grad()
def predict_study(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    *,
    max_len: int | None = None,
    device: str | torch.device | None = None,
    chunk: int = 64,
) -> np.ndarray:
    """Probabilities (T, 6) float32 for one study given as uint8 (T, 3, H, W) in slice order.

    Sequence models see the study in the same windows as in training (`max_len`, from the
    checkpoint's `info["max_len"]`); the CNN-only model goes through in chunks of `chunk` slices.
    """
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"expected uint8 (T, 3, H, W), got {x.dtype} {tuple(x.shape)}")
    n = x.shape[0]
    if isinstance(model, SequenceClassifier):
        spans = study_windows(n, max_len)
    else:
        spans = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
    out = np.empty((n, int(cast(Any, model).num_classes)), dtype=np.float32)
    for a, b in spans:
        part = x[a:b].to(device, non_blocking=True).float().div_(255)
        if isinstance(model, SequenceClassifier):
            logits = model(part[None], torch.ones(1, b - a, dtype=torch.bool))[0]
        else:
            logits = model(part[:, None], torch.ones(b - a, 1, dtype=torch.bool))[:, 0]
        out[a:b] = torch.sigmoid(logits.float()).cpu().numpy()
    return out
