"""`hqsam.hqsam_core` lists its public names (dir(), tab completion) and stays light to import."""

from __future__ import annotations

import rlcompleter
import subprocess
import sys

import hqsam.hqsam_core as core

PUBLIC = {"build_hqsam", "BoxRefiner", "EncodedImages", "Refinement", "HQSam", "VARIANTS", "save_model"}


def test_dir_lists_the_public_names() -> None:
    assert PUBLIC <= set(dir(core))
    assert set(core.__all__) <= set(dir(core))
    assert "__getattr__" in dir(core)  # the module's own names stay listed


def test_tab_completion_offers_the_public_names() -> None:
    completer = rlcompleter.Completer({"core": core})
    offered = {completer.complete("core.B", state) for state in range(5)} - {None}
    assert "core.BoxRefiner(" in offered
    offered = {completer.complete("core.build", state) for state in range(5)} - {None}
    assert "core.build_hqsam(" in offered


def test_dir_does_not_load_torch() -> None:
    code = (
        "import sys, hqsam.hqsam_core as core; names = dir(core); "
        "assert 'build_hqsam' in names and 'BoxRefiner' in names, names; "
        "assert 'torch' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
