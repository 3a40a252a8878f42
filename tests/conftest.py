"""Shared fixtures: real reference data, a small restricted gazetteer built once per session, its saved copy, the
tiny demo world and model (constants and helper functions are in tests/helpers.py).

A test that uses the trained tiny model (tiny_model_dir, directly or through another fixture) is an integration
test: pytest_collection_modifyitems below marks it so, and the fast loop (`-m "not integration and not slow"`)
leaves it out. Tests that train, run a subprocess CLI, a server or a browser without it carry the mark themselves.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import SHARED_DATA, SMALL_WITHIN, TINY_MODEL_OVERRIDES, sphere_points

INITIAL_PARAMETERS = "initial_parameters.safetensors"  # beside tiny_model_dir, not in it


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """../shared/data beside the repository (absent in a user's clone: tests using it skip)."""
    path = SHARED_DATA
    if not path.is_dir():
        pytest.skip(f"reference data folder {path} is absent")
    return path


@pytest.fixture(scope="session")
def small_gazetteer():
    """A global-type gazetteer restricted to a few countries (built once per session, a few seconds)."""
    from gazetteer import Gazetteer

    return Gazetteer.build_global(within=SMALL_WITHIN, progress=False)


@pytest.fixture(scope="session")
def small_gazetteer_dir(small_gazetteer, tmp_path_factory) -> Path:
    """`small_gazetteer` saved to a session temp dir (treat as read-only)."""
    directory = tmp_path_factory.mktemp("gazetteer") / "small"
    small_gazetteer.save(directory)
    return directory


@pytest.fixture
def random_sphere_points():
    """Factory fixture: random_sphere_points(n, seed=0) -> (lat_deg, lon_deg) uniform on the sphere."""
    return sphere_points


# ------------------------------------------------------------------------------------- tiny demo world and model
@pytest.fixture(scope="session")
def tiny_demo_dir(tmp_path_factory) -> Path:
    """A small demo dataset (Blue Marble patches, 32 px): 240 train, 20 val, 40 per test split."""
    from hierloc.data.demodata import make_demo_dataset

    out = tmp_path_factory.mktemp("demo") / "data"
    make_demo_dataset(out, n_train=240, n_test=40, n_unseen=40, n_val=20, patch_px=32, seed=1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    """A tiny ViT config (no weights) saved to disk: the path users take with their own local backbones."""
    from hierloc.model.backbones import tiny_vit_config, tiny_vit_preprocessor, write_backbone_config

    config = tiny_vit_config(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)
    return write_backbone_config(tmp_path_factory.mktemp("backbone") / "tiny", config, tiny_vit_preprocessor(32))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_demo_dir, tiny_backbone_dir, tmp_path_factory) -> Path:
    """A model trained for a few steps through the CLI (treat as read-only). The run's parameters as its optimisers
    were built (the starting point of the steps) are saved beside it: tiny_model_initial_parameters."""
    from safetensors.torch import save_file

    from hierloc.cli import main
    from hierloc.training import run as training   # build_run calls run.build_optimizers

    out = tmp_path_factory.mktemp("model") / "tiny"
    build_optimizers = training.build_optimizers

    def recording(module, cfg):
        state = {name: p.detach().clone().contiguous() for name, p in module.named_parameters()}
        save_file(state, str(out.parent / INITIAL_PARAMETERS))
        return build_optimizers(module, cfg)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "build_optimizers", recording)
        code = main(["-q", "train", "--csv", str(tiny_demo_dir / "train.csv"), "--out", str(out), "--no-progress",
                     f"model.backbone={tiny_backbone_dir}", *TINY_MODEL_OVERRIDES])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def tiny_model_initial_parameters(tiny_model_dir) -> dict:
    """The parameters tiny_model_dir's training started from ({name: tensor}, names of TrainModule: `model.` +
    the name in model.safetensors)."""
    from safetensors.torch import load_file

    return load_file(str(tiny_model_dir.parent / INITIAL_PARAMETERS))


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    """Every test that uses the trained tiny model is an integration test, whether or not its module says so."""
    for item in items:
        if "tiny_model_dir" in getattr(item, "fixturenames", ()) and item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.integration)
