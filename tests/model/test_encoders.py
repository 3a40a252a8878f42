"""Vision backbones: every family loads from a saved tiny directory through the user's code path, pools the
right token, round-trips its weights, freezes, and fails with one-line messages instead of downloading."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network from tests

import torch  # noqa: E402

from hierloc.model import backbones, encoders  # noqa: E402
from hierloc.errors import InputError  # noqa: E402
from hierloc.data.images import CLIP_MEAN, CLIP_STD, HALF_MEAN, IMAGENET_MEAN, Preprocessor  # noqa: E402

pytestmark = pytest.mark.integration   # builds and saves a transformers model of every supported family

IMAGE = 32
HIDDEN = 32


def _tiny_config(family: str):
    import transformers as tf

    common = dict(image_size=IMAGE, patch_size=8, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2)
    if family == "vit":
        return tf.ViTConfig(intermediate_size=64, **common)
    if family == "dinov2":
        return tf.Dinov2Config(mlp_ratio=2, **common)
    if family == "clip_vision":
        return tf.CLIPVisionConfig(intermediate_size=64, projection_dim=16, **common)
    if family == "siglip_vision":
        return tf.SiglipVisionConfig(intermediate_size=64, **common)
    if family == "clip_full":
        return tf.CLIPConfig(
            text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1),
            vision_config=dict(intermediate_size=64, **common), projection_dim=16)
    raise ValueError(family)


FAMILIES = ["vit", "dinov2", "clip_vision", "siglip_vision", "clip_full"]
EXPECTED = {  # family -> (model_type of the loaded backbone, pooling, class name)
    "vit": ("vit", "cls", "ViTModel"),
    "dinov2": ("dinov2", "cls", "Dinov2Model"),
    "clip_vision": ("clip_vision_model", "pooler", "CLIPVisionModel"),
    "siglip_vision": ("siglip_vision_model", "pooler", "SiglipVisionModel"),
    "clip_full": ("clip_vision_model", "pooler", "CLIPVisionModel"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (directory with config.json + model.safetensors, the in-memory model that was saved)."""
    from transformers import AutoModel

    torch.manual_seed(0)
    out = {}
    for family in FAMILIES:
        directory = tmp_path_factory.mktemp(family)
        model = AutoModel.from_config(_tiny_config(family)).eval()
        model.save_pretrained(directory)
        out[family] = (directory, model)
    return out


def _pixels(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_loads_from_saved_dir_and_pools_its_documented_token(saved, family):
    directory, original = saved[family]
    model_type, pooling, class_name = EXPECTED[family]
    encoder = encoders.build_image_encoder(directory, pretrained=True).eval()
    assert encoder.info.model_type == model_type
    assert encoder.info.pooling == pooling
    assert type(encoder.backbone).__name__ == class_name
    assert encoder.feature_dim == HIDDEN
    pixels = _pixels()
    features = encoder(pixels)
    assert features.shape == (3, HIDDEN) and features.dtype == torch.float32
    with torch.no_grad():
        reference_model = original.vision_model if family == "clip_full" else original
        outputs = reference_model(pixel_values=pixels)
    # cls: CLS token of the final-layernormed sequence; pooler: the model's own pooled embedding
    expected = outputs.last_hidden_state[:, 0] if pooling == "cls" else outputs.pooler_output
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)


def test_vit_is_built_without_its_unused_pooler(saved):
    model, _info = backbones.load_backbone(saved["vit"][0])
    assert getattr(model, "pooler", None) is None  # no dead parameters (DDP would complain about unused ones)


def test_preprocessor_uses_each_family_statistics(saved):
    assert encoders.build_image_encoder(saved["vit"][0]).preprocessor.mean == IMAGENET_MEAN
    clip = encoders.build_image_encoder(saved["clip_vision"][0]).preprocessor
    assert clip.mean == CLIP_MEAN and clip.std == CLIP_STD and clip.image_size == IMAGE
    assert encoders.build_image_encoder(saved["siglip_vision"][0]).preprocessor.mean == HALF_MEAN


def test_pretrained_weights_round_trip_gives_identical_outputs(saved, tmp_path):
    directory, original = saved["dinov2"]
    first = encoders.build_image_encoder(directory).eval()
    first.save_pretrained(tmp_path / "copy")
    second = encoders.load_image_encoder(tmp_path / "copy")
    pixels = _pixels(seed=3)
    assert torch.equal(first(pixels), second(pixels))
    assert second.preprocessor == first.preprocessor
    assert second.fingerprint() == first.fingerprint()
    with torch.no_grad():
        assert torch.equal(first(pixels), original(pixel_values=pixels).last_hidden_state[:, 0])


def test_fingerprint_changes_when_any_weight_changes(saved):
    encoder = encoders.build_image_encoder(saved["vit"][0])
    before = encoder.fingerprint()
    with torch.no_grad():
        next(iter(encoder.backbone.parameters())).view(-1)[0] += 1e-3
    assert encoder.fingerprint() != before


def test_config_only_directory_trains_from_scratch_but_pretrained_needs_weights(tmp_path):
    directory = backbones.write_backbone_config(tmp_path / "tiny")
    with pytest.raises(InputError, match="no weights") as error:
        backbones.load_backbone(directory, pretrained=True)
    assert str(tmp_path / "tiny") in str(error.value) and "\n" not in str(error.value)
    model, info = backbones.load_backbone(directory, pretrained=False)
    assert info.pretrained is False and info.model_type == "vit"
    encoder = encoders.build_image_encoder(directory, pretrained=False)
    assert encoder.preprocessor.image_size == 64 and encoder.preprocessor.resize_size == 64
    assert encoder(torch.zeros(2, 3, 64, 64)).shape == (2, 96)


def test_builtin_tiny_vit_is_the_documented_size_and_has_no_pretrained_weights():
    encoder = encoders.build_image_encoder("tiny-vit", pretrained=False)
    n_params = sum(p.numel() for p in encoder.parameters())
    assert 300_000 <= n_params <= 1_000_000
    assert encoder(torch.zeros(1, 3, 64, 64)).shape == (1, 96)
    smaller = encoders.build_image_encoder("tiny-vit", pretrained=False, image_size=32)
    assert smaller.preprocessor.image_size == 32 and smaller(torch.zeros(1, 3, 32, 32)).shape == (1, 96)
    with pytest.raises(InputError, match="no pretrained weights"):
        encoders.build_image_encoder("tiny-vit", pretrained=True)


def test_builtin_tiny_resnet_pools_its_feature_map_and_reloads_identically(tmp_path):
    torch.manual_seed(0)
    encoder = encoders.build_image_encoder("tiny-resnet", pretrained=False).eval()
    n_params = sum(p.numel() for p in encoder.parameters())
    assert 500_000 <= n_params <= 1_500_000 and encoder.feature_dim == 192
    assert encoder.preprocessor.image_size == 32 and encoder.info.model_type == "resnet"
    pixels = torch.randn(3, 3, 32, 32)
    features = encoder(pixels)
    # global average pooling of the last stage's map: a feature depends on every part of the image
    shifted = pixels.clone()
    shifted[:, :, :8, :8] += 1.0
    change = (encoder(shifted) - features).detach().abs()
    assert features.shape == (3, 192) and torch.isfinite(features).all() and torch.isfinite(change).all()
    assert float(change.max(dim=1).values.min()) > 1e-2  # every image's features move (float32 noise: ~1e-6)
    encoder.save_pretrained(tmp_path / "backbone")
    reloaded = encoders.load_image_encoder(tmp_path / "backbone")
    assert reloaded.preprocessor.image_size == 32 and torch.equal(reloaded(pixels), features)
    with pytest.raises(InputError, match="no pretrained weights"):
        encoders.build_image_encoder("tiny-resnet", pretrained=True)


def test_unknown_hub_id_fails_fast_with_a_local_only_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(InputError) as error:
        backbones.load_backbone("hierloc-tests/no-such-backbone-xyz")
    elapsed = time.perf_counter() - start
    message = str(error.value)
    assert "not in the local Hugging Face cache and downloads are off" in message
    assert "hierloc-tests/no-such-backbone-xyz" in message and "--allow-download" in message
    assert "tiny-resnet" in message and "tiny-vit" in message  # the two choices that need no download
    assert "\n" not in message
    assert elapsed < 5.0
    with pytest.raises(InputError, match="not in the local Hugging Face cache"):
        backbones.check_backbone("hierloc-tests/no-such-backbone-xyz")  # the cheap check says the same


def test_check_backbone_reads_no_weights(tiny_backbone_dir, tmp_path):
    backbones.check_backbone("tiny-resnet", pretrained=False)
    backbones.check_backbone(tiny_backbone_dir, pretrained=False)  # a config without weights is fine from scratch
    with pytest.raises(InputError, match="no weights found"):
        backbones.check_backbone(tiny_backbone_dir, pretrained=True)
    with pytest.raises(InputError, match="no pretrained weights"):
        backbones.check_backbone("tiny-vit", pretrained=True)
    with pytest.raises(InputError, match="backbone directory not found"):
        backbones.check_backbone(str(tmp_path / "missing" / "dir"), pretrained=False)


@pytest.mark.parametrize("name", ["./missing-dir", "/definitely/not/here/vit"])
def test_missing_local_directory_is_named(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="not found"):
        backbones.load_backbone(name)


def test_directory_without_config_json_is_rejected(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="no config.json"):
        backbones.load_backbone(tmp_path)


def test_text_model_directory_is_not_accepted_as_a_vision_backbone(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               vocab_size=50).save_pretrained(tmp_path)
    with pytest.raises(InputError, match="not a vision model"):
        backbones.load_backbone(tmp_path, pretrained=False)


def test_frozen_encoder_has_no_trainable_parameters_and_stays_in_eval_mode(saved):
    encoder = encoders.build_image_encoder(saved["vit"][0], freeze=True)
    assert encoder.frozen
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert encoder.training and not encoder.backbone.training
    features = encoder(_pixels())
    assert not features.requires_grad
    encoder.frozen = False
    assert all(p.requires_grad for p in encoder.parameters()) and encoder.backbone.training


def test_frozen_encoder_still_gives_input_gradients_for_saliency(saved):
    encoder = encoders.build_image_encoder(saved["vit"][0], freeze=True)
    pixels = _pixels().requires_grad_(True)
    encoder(pixels).sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all()
    assert all(p.grad is None for p in encoder.parameters())


def test_forward_works_under_cpu_bf16_autocast(saved):
    encoder = encoders.build_image_encoder(saved["siglip_vision"][0]).eval()
    pixels = _pixels()
    reference = encoder(pixels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = encoder(pixels)
    assert features.dtype == torch.float32 and torch.isfinite(features).all()
    assert (features - reference).abs().max() < 0.1 * reference.abs().max()



def test_save_pretrained_replaces_each_file_atomically_and_leaves_no_staging(tmp_path, monkeypatch):
    torch.manual_seed(0)
    encoder = encoders.build_image_encoder("tiny-vit", pretrained=False, image_size=32).eval()
    target = tmp_path / "backbone"
    encoder.save_pretrained(target)
    before = {path.name: path.read_bytes() for path in target.iterdir()}
    assert sorted(before) == ["config.json", "model.safetensors", "preprocessor_config.json"]

    def half_written(directory, *args, **kwargs):  # a crash after the first file of the backbone's own save
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    with torch.no_grad():
        next(iter(encoder.backbone.parameters())).view(-1)[0] += 1.0
    monkeypatch.setattr(encoder.backbone, "save_pretrained", half_written)
    with pytest.raises(OSError, match="disk full"):
        encoder.save_pretrained(target)
    assert {path.name: path.read_bytes() for path in target.iterdir()} == before   # the old files, untouched
    assert sorted(path.name for path in tmp_path.iterdir()) == ["backbone"]         # no staging directory left
    monkeypatch.undo()
    encoder.save_pretrained(target)                                                  # a clean save replaces them
    assert sorted(path.name for path in tmp_path.iterdir()) == ["backbone"]
    assert encoders.load_image_encoder(target).fingerprint() == encoder.fingerprint()


@pytest.mark.parametrize("name, size", [("tiny-vit", 32), ("tiny-resnet", 32), ("efficientnet-lite0", 64)])
def test_uint8_pixels_are_normalised_by_the_encoder_with_its_preprocessor(name, size):
    """Every backbone family gets the datasets' uint8 pixels normalised the same way: (x / 255 - mean) / std with
    its own preprocessor's statistics (float64 reference), equal to passing the normalised floats."""
    encoder = encoders.build_image_encoder(name, pretrained=False, image_size=size).eval()
    pixels = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    normalised = encoder.preprocessor.normalise(pixels)
    mean = torch.tensor(encoder.preprocessor.mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(encoder.preprocessor.std, dtype=torch.float64).view(3, 1, 1)
    torch.testing.assert_close(normalised.double(), (pixels.double() / 255 - mean) / std, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(encoder(pixels), encoder(normalised))
    assert not any(key.startswith("pixel_") for key in encoder.state_dict())  # weights and checkpoints unchanged


def test_a_new_preprocessor_replaces_the_normalisation_statistics_on_the_encoders_device():
    encoder = encoders.build_image_encoder("tiny-resnet", pretrained=False).to("meta")
    assert encoder.pixel_mean.device.type == "meta"                          # buffers move with the module
    encoder.preprocessor = Preprocessor(image_size=32, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0))
    assert encoder.pixel_mean.device.type == "meta" and encoder.pixel_std.shape == (3, 1, 1)
    cpu = encoders.build_image_encoder("tiny-resnet", pretrained=False)
    cpu.preprocessor = Preprocessor(image_size=32, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0))
    assert cpu.pixel_std.flatten().tolist() == [1.0, 2.0, 3.0]
    assert cpu.pixel_mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
