"""Where the kernels live and under which name: the op files in the top-level kernels/, imported only as
mftcore.kernels (one symlink per op in mftcore/kernels/), never as a top-level `kernels`, the name of
HF's package that transformers and bitsandbytes import."""

import importlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import mftcore.kernels
from tests.helpers.paths import ROOT

OPS_DIR = Path(ROOT) / "kernels"
PACKAGE_DIR = Path(ROOT) / "mftcore" / "kernels"
OP_FILES = sorted(p.name for p in OPS_DIR.glob("*.py"))


def test_every_op_file_is_linked_into_the_package_and_imports_from_kernels():
    assert not (OPS_DIR / "__init__.py").exists()  # else kernels/ is a regular package named `kernels`
    assert OP_FILES and OP_FILES == sorted(p.name for p in PACKAGE_DIR.glob("*.py") if p.name != "__init__.py")
    assert os.path.realpath(mftcore.kernels.__file__) == str((PACKAGE_DIR / "__init__.py").resolve())
    for name in OP_FILES:
        link = PACKAGE_DIR / name
        assert link.is_symlink() and os.readlink(link) == f"../../kernels/{name}", name  # relative: survives a move
        module = importlib.import_module(f"mftcore.kernels.{name[:-3]}")
        assert os.path.realpath(module.__file__) == str((OPS_DIR / name).resolve()), name


def test_the_distribution_claims_only_mftcore(tmp_path):
    """The installed metadata and import hooks name only mftcore, and a build (setuptools' build_py, what a
    wheel is made of) carries mftcore/kernels/ as real files with the op files' content."""
    # the installed one, not the egg-info that setuptools leaves in the checkout (on sys.path under pytest)
    installed = [d for d in importlib.metadata.distributions(name="mftcore") if str(d.locate_file("")) != ROOT]
    assert installed, "mftcore is not installed (pip install -e .)"
    dist = installed[0]
    assert dist.read_text("top_level.txt").split() == ["mftcore"]
    tops = {f.parts[0] for f in dist.files}
    assert {t for t in tops if not t.endswith(".dist-info") and not t.startswith("__editable__")} <= {
        "mftcore", "..", "__pycache__"}  # "..": the console script in bin/
    for finder in (f for f in dist.files if f.name.startswith("__editable__") and f.suffix == ".py"):
        hook = importlib.import_module(finder.stem)  # setuptools' editable finder: name -> source directory
        assert list(hook.MAPPING) == ["mftcore"] and Path(hook.MAPPING["mftcore"]).name == "mftcore", hook.MAPPING
        assert not hook.NAMESPACES, hook.NAMESPACES
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mftcore"]
    built = tmp_path / "mftcore" / "kernels"
    assert sorted(p.name for p in built.iterdir()) == sorted(OP_FILES + ["__init__.py"])
    for p in built.iterdir():
        source = PACKAGE_DIR / p.name
        assert not p.is_symlink() and p.read_bytes() == source.read_bytes(), p.name


def run_at_root(code: str, pythonpath: str = "") -> list:
    """Lines printed by `python -c code` run from the checkout's root, as `python -m mftcore` would be."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.splitlines()


def test_hf_kernels_package_wins_over_the_checkout(tmp_path):
    """From the root (on sys.path ahead of PYTHONPATH), `import kernels` still gets HF's package, and
    transformers, probing it, sees HF's version and none of our files."""
    from transformers.utils import import_utils

    fake = tmp_path / "kernels"
    fake.mkdir()
    version = getattr(import_utils, "KERNELS_MIN_VERSION", "0.11.1")
    (fake / "__init__.py").write_text(f"__version__ = {version!r}\n")
    code = ("import sys, mftcore.kernels, kernels\n"
            "from transformers.utils.import_utils import is_kernels_available\n"
            "print(kernels.__file__)\nprint(is_kernels_available())\n"
            "print(sorted(m for m in sys.modules if m.startswith('kernels.')))")
    assert run_at_root(code, str(tmp_path)) == [str(fake / "__init__.py"), "True", "[]"]


def test_transformers_does_not_count_our_kernels_dir_as_hf_kernels():
    code = ("import importlib.util, importlib.metadata as md, mftcore.kernels\n"
            "from transformers.utils.import_utils import is_kernels_available\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "try:\n    md.distribution('kernels'); installed = True\nexcept md.PackageNotFoundError:\n"
            "    installed = False\n"
            "print(spec.origin if spec else None)\nprint(is_kernels_available() and not installed)")
    origin, seen_without_install = run_at_root(code)
    assert origin == "None" or not origin.startswith(ROOT), origin  # None: at most an empty namespace portion
    assert seen_without_install == "False"
