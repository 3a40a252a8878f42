"""The model directory: the one place that writes and reads it (format version, files, checks).

Layout (what ``hierloc train`` writes, what ``HierLoc.from_pretrained`` reads):
    config.json            format version, the resolved run config, feature dim, gazetteer content hash
    model.safetensors      image head, entity anchors, fusion MLP, buffers, loss parameters (tau, lambda, sigma)
    backbone/              the image backbone in transformers' own format (config.json + model.safetensors)
    gazetteer/             the gazetteer the model was trained on (its hash is checked on load)
    concepts.json          the concept head's vocabulary (models with a concept head)
    train_summary.json     what training reported (written by ``hierloc train``; copied by ``save_pretrained``)
    calibration.json       optional: per-level temperatures of the reported probabilities (`Calibration`, written
                           by ``hierloc calibrate``; a directory without it reports uncalibrated probabilities)
    checkpoints/           resumable training state (`hierloc.training.checkpoint`)

No pickle anywhere: tensors are safetensors files, everything else JSON. A pickled file where weights are expected
(a ``.pt``/``.pkl`` given as the model, or a ``model.safetensors`` replaced by one) is refused without being
unpickled (`looks_pickled`); so is a backbone with ``pytorch_model.bin`` weights only
(`hierloc.model.backbones.load_backbone`). Each safetensors file written here carries, in its header metadata
(`hierloc_sha256`), a SHA-256 of its tensors (`tensors_digest`: name, dtype, shape and bytes of each, in name
order). Reading checks it, so bytes changed after writing (a bad disk, a botched copy) are refused instead of
silently giving other weights; files without the key (written by older versions) are read without the check.
safetensors itself checks the header and the file size (truncation), and never runs code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gazetteer import Gazetteer
from gazetteer.atomic import atomic_directory, atomic_write_bytes, atomic_write_text
from gazetteer.schema import N_LEVELS
from hierloc.config import Config, from_dict
from hierloc.device import resolve_device
from hierloc.errors import InputError
from hierloc.model.concepts import VOCABULARY_FILE, ConceptVocabulary
from hierloc.model.encoders import ImageEncoder, load_image_encoder
from hierloc.model.network import EntityTable, HierLocModel, temperature
from hierloc.version import __version__

log = logging.getLogger(__name__)

MODEL_FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TRAIN_SUMMARY_NAME = "train_summary.json"
CALIBRATION_NAME = "calibration.json"
CALIBRATION_FORMAT_VERSION = 2
CHECKSUM_KEY = "hierloc_sha256"
LOSS_PREFIX = "loss."   # the loss's tensors in model.safetensors (inference reads loss.log_tau: the temperature)


# ------------------------------------------------------------------------------------------------ tensors
def looks_pickled(head: bytes) -> bool:
    """Whether a file starting with these bytes is a pickle (protocol >= 2) or a torch.save zip archive: hierloc
    refuses such files without opening them further (it never unpickles)."""
    return head[:1] == b"\x80" or head[:2] == b"PK"


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """Hex SHA-256 of named tensors, independent of the file layout: for each name in sorted order, the line
    'name|dtype|shape' then the tensor's bytes (C order, native little-endian)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        _digest_update(digest, name, tensors[name])
    return digest.hexdigest()


def _digest_update(digest, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().to("cpu").contiguous()
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode("utf-8"))
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy())


def seal_tensors_file(path: str | Path) -> None:
    """Rewrite a safetensors file written by another library (transformers' backbone) with its `tensors_digest`
    added to the header metadata (the rest of the metadata kept), so that `verify_tensors_file` can check it."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    metadata.pop(CHECKSUM_KEY, None)
    save_tensors(path, tensors, metadata=metadata)


def verify_tensors_file(path: str | Path) -> None:
    """Check a safetensors file without keeping its tensors (one tensor in memory at a time): header and size
    (truncation), and the `hierloc_sha256` of its header metadata when it has one; one-line InputError naming the
    file otherwise."""
    from safetensors import safe_open

    path = Path(path)
    with open(path, "rb") as handle:
        if looks_pickled(handle.read(2)):
            raise InputError(f"{path}: this looks like a pickle/torch.save file; hierloc only reads safetensors "
                             "and never unpickles")
    try:
        with safe_open(str(path), framework="pt") as handle:
            expected = (handle.metadata() or {}).get(CHECKSUM_KEY)
            digest = hashlib.sha256()
            for name in sorted(handle.keys()) if expected is not None else ():
                _digest_update(digest, name, handle.get_tensor(name))
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a corrupt or truncated file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: not a valid safetensors file (truncated or corrupt: {reason})") from None
    if expected is not None and digest.hexdigest() != expected:
        raise InputError(f"{path}: corrupt: its tensors no longer match the checksum written with them "
                         f"(sha256 {digest.hexdigest()[:12]}..., expected {expected[:12]}...); restore the file "
                         "from a good copy")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a dict of tensors as safetensors, atomically, with their `tensors_digest` in the header metadata."""
    from safetensors.torch import save

    clean = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    metadata = dict(metadata or {}, **{CHECKSUM_KEY: tensors_digest(clean)})
    atomic_write_bytes(Path(path), save(clean, metadata=metadata))


def _header_metadata(data: bytes) -> dict:
    """The `__metadata__` of a safetensors file's JSON header ({} if absent); the file has already parsed."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]).get("__metadata__") or {}


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, pickled, truncated or corrupt file (including tensors that no longer
    match the stored checksum) is a one-line InputError. Never unpickles."""
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        needs = (f"a training checkpoint needs {WEIGHTS_NAME}, optimizer.safetensors, optimizer.json and "
                 "trainer_state.json" if path.parent.name.startswith("step-") else
                 f"a model directory needs {WEIGHTS_NAME} and {CONFIG_NAME}")
        raise InputError(f"{path}: file not found ({needs})")
    data = path.read_bytes()
    if looks_pickled(data):
        raise InputError(f"{path}: this looks like a pickle/torch.save file; hierloc only reads safetensors and "
                         "never unpickles (convert it with safetensors.torch.save_file)")
    try:
        tensors = load(data)
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a corrupt or truncated file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: not a valid safetensors file (truncated or corrupt: {reason})") from None
    expected = _header_metadata(data).get(CHECKSUM_KEY)
    if expected is not None:
        actual = tensors_digest(tensors)
        if actual != expected:
            raise InputError(f"{path}: corrupt: its tensors no longer match the checksum written with them "
                             f"(sha256 {actual[:12]}..., expected {expected[:12]}...); restore the file from a "
                             "good copy")
    return tensors


def read_json(path: str | Path, what: str) -> dict:
    path = Path(path)
    if path.exists() and not path.is_file():
        raise InputError(f"{path}: {what} is not a file")
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: {what} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise InputError(f"{path}: {what} cannot be read ({exc.strerror or exc})") from None


# ------------------------------------------------------------------------------------------------ calibration
@dataclass
class Calibration:
    """calibration.json: per-level temperatures (country, region, subregion, city) of the reported probabilities.

    temperatures: for beam search; flat_temperatures: for the flat search (None: reported at T = 1).
    weights_sha256: the `tensors_digest` of the model.safetensors it was fitted for (a calibration of other
    weights is refused on load). The rest records the fit: the CSV's file name, the rows used, the beam width,
    and the expected calibration error per level before and after (`hierloc.inference.calibration`).
    familiarity: the per-image temperatures, prediction-set references and error radius fitted by
    `hierloc calibrate` (`hierloc.inference.familiarity`); when present they replace the temperatures.
    """

    temperatures: list[float]
    flat_temperatures: list[float] | None = None
    weights_sha256: str | None = None
    fitted_on: str = ""
    n: int = 0
    beam: int | None = None
    ece_before: list[float | None] = field(default_factory=list)
    ece_after: list[float | None] = field(default_factory=list)
    flat_ece_before: list[float | None] = field(default_factory=list)
    flat_ece_after: list[float | None] = field(default_factory=list)
    # the calibration conditioned on familiarity, prediction sets and error radius
    # (`hierloc.inference.familiarity.FamiliarityCalibration.to_dict`; None: the temperatures alone)
    familiarity: dict | None = None
    n_unlike: int = 0

    def to_json(self) -> str:
        def clean(value):
            if isinstance(value, list):
                return [clean(item) for item in value]
            return None if isinstance(value, float) and not math.isfinite(value) else value
        data = {key: clean(value) for key, value in asdict(self).items()}
        return json.dumps({"format_version": CALIBRATION_FORMAT_VERSION, **data}, indent=2)


def _temperature_list(path: Path, data: dict, key: str, required: bool) -> list[float] | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if (not isinstance(value, list) or len(value) != N_LEVELS
            or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0
                       for t in value)):
        raise InputError(f"{path}: field '{key}': expected {N_LEVELS} positive numbers (country, region, "
                         f"subregion, city), got {json.dumps(value)[:80]}; fit it again with `hierloc calibrate` "
                         "or delete the file")
    return [float(t) for t in value]


def read_calibration(model_dir: str | Path) -> Calibration | None:
    """The model directory's calibration.json, checked (None when the directory has none). A malformed file is a
    one-line InputError naming the file and the field; a calibration.json that is there but unreadable (even a
    directory of that name) is an error too, never silently uncalibrated probabilities."""
    path = Path(model_dir) / CALIBRATION_NAME
    if not path.exists() and not path.is_symlink():
        return None
    data = read_json(path, "calibration")
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object with a field 'temperatures'")
    version = data.get("format_version", CALIBRATION_FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version > CALIBRATION_FORMAT_VERSION:
        raise InputError(f"{path}: field 'format_version': expected an integer <= {CALIBRATION_FORMAT_VERSION}, "
                         f"got {json.dumps(version)[:40]}")
    digest = data.get("weights_sha256")
    if digest is not None and not isinstance(digest, str):
        raise InputError(f"{path}: field 'weights_sha256': expected a hex string, got {json.dumps(digest)[:40]}")
    known = {name for name in Calibration.__dataclass_fields__}
    record = {key: value for key, value in data.items() if key in known}
    record["temperatures"] = _temperature_list(path, data, "temperatures", required=True)
    record["flat_temperatures"] = _temperature_list(path, data, "flat_temperatures", required=False)
    return Calibration(**record)


def write_calibration(model_dir: str | Path, calibration: Calibration) -> Path:
    """Write calibration.json into a model directory, atomically."""
    path = Path(model_dir) / CALIBRATION_NAME
    atomic_write_text(path, calibration.to_json() + "\n")
    return path


def weights_digest(model_dir: str | Path) -> str | None:
    """The `tensors_digest` stored in the header of a model directory's weights (None for files written without
    it); reads the header only."""
    with open(Path(model_dir) / WEIGHTS_NAME, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    return (header.get("__metadata__") or {}).get(CHECKSUM_KEY)


# ------------------------------------------------------------------------------------------- model directory
@dataclass
class ModelDir:
    """A loaded model directory: the run config, the network (encoder attached, eval mode, on `device`), the
    loss's saved tensors (`temperature_of` reads tau from them), the encoder, the gazetteer and the calibration
    (calibration.json, None without one)."""

    cfg: Config
    model: HierLocModel
    loss_state: dict[str, torch.Tensor]
    encoder: ImageEncoder
    gazetteer: Gazetteer
    device: torch.device
    source: str
    calibration: Calibration | None = None


def temperature_of(loss_state: dict[str, torch.Tensor]) -> float:
    """The softmax temperature tau of a model, from its loss's saved tensors (log_tau, clamped as in training)."""
    return float(temperature(loss_state["log_tau"]).detach())


def not_a_model_dir_message(path: Path) -> str:
    """For a file given where a model directory is expected (a .pt/.pkl checkpoint, a single weights file)."""
    with open(path, "rb") as handle:
        pickled = looks_pickled(handle.read(2))
    what = ("; it looks like a pickle/torch.save file, which hierloc never unpickles" if pickled else "")
    return (f"{path}: expected a model directory (config.json + model.safetensors + backbone/ + gazetteer/, "
            f"what `hierloc train` writes), got a file{what}")


def save_model_dir(out_dir: str | Path, cfg: Config, model, loss_state: dict[str, torch.Tensor], encoder,
                   gaz) -> None:
    """Write (or refresh) the loadable part of a model directory; each file atomically. A calibration.json left
    from earlier weights is removed (it was fitted for those weights)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CALIBRATION_NAME).unlink(missing_ok=True)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    state.update({f"{LOSS_PREFIX}{k}": v for k, v in loss_state.items()})
    save_tensors(out / WEIGHTS_NAME, state, metadata={"format": "hierloc"})
    encoder.save_pretrained(out / "backbone")
    for weights in sorted((out / "backbone").glob("*.safetensors")):
        seal_tensors_file(weights)   # a digest in its header: `load_model_dir` detects changed bytes
    if not (out / "gazetteer").is_dir():
        gaz.save(out / "gazetteer", overwrite=True)
    n_concepts = int(model.concept_head.n_concepts) if getattr(model, "concept_head", None) is not None else 0
    vocabulary = getattr(model, "concept_vocabulary", None)
    if n_concepts and vocabulary is not None:
        vocabulary.save(out)  # concepts.json: the names/groups/descriptions of the head's outputs
    meta = {"format_version": MODEL_FORMAT_VERSION, "hierloc_version": __version__, "config": cfg.to_dict(),
            "feature_dim": int(model.feature_dim), "n_concepts": n_concepts, "gazetteer_hash": gaz.content_hash,
            "backbone_dir": "backbone", "gazetteer_dir": "gazetteer"}
    atomic_write_text(out / CONFIG_NAME, json.dumps(meta, indent=2))


def write_model_dir(out_dir: str | Path, parts: ModelDir, overwrite: bool = False) -> Path:
    """A complete model directory that `load_model_dir` reloads, written atomically (all or nothing).

    An existing directory is replaced only with overwrite=True and only if it is a model directory (has
    config.json) or empty. The training summary of `parts.source`, if any, is copied along, and so is
    `parts.calibration` (refitted to the new file's weights digest, which is the same for unchanged weights).
    """
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_NAME).is_file():
        raise InputError(f"refusing to replace {out}: it is not a model directory (no {CONFIG_NAME})")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_model_dir(tmp, parts.cfg, parts.model, parts.loss_state, parts.encoder, parts.gazetteer)
        summary = Path(parts.source) / TRAIN_SUMMARY_NAME
        if summary.is_file():
            shutil.copyfile(summary, tmp / TRAIN_SUMMARY_NAME)
        if parts.calibration is not None:
            digest = weights_digest(tmp)
            if parts.calibration.weights_sha256 in (None, digest):
                write_calibration(tmp, Calibration(**{**asdict(parts.calibration), "weights_sha256": digest}))
            else:
                log.warning("%s: the calibration was fitted for other weights; not copied", out)
    return out


def _weights_origin(cfg) -> str:
    """How a saved model's backbone weights came about, for the log."""
    if not cfg.model.pretrained:
        return "trained from scratch"
    return f"pretrained {cfg.model.backbone}, " + ("frozen" if cfg.model.freeze_backbone else "fine-tuned")


def resolve_model_dir(name_or_path: str | Path, allow_download: bool = False) -> Path:
    """A model directory, or a Hugging Face Hub model id (`owner/name`, an uploaded model directory) -> the local
    directory. A hub id is taken from the local cache (`HF_HUB_CACHE`, default ~/.cache/huggingface/hub) and
    downloaded only with allow_download; InputError (one line) when it is neither a directory nor available."""
    path = Path(name_or_path)
    text = str(name_or_path)
    if path.exists() or not _looks_like_hub_id(text):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                                      local_files_only=not allow_download))
    except LocalEntryNotFoundError:
        raise InputError(f"{text}: no such model directory, and no hub model {text!r} in the local Hugging Face "
                         "cache (downloads are off: pass --allow-download, or allow_download=True, to fetch it)"
                         ) from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        detail = " ".join(str(error).split())[:200]
        raise InputError(f"{text}: no such model directory, and the hub model cannot be fetched ({detail})") from None


def _looks_like_hub_id(text: str) -> bool:
    """`owner/name` with no other separator, not starting like a path."""
    parts = text.split("/")
    return (len(parts) == 2 and all(parts) and "\\" not in text and not text.startswith((".", "~"))
            and not any(ch.isspace() for ch in text))


def load_model_dir(model_dir: str | Path, device: str = "auto", allow_download: bool = False,
                   with_calibration: bool = True) -> ModelDir:
    """Load a model directory written by `hierloc train` or `write_model_dir` (or a hub id of one, see
    `resolve_model_dir`). device: auto, cpu or cuda. with_calibration=False: calibration.json is not read
    (`hierloc calibrate`, which replaces it, even when it is damaged); ModelDir.calibration is then None.

    One-line InputError for: a file instead of a directory (pickles named as such), a missing directory or
    config.json, a newer format version, a gazetteer whose content hash differs from the one trained on, pickled,
    truncated or corrupt weights, weights that do not match config.json, a concept head without concepts.json.
    """
    root = resolve_model_dir(model_dir, allow_download)
    meta = _read_model_config(root)
    cfg = from_dict(meta["config"], source=str(root / CONFIG_NAME))
    dev = resolve_device(device)
    gaz = _load_gazetteer(root, meta)
    state = load_tensors(root / WEIGHTS_NAME)
    for weights in sorted((root / meta.get("backbone_dir", "backbone")).glob("*.safetensors")):
        verify_tensors_file(weights)
    encoder = load_image_encoder(root / meta.get("backbone_dir", "backbone"), weights_origin=_weights_origin(cfg))
    model = HierLocModel(cfg.model, EntityTable.from_gazetteer(gaz), int(meta["feature_dim"]), encoder=None,
                         n_concepts=int(meta.get("n_concepts", 0)))
    model_state = {k: v for k, v in state.items() if not k.startswith(LOSS_PREFIX)}
    loss_state = {k[len(LOSS_PREFIX):]: v for k, v in state.items() if k.startswith(LOSS_PREFIX)}
    try:
        model.load_state_dict(model_state, strict=True)
        if "log_tau" not in loss_state:
            raise RuntimeError(f"missing {LOSS_PREFIX}log_tau (the temperature)")
    except RuntimeError as exc:
        raise InputError(f"{root / WEIGHTS_NAME}: weights do not match config.json "
                         f"({str(exc).splitlines()[0]})") from None
    model.encoder = encoder
    if model.concept_head is not None:
        if not (root / VOCABULARY_FILE).is_file():
            raise InputError(f"{root}: the model has a concept head but {VOCABULARY_FILE} is missing")
        model.concept_vocabulary = ConceptVocabulary.load(root / VOCABULARY_FILE)
        if len(model.concept_vocabulary) != model.concept_head.n_concepts:
            raise InputError(f"{root / VOCABULARY_FILE}: {len(model.concept_vocabulary)} concepts, but the model's "
                             f"concept head has {model.concept_head.n_concepts} outputs (n_concepts in "
                             f"{CONFIG_NAME}); put back the concepts.json written with the model")
    model.to(dev).eval()
    loss_state = {k: v.to(dev) for k, v in loss_state.items()}
    calibration = _checked_calibration(root) if with_calibration else None
    return ModelDir(cfg, model, loss_state, encoder, gaz, dev, str(root), calibration)


def _checked_calibration(root: Path) -> Calibration | None:
    """`read_calibration`, refused (one line) when it was fitted for weights other than the directory's."""
    calibration = read_calibration(root)
    if calibration is not None and calibration.weights_sha256 is not None:
        digest = weights_digest(root)
        if digest is not None and digest != calibration.weights_sha256:
            raise InputError(f"{root / CALIBRATION_NAME}: field 'weights_sha256': fitted for other weights "
                             f"({calibration.weights_sha256[:12]}..., the model has {digest[:12]}...); run "
                             "`hierloc calibrate` again or delete the file")
    return calibration


def _read_model_config(root: Path) -> dict:
    """config.json of a model directory, checked: a JSON object with a supported integer format_version, the
    run config and the feature dim."""
    if root.is_file():
        raise InputError(not_a_model_dir_message(root))
    if not root.is_dir():
        raise InputError(f"{root}: model directory not found (train one with `hierloc train`)")
    meta = read_json(root / CONFIG_NAME, "model config")
    version = meta.get("format_version", 0) if isinstance(meta, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise InputError(f"{root / CONFIG_NAME}: expected a JSON object with an integer format_version "
                         "(the model config `hierloc train` writes)")
    if version > MODEL_FORMAT_VERSION:
        raise InputError(f"{root / CONFIG_NAME}: format_version {version} is newer than this hierloc "
                         f"supports ({MODEL_FORMAT_VERSION}); upgrade hierloc")
    if "config" not in meta or "feature_dim" not in meta:
        raise InputError(f"{root / CONFIG_NAME}: missing field 'config' or 'feature_dim'")
    _check_config_fields(root / CONFIG_NAME, meta)
    return meta


def _check_config_fields(path: Path, meta: dict) -> None:
    """One-line InputError naming the field of config.json whose type is wrong."""
    def count(value, minimum):
        return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

    checks = [("config", isinstance(meta["config"], dict), "a JSON object (the run config)"),
              ("feature_dim", count(meta["feature_dim"], 1), "a positive integer"),
              ("n_concepts", count(meta.get("n_concepts", 0), 0), "a non-negative integer")]
    checks += [(key, isinstance(meta.get(key, ""), str), "a string")
               for key in ("backbone_dir", "gazetteer_dir", "gazetteer_hash")]
    for key, ok, expected in checks:
        if not ok:
            raise InputError(f"{path}: field '{key}': expected {expected}, got {json.dumps(meta.get(key))[:60]}")


def _load_gazetteer(root: Path, meta: dict) -> Gazetteer:
    """The model's gazetteer; InputError when its content hash is not the one the model was trained on."""
    gaz = Gazetteer.load(root / meta.get("gazetteer_dir", "gazetteer"))
    if gaz.content_hash != meta.get("gazetteer_hash"):
        trained_on = str(meta.get("gazetteer_hash"))[:16]
        raise InputError(f"{root}: the model was trained on the gazetteer with content hash {trained_on}, but "
                         f"{root / meta.get('gazetteer_dir', 'gazetteer')} has content hash "
                         f"{gaz.content_hash[:16]}: its entities would be the wrong places; put back the "
                         "gazetteer the model was trained on")
    return gaz
