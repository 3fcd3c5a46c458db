import sys
import types

from compress.after_import import after_import


def test_the_action_runs_once_the_module_is_first_imported(tmp_path, monkeypatch):
    (tmp_path / "late_module_for_test.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    after_import("late_module_for_test", lambda: seen.append(sys.modules["late_module_for_test"].VALUE))
    assert seen == []
    import late_module_for_test  # noqa: F401

    assert seen == [1]
    sys.modules.pop("late_module_for_test")


def test_the_action_runs_at_once_when_the_module_is_already_loaded(monkeypatch):
    monkeypatch.setitem(sys.modules, "already_loaded_for_test", types.ModuleType("already_loaded_for_test"))
    seen = []
    after_import("already_loaded_for_test", lambda: seen.append(True))
    assert seen == [True]


def test_importing_compress_teaches_transformers_the_per_block_shapes():
    import subprocess

    script = ("import sys, compress\n"
              "assert 'torch' not in sys.modules\n"
              "from transformers import PreTrainedModel\n"
              "print(getattr(PreTrainedModel.post_init, '_compress_layer_shapes', False))\n")
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert shown.strip() == "True"
