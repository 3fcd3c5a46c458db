import subprocess
import sys

import compress


def test_public_names_resolve():
    from compress.pipeline import run_pipeline
    from compress.recipe_loader import load_recipe

    assert compress.run_pipeline is run_pipeline and compress.load_recipe is load_recipe
    assert compress.Recipe.__name__ == "Recipe" and compress.Artifact.__name__ == "Artifact"


def test_importing_compress_does_not_import_torch():
    code = "import sys, compress; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_all_lists_exactly_the_public_names():
    assert set(compress.__all__) == {"__version__", *compress._PUBLIC}
