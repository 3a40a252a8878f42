"""Frozen-backbone feature cache: rows equal the encoder's outputs, reuse is free, ranks compose, stale caches
are re-extracted, reads go through memory maps."""

from __future__ import annotations

import copy
import json
import pickle
import zlib
from datetime import timedelta

import numpy as np
import pytest
import torch
from PIL import Image

from hierloc.data import tables as data
from hierloc.model import backbones, encoders
from hierloc.training import features
from hierloc.errors import InputError
from hierloc.data.images import load_image
from tests.helpers import restored_log_levels

N_IMAGES = 11
BROKEN = 6  # row whose file is not an image


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A saved tiny ViT (config.json + model.safetensors + preprocessor_config.json), 24 features at 16 px."""
    from transformers import ViTConfig

    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=48)
    directory = backbones.write_backbone_config(tmp_path_factory.mktemp("backbone"), config,
                                               backbones.tiny_vit_preprocessor(16))
    encoders.build_image_encoder(directory, pretrained=False).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def encoder(encoder_dir):
    return encoders.build_image_encoder(encoder_dir, freeze=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(N_IMAGES):
        path = root / f"{i:02d}.png"
        if i == BROKEN:
            path.write_text("not an image")
        else:
            Image.fromarray(rng.integers(0, 255, (18 + i, 20, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    table = data.ImageTable.from_arrays(paths, np.linspace(-50, 50, N_IMAGES), np.linspace(0, 100, N_IMAGES))
    return data.ImageDataset(table, backbones.tiny_vit_preprocessor(16), train=False)


class ForwardCounter:
    """Counts images passed through the encoder (a forward hook), to tell extraction from reuse."""

    def __init__(self, module):
        self.images = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, _module, inputs, _output):
        self.images += int(inputs[0].shape[0])

    def close(self):
        self.handle.remove()


def _direct(encoder, dataset, index):
    pixels = dataset.preprocessor([load_image(dataset.table.paths[index])])
    with torch.no_grad():
        return encoder(pixels)[0].numpy()


def test_extracted_rows_equal_direct_encoder_outputs_and_failed_rows_are_nan(encoder, dataset, tmp_path):
    cache = features.extract_features(encoder, dataset, tmp_path / "cache", amp=False, batch_size=4, progress=False)
    assert len(cache) == N_IMAGES and cache.feature_dim == 24
    assert (tmp_path / "cache" / "features-rank000-of-001.npy").is_file()
    rows = cache[np.arange(N_IMAGES)]
    assert rows.shape == (N_IMAGES, 24) and rows.dtype == np.float32
    for index in range(N_IMAGES):
        if index == BROKEN:
            continue
        expected = _direct(encoder, dataset, index)
        np.testing.assert_allclose(rows[index], expected, rtol=2e-3, atol=2e-3)  # float16 storage
    assert np.isnan(rows[BROKEN]).all()
    assert cache.valid_mask.tolist() == [i != BROKEN for i in range(N_IMAGES)]
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["n_rows"] == N_IMAGES and manifest["feature_dim"] == 24 and manifest["dtype"] == "float16"
    assert manifest["n_failed"] == 1


def test_second_call_reuses_the_cache_without_running_the_encoder(encoder, dataset, tmp_path):
    counter = ForwardCounter(encoder)
    try:
        features.extract_features(encoder, dataset, tmp_path, amp=False, batch_size=4, progress=False)
        assert counter.images == N_IMAGES - 1
        mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
        again = features.extract_features(encoder, dataset, tmp_path, amp=False, batch_size=4, progress=False)
        assert counter.images == N_IMAGES - 1
        assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes
        assert len(again) == N_IMAGES
    finally:
        counter.close()


def test_two_sequential_ranks_build_the_same_cache_as_one_rank(encoder, dataset, tmp_path):
    single = features.extract_features(encoder, dataset, tmp_path / "one", amp=False, batch_size=4, progress=False)
    first = features.extract_features(encoder, dataset, tmp_path / "two", amp=False, batch_size=4, rank=0, world_size=2,
                                      progress=False)
    assert first is None  # rank 1's shard is still missing
    assert not (tmp_path / "two" / "manifest.json").exists()
    second = features.extract_features(encoder, dataset, tmp_path / "two", amp=False, batch_size=4, rank=1, world_size=2,
                                       progress=False)
    assert sorted(p.name for p in (tmp_path / "two").glob("features-*.npy")) == [
        "features-rank000-of-002.npy", "features-rank001-of-002.npy"]
    assert second.identity == single.identity
    np.testing.assert_allclose(second[np.arange(N_IMAGES)], single[np.arange(N_IMAGES)], rtol=1e-3, atol=1e-3,
                               equal_nan=True)
    assert np.array_equal(second.valid_mask, single.valid_mask)
    shuffled = np.array([10, 0, 5, 6, 3])
    np.testing.assert_array_equal(second[shuffled], second[np.arange(N_IMAGES)][shuffled])


@pytest.mark.parametrize("damage", ["other_identity", "missing_shard", "garbage_shard_meta"])
def test_mismatching_or_damaged_cache_is_re_extracted(encoder, dataset, tmp_path, damage, caplog):
    features.extract_features(encoder, dataset, tmp_path, amp=False, batch_size=4, progress=False)
    if damage == "other_identity":  # a cache made with another encoder / preprocessing / image list
        for name in ("manifest.json", "shard-rank000-of-001.json"):
            content = json.loads((tmp_path / name).read_text())
            content["identity"] = "0" * 64
            (tmp_path / name).write_text(json.dumps(content))
    elif damage == "missing_shard":
        (tmp_path / "features-rank000-of-001.npy").unlink()
    else:
        (tmp_path / "shard-rank000-of-001.json").write_text("{not json")
    counter = ForwardCounter(encoder)
    try:
        with caplog.at_level("INFO", logger="hierloc.training.features"):
            cache = features.extract_features(encoder, dataset, tmp_path, amp=False, batch_size=4, progress=False)
    finally:
        counter.close()
    assert counter.images == N_IMAGES - 1
    assert "extracting" in caplog.text
    assert len(cache) == N_IMAGES and np.isfinite(cache[0]).all()
    assert features.FeatureCache.open(tmp_path).identity == cache.identity


def test_corrupted_manifest_is_rebuilt_from_verified_shards_without_re_encoding(encoder, dataset, tmp_path,
                                                                                  caplog):
    first = features.extract_features(encoder, dataset, tmp_path, amp=False, batch_size=4, progress=False)
    expected = first[np.arange(N_IMAGES)]
    (tmp_path / "manifest.json").write_text("{not json")
    counter = ForwardCounter(encoder)
    try:
        with caplog.at_level("INFO", logger="hierloc.training.features"):
            cache = features.extract_features(encoder, dataset, tmp_path, amp=False, batch_size=4, progress=False)
    finally:
        counter.close()
    assert "manifest.json unreadable" in caplog.text
    assert counter.images == 0  # the shard's own metadata proves it was made by this encoder on these images
    np.testing.assert_array_equal(cache[np.arange(N_IMAGES)], expected)


def test_changed_encoder_weights_invalidate_the_cache(encoder, dataset, tmp_path):
    first = features.extract_features(encoder, dataset, tmp_path, amp=False, batch_size=4, progress=False)
    saved = {k: v.clone() for k, v in encoder.state_dict().items()}
    try:
        with torch.no_grad():
            weight = encoder.backbone.embeddings.patch_embeddings.projection.weight
            weight.add_(0.5 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
        second = features.extract_features(encoder, dataset, tmp_path, amp=False, batch_size=4, progress=False)
        changed = _direct(encoder, dataset, 0)
    finally:
        encoder.load_state_dict(saved)
    assert second.identity != first.identity
    # re-extracted with the new weights (float16 storage), and the change is far beyond that rounding
    np.testing.assert_allclose(second[0], changed, rtol=2e-3, atol=2e-3)
    assert np.abs(changed - first[0]).max() > 0.05


def test_open_reads_through_memory_maps_and_pickles_without_the_data(encoder, dataset, tmp_path):
    features.extract_features(encoder, dataset, tmp_path, amp=False, batch_size=4, dtype=np.float32, progress=False)
    cache = features.FeatureCache.open(tmp_path)
    assert cache.dtype == np.float32
    cache[0]
    assert all(isinstance(m, np.memmap) for m in cache._maps())
    clone = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(clone[[1, 2]], cache[[1, 2]])
    with pytest.raises(InputError, match="not a complete feature cache"):
        features.FeatureCache.open(tmp_path / "nothing-here")


def test_cached_feature_dataset_serves_valid_rows_in_batches(encoder, dataset, tmp_path):
    cache = features.extract_features(encoder, dataset, tmp_path, amp=False, batch_size=4, progress=False)
    targets = np.arange(N_IMAGES * 4, dtype=np.int64).reshape(N_IMAGES, 4)
    cached = features.CachedFeatureDataset(cache, targets=targets, lat_deg=dataset.table.lat_deg,
                                           lon_deg=dataset.table.lon_deg)
    assert len(cached) == N_IMAGES - 1
    batches = list(data.make_loader(cached, batch_size=4, shuffle=True, seed=0))
    indices = torch.cat([b["index"] for b in batches])
    assert sorted(indices.tolist()) == [i for i in range(N_IMAGES) if i != BROKEN]
    batch = batches[0]
    assert batch["features"].shape == (4, 24) and batch["features"].dtype == torch.float32
    rows = batch["index"].numpy()
    np.testing.assert_array_equal(batch["features"].numpy(), cache[rows])
    np.testing.assert_array_equal(batch["targets"].numpy(), targets[rows])
    np.testing.assert_array_equal(batch["lat_deg"].numpy(), dataset.table.lat_deg[rows])


def test_training_dataset_is_refused(encoder, dataset, tmp_path):
    augmented = data.ImageDataset(dataset.table, dataset.preprocessor, train=True)
    with pytest.raises(ValueError, match="train=False"):
        features.extract_features(encoder, augmented, tmp_path, amp=False, progress=False)


def _distributed_worker(rank, world_size, init_file, encoder_dir, image_paths, cache_dir, result_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        encoder = encoders.load_image_encoder(encoder_dir, frozen=True)
        table = data.ImageTable.from_arrays(image_paths, np.zeros(len(image_paths)), np.zeros(len(image_paths)))
        dataset = data.ImageDataset(table, encoder.preprocessor)
        cache = features.extract_features(encoder, dataset, cache_dir, amp=False, batch_size=2, rank=rank,
                                          world_size=world_size, progress=False)
        np.save(f"{result_dir}/rank{rank}.npy", cache[np.arange(len(cache))])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_torch_distributed_ranks_write_shards_and_rank_zero_the_manifest(encoder, encoder_dir, dataset, tmp_path):
    import torch.multiprocessing as mp

    paths = [str(p) for p in dataset.table.paths]
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(encoder_dir), paths, str(tmp_path / "cache"),
                                        str(tmp_path)), nprocs=2, join=True)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["n_rows"] == N_IMAGES
    rank0, rank1 = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    np.testing.assert_array_equal(rank0, rank1)  # both ranks open the same complete cache
    assert np.isnan(rank0[BROKEN]).all() and np.isfinite(np.delete(rank0, BROKEN, axis=0)).all()
    single = features.extract_features(encoder, dataset, tmp_path / "single", amp=False, batch_size=4, progress=False)
    np.testing.assert_allclose(rank0, single[np.arange(N_IMAGES)], rtol=1e-3, atol=1e-3, equal_nan=True)


def test_entity_feature_means_in_chunks_equal_the_whole(tmp_path):
    """Chunked accumulation (memory independent of N) equals one pass; NaN rows (failed images) are left out."""
    from hierloc.training.module import entity_feature_means

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(103, 5)).astype(np.float32)
    feats[[4, 50]] = np.nan
    targets = np.stack([rng.integers(0, 3, 103), rng.integers(3, 9, 103), rng.integers(-1, 1, 103) + 9,
                        np.full(103, -1)], axis=1)
    whole = entity_feature_means(feats, targets, 12, chunk_rows=10_000)
    assert torch.allclose(entity_feature_means(feats, targets, 12, chunk_rows=7), whole, atol=1e-6)
    keep = np.isfinite(feats).all(axis=1) & (targets[:, 1] == 5)
    assert np.allclose(whole[5].numpy(), feats[keep].astype(np.float64).mean(axis=0), atol=1e-6)


# ------------------------------------------------------------------- the frozen path on the run's device
def test_autocast_off_cuda_changes_nothing_and_marks_the_identity_only_when_active(encoder, dataset, tmp_path):
    """amp=True on a CPU encoder: the same features and the same cache identity as amp=False (float32 caches keep
    the identity they always had); a cache made under CUDA's bf16 autocast would carry another identity."""
    plain = features.extract_features(encoder, dataset, tmp_path / "plain", amp=False, batch_size=4, progress=False)
    under = features.extract_features(encoder, dataset, tmp_path / "amp", amp=True, batch_size=4, progress=False)
    assert under.identity == plain.identity == features.cache_identity(encoder, dataset, np.float16)[0]
    rows = np.arange(len(plain))
    np.testing.assert_array_equal(np.asarray(under[rows]), np.asarray(plain[rows]))
    marked, components = features.cache_identity(encoder, dataset, np.float16, autocast=True)
    assert marked != plain.identity and components["autocast"] == "bfloat16"


def test_a_frozen_encoder_extracts_on_the_runs_device(encoder, dataset, tmp_path, monkeypatch):
    """`build_run`'s frozen path moves the encoder to the runtime's device once, before extracting: asserted on a
    device object other than the CPU (the meta device, where tensors have shapes but no data), so that an
    encoder left on the CPU fails here although nothing runs on a GPU."""
    from hierloc.config import load_config
    from hierloc.device import Runtime
    from hierloc.training import run

    seen = {}

    class Stop(Exception):
        pass

    def spy(enc, *args, **kwargs):
        seen["device"], seen["amp"] = features.encoder_device(enc), kwargs["amp"]
        raise Stop

    monkeypatch.setattr(features, "extract_features", spy)
    cfg = load_config(None, ["model.backbone=tiny-vit", "model.freeze_backbone=true", "train.amp=true"])
    inputs = run.TrainInputs(train_csv="train.csv", out_dir=str(tmp_path / "out"))
    data_ = run.RunData(dataset.table, None, np.zeros((len(dataset), 4), dtype=np.int64), 0)
    meta = torch.device("meta")
    moved = copy.deepcopy(encoder)      # the module-scoped encoder stays where it is
    with pytest.raises(Stop):
        run.cached_feature_dataset(cfg, inputs, Runtime(device=meta, rank=0, world_size=1, local_rank=0),
                                   tmp_path, data_, moved, 4, None)
    assert seen == {"device": meta, "amp": True}


def test_the_process_group_waits_longer_than_an_extraction(monkeypatch):
    """torchrun: the process group is created with PROCESS_GROUP_TIMEOUT (torch's default 10 minutes is shorter
    than a frozen backbone's extraction, after which the ranks meet at a barrier)."""
    from hierloc import device

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: calls.append(kwargs))
    with restored_log_levels():          # rank 1 quiets the project's loggers
        runtime = device.init_runtime("cpu")
    assert calls == [{"backend": "gloo", "timeout": device.PROCESS_GROUP_TIMEOUT}]
    assert device.PROCESS_GROUP_TIMEOUT >= timedelta(hours=1) and runtime.rank == 1 and runtime.world_size == 2


def test_a_torchrun_attempt_meets_under_keys_of_its_own(monkeypatch):
    """After torchrun --max-restarts, the agent's store still holds the previous attempt's keys: the process
    group of attempt k meets under the prefix hierloc/attempt-k."""
    from hierloc import device

    server = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=30),
                                        wait_for_workers=False)
    calls = []
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(server.port),
                       "TORCHELASTIC_RESTART_COUNT": "3", "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: calls.append(kwargs))
    runtime = device.init_runtime("cpu")
    [call] = calls
    assert (call["rank"], call["world_size"], call["timeout"]) == (0, 2, device.PROCESS_GROUP_TIMEOUT)
    call["store"].set("address", "rank 0's")
    assert server.get("hierloc/attempt-3/address") == b"rank 0's"
    assert runtime.restarts == 3


# ------------------------------------------------------------------------------------------ damaged caches
SHARD_FEATURES = "features-rank000-of-001.npy"


def _flip_a_feature_byte(cache_dir):
    """One byte of row 2's feature data XOR-ed in place (same size, same header)."""
    path = cache_dir / SHARD_FEATURES
    offset = path.stat().st_size - 24 * 2 * (N_IMAGES - 2) + 3
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x10]))


def _truncate_features(cache_dir):
    path = cache_dir / SHARD_FEATURES
    path.write_bytes(path.read_bytes()[:-7])


def _kill_mid_shard(cache_dir):
    """What a kill during extraction leaves: a partial temporary features file, no shard json, no manifest."""
    partial = (cache_dir / SHARD_FEATURES).read_bytes()[:200]
    for name in (SHARD_FEATURES, "shard-rank000-of-001.json", "manifest.json"):
        (cache_dir / name).unlink()
    (cache_dir / f".{SHARD_FEATURES}.tmp-99999-1").write_bytes(partial)


DAMAGES = {"truncated": (_truncate_features, SHARD_FEATURES),
           "flipped-byte": (_flip_a_feature_byte, SHARD_FEATURES),
           "killed-mid-shard": (_kill_mid_shard, "manifest.json")}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_cache_is_refused_by_open_naming_the_file_and_re_extracted_by_extract(encoder, dataset, tmp_path,
                                                                                        damage, caplog):
    first = features.extract_features(encoder, dataset, tmp_path, amp=False, batch_size=4, progress=False)
    expected = first[np.arange(N_IMAGES)]
    del first
    make, named = DAMAGES[damage]
    make(tmp_path)
    with pytest.raises(InputError) as refused:
        features.FeatureCache.open(tmp_path)
    assert named in str(refused.value) and len(str(refused.value).splitlines()) == 1
    counter = ForwardCounter(encoder)
    try:
        with caplog.at_level("INFO", logger="hierloc.training.features"):
            cache = features.extract_features(encoder, dataset, tmp_path, amp=False, batch_size=4, progress=False)
    finally:
        counter.close()
    assert counter.images == N_IMAGES - 1            # re-encoded, not reused
    assert "extracting" in caplog.text and (damage == "killed-mid-shard" or named in caplog.text)
    np.testing.assert_array_equal(cache[np.arange(N_IMAGES)], expected)
    assert not list(tmp_path.glob(".*tmp*"))         # the interrupted extraction's temporary file is gone
    assert features.FeatureCache.open(tmp_path).identity == cache.identity


def test_shards_record_a_crc32_of_their_files(encoder, dataset, tmp_path):
    features.extract_features(encoder, dataset, tmp_path, amp=False, batch_size=4, progress=False)

    meta = json.loads((tmp_path / "shard-rank000-of-001.json").read_text())
    assert meta["features_crc32"] == zlib.crc32((tmp_path / SHARD_FEATURES).read_bytes())
    assert meta["valid_crc32"] == zlib.crc32((tmp_path / "valid-rank000-of-001.npy").read_bytes())


def test_a_shard_without_a_checksum_is_re_extracted_not_trusted(encoder, dataset, tmp_path):
    features.extract_features(encoder, dataset, tmp_path, amp=False, batch_size=4, progress=False)
    meta_path = tmp_path / "shard-rank000-of-001.json"
    meta = json.loads(meta_path.read_text())
    del meta["features_crc32"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="no checksum recorded"):
        features.FeatureCache.open(tmp_path)
    counter = ForwardCounter(encoder)
    try:
        features.extract_features(encoder, dataset, tmp_path, amp=False, batch_size=4, progress=False)
    finally:
        counter.close()
    assert counter.images == N_IMAGES - 1
    assert "features_crc32" in json.loads(meta_path.read_text())


def test_a_cache_of_another_image_list_is_re_extracted_for_the_new_list(encoder, dataset, tmp_path, caplog):
    features.extract_features(encoder, dataset, tmp_path, amp=False, batch_size=4, progress=False)
    order = [3, 2, 1, 0, 4, 5, 7, 8, 9, 10]          # same images, another order, the broken one left out
    table = data.ImageTable.from_arrays([dataset.table.paths[i] for i in order], np.zeros(len(order)),
                                        np.zeros(len(order)))
    other = data.ImageDataset(table, dataset.preprocessor, train=False)
    with caplog.at_level("INFO", logger="hierloc.training.features"):
        cache = features.extract_features(encoder, other, tmp_path, amp=False, batch_size=4, progress=False)
    assert "another encoder, preprocessing or image list" in caplog.text
    assert len(cache) == len(order) and cache.valid_mask.all()
    for row, index in enumerate(order):
        np.testing.assert_allclose(cache[row], _direct(encoder, dataset, index), rtol=2e-3, atol=2e-3)


def test_two_concurrent_extractions_into_one_directory_leave_one_valid_cache(encoder, dataset, tmp_path):
    import threading

    single = features.extract_features(encoder, dataset, tmp_path / "single", amp=False, batch_size=4,
                                       progress=False)
    encoders_ = [copy.deepcopy(encoder) for _ in range(2)]
    counters = [ForwardCounter(e) for e in encoders_]
    start = threading.Barrier(2)
    results, errors = [None, None], []

    def run(k):
        try:
            start.wait()
            results[k] = features.extract_features(encoders_[k], dataset, tmp_path / "shared", amp=False,
                                                   batch_size=2, progress=False)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for counter in counters:
        counter.close()
    assert errors == [] and all(result is not None for result in results)
    assert sum(counter.images for counter in counters) == N_IMAGES - 1   # one extracted, the other reused
    reopened = features.FeatureCache.open(tmp_path / "shared")
    assert reopened.identity == single.identity
    np.testing.assert_array_equal(reopened[np.arange(N_IMAGES)], single[np.arange(N_IMAGES)])
    assert np.array_equal(reopened.valid_mask, single.valid_mask)
    assert not list((tmp_path / "shared").glob(".*tmp*"))


def _concurrent_worker(k, encoder_dir, image_paths, cache_dir, result_dir):
    """One of two independent jobs (rank 0 of world size 1 each) extracting into the same directory at once."""
    import time
    from pathlib import Path

    encoder = encoders.load_image_encoder(encoder_dir, frozen=True)
    table = data.ImageTable.from_arrays(image_paths, np.zeros(len(image_paths)), np.zeros(len(image_paths)))
    dataset = data.ImageDataset(table, encoder.preprocessor)
    counter = ForwardCounter(encoder)
    Path(result_dir, f"ready{k}").touch()
    while not all(Path(result_dir, f"ready{j}").exists() for j in range(2)):   # start together
        time.sleep(0.005)
    cache = features.extract_features(encoder, dataset, cache_dir, amp=False, batch_size=2, progress=False)
    np.save(f"{result_dir}/job{k}.npy", cache[np.arange(len(cache))])
    Path(result_dir, f"images{k}").write_text(str(counter.images))


@pytest.mark.integration
def test_two_concurrent_processes_extracting_into_one_directory_leave_one_valid_cache(encoder_dir, dataset,
                                                                                       tmp_path):
    import torch.multiprocessing as mp

    paths = [str(p) for p in dataset.table.paths]
    mp.spawn(_concurrent_worker, args=(str(encoder_dir), paths, str(tmp_path / "cache"), str(tmp_path)), nprocs=2,
             join=True)
    images = [int((tmp_path / f"images{k}").read_text()) for k in range(2)]
    assert sum(images) == N_IMAGES - 1 and 0 in images      # one job extracted, the other waited and reused
    single_encoder = encoders.load_image_encoder(encoder_dir, frozen=True)
    single_dataset = data.ImageDataset(dataset.table, single_encoder.preprocessor)
    single = features.extract_features(single_encoder, single_dataset, tmp_path / "single", amp=False,
                                       batch_size=4, progress=False)
    reopened = features.FeatureCache.open(tmp_path / "cache")
    assert reopened.identity == single.identity
    for k in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"job{k}.npy"), single[np.arange(N_IMAGES)])
    assert not list((tmp_path / "cache").glob(".*tmp*"))
