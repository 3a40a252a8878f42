"""The gazetteer package is torch-free and cheap to import."""

import subprocess
import sys

import pytest


@pytest.mark.integration  # a fresh interpreter
def test_gazetteer_never_imports_torch_even_when_used():
    code = (
        "import sys\n"
        "import gazetteer\n"
        "heavy = [m for m in ('torch', 'h3', 'scipy', 'networkx', 'reverse_geocoder') if m in sys.modules]\n"
        "assert heavy == [], heavy\n"
        "g = gazetteer.Gazetteer.build_from_points([48.85], [2.35], progress=False)\n"
        "g.graph; g.locate([1.0], [2.0])\n"
        "import hierloc.cli.gazetteer\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
