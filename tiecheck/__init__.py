"""tiecheck: find, measure and guard weight tying in PyTorch Transformers.

The package imports nothing heavy at import time, so `tiecheck --help` and
`tiecheck models` start without loading torch. `analyze` and `Report` are
resolved lazily on first use.

Where things are (docs/architecture.md has the whole map): loaders/ turn a target into a
Subject; facts.py and analyses/ find ties; flops/ counts FLOPs; report/ renders; compare/ (diff),
repair/ (fix), plan/ and check/ are the commands; runtime.py, testing.py, integrations/ and
pytest_plugin/ guard training and CI; cli/ is the command line; bench/ measures tied vs untied.
`tiecheck.models`, the bundled reference models, lives in the top-level `models/` folder of the
repository: the wheel installs it as this subpackage (setuptools `package-dir`), and a source
checkout finds it through `_SourceModelsFinder` below.
"""

from __future__ import annotations

import os
import re
import sys
from importlib import import_module
from importlib.util import spec_from_file_location

__version__ = "0.1.0"

__all__ = ["Report", "TiecheckError", "__version__", "analyze", "diff", "fix"]


# The public API, resolved on first use: `import tiecheck` stays light (no torch), so the CLI's
# `--help` and `tiecheck models` start at once. One table, one import below.
_API = {"analyze": "tiecheck.api", "diff": "tiecheck.compare", "fix": "tiecheck.repair",
        "Report": "tiecheck.report", "TiecheckError": "tiecheck.errors"}


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'tiecheck' has no attribute {name!r}")


class _SourceModelsFinder:
    """Finds ``tiecheck.models`` in a source checkout, where it is the top-level ``models/``.

    The bundled models live in the repository's ``models/`` folder and are installed as
    ``tiecheck.models`` (pyproject maps the folder in with ``package-dir``). Installed, or
    installed editable, the import system finds them. Run from the source tree without an
    install -- ``PYTHONPATH=. python -m tiecheck.cli``, ``python -m pytest benchmarks/``, a
    GPU image with torch but no network for pip -- ``tiecheck`` is this folder, which has no
    ``models/``, and ``from tiecheck import models`` fails; with an editable install of
    *another* checkout it silently imports that checkout's models. This finder answers for
    ``tiecheck.models`` alone, from the ``models/`` next to this package, so the models
    always come from the same checkout as the package. Its submodules (``tiecheck.models.gpt``)
    resolve through the spec's search location. Appending the repository root to
    ``tiecheck.__path__`` would do the same but also make ``tiecheck.tests``,
    ``tiecheck.benchmarks`` and every other top-level folder importable.

    Registered only when this package has no ``models/`` of its own (a normal install has
    one, so nothing changes there); whether it is a checkout of this project is decided at the
    first import of ``tiecheck.models``, not at ``import tiecheck``. Outside a checkout it
    raises one line saying how to install.
    """

    def __init__(self, package_dir: str) -> None:
        self.root = os.path.dirname(package_dir)
        self.models_dir = os.path.join(self.root, "models")

    def _is_checkout(self) -> bool:
        if not os.path.isfile(os.path.join(self.models_dir, "__init__.py")):
            return False
        try:
            with open(os.path.join(self.root, "pyproject.toml"), encoding="utf-8") as f:
                text = f.read(1 << 16)
        except OSError:
            return False
        return re.search(r'^name\s*=\s*["\']tiecheck["\']\s*$', text, re.MULTILINE) is not None

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != "tiecheck.models":
            return None
        if not self._is_checkout():
            raise ModuleNotFoundError(
                f"tiecheck.models is missing: {os.path.dirname(self.models_dir)} is neither an installed "
                "tiecheck nor its source checkout; install it with pip install tiecheck (or pip install -e "
                "<checkout>)", name=fullname)
        return spec_from_file_location(fullname, os.path.join(self.models_dir, "__init__.py"),
                                       submodule_search_locations=[self.models_dir])


def _register_source_models() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(here, "models")):
        return  # installed: the models are a real subpackage
    if any(isinstance(f, _SourceModelsFinder) or type(f).__name__ == "_SourceModelsFinder" for f in sys.meta_path):
        return  # this module was imported again (a test clearing sys.modules): one finder is enough
    # First, ahead of an editable install's finder, which may point at another checkout.
    sys.meta_path.insert(0, _SourceModelsFinder(here))


_register_source_models()
