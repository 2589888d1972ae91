"""The distribution: ``python -m build`` gives an sdist and a wheel (built from the sdist) with the package data,
and the wheel, installed into a fresh venv, runs ``cegppo --help``, ``cegppo train --help`` and the verl entry point.

Nothing is downloaded: the build uses this environment's setuptools (``--no-isolation``), and the fresh venv sees
this environment's packages (a ``.pth`` line after its own site-packages) while cegppo itself comes from the wheel
(``pip install --no-deps --no-index``). About 15 s on 2 cores.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import site
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WHEEL = "cegppo-0.1.0-py3-none-any.whl"
SDIST = "cegppo-0.1.0.tar.gz"
# What a user of the wheel needs besides the code.
PACKAGE_DATA = [
    "cegppo/py.typed",
    "cegppo/data/benchmarks/aime24.jsonl",
    "cegppo/data/benchmarks/aime25.jsonl",
    "cegppo/data/benchmarks/amc23.jsonl",
    "cegppo/data/benchmarks/gsm8k.jsonl",
    "cegppo/data/benchmarks/math500.jsonl",
    "cegppo/configs/demo_cpu.yaml",
    "cegppo/configs/paper_1p5b.yaml",
    "cegppo/configs/paper_7b.yaml",
]
# Local state of a checkout that is not source.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv*", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)


# For the fresh venv: PYTHONPATH (a checkout's src/ in development) would put this checkout's cegppo first.
VENV_ENV = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def run(*command: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=240, env=env
    )
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m build`` on a copy of the checkout (the build writes egg-info next to the sources)."""
    pytest.importorskip("build", reason="`python -m build` needs the build package (in the dev extra)")
    checkout = tmp_path_factory.mktemp("checkout") / "cegppo"
    shutil.copytree(REPO, checkout, ignore=NOT_SOURCE, symlinks=True)
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, checkout)
    assert sorted(path.name for path in out.iterdir()) == sorted([SDIST, WHEEL])
    return out


@pytest.fixture(scope="module")
def installed(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; this environment's packages (torch, ...) are visible after it."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    # Installed before the parent environment is visible, where pip would find this checkout's cegppo installed.
    pip = (sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index")
    run(*pip, dist / WHEEL, env=VENV_ENV)
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", env=VENV_ENV)
    purelib = purelib.stdout.strip()
    # A plain path line: the parent's own .pth files (its editable cegppo among them) are not processed.
    Path(purelib, "zz_parent_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return env_dir


@pytest.mark.slow  # with the next test: about 20 s of CPU (a build, a venv, three interpreters)
def test_wheel_and_sdist_carry_the_package_data(dist: Path) -> None:
    with zipfile.ZipFile(dist / WHEEL) as wheel:
        assert set(PACKAGE_DATA) <= set(wheel.namelist())
        entry_points = wheel.read("cegppo-0.1.0.dist-info/entry_points.txt").decode()
    assert "[verl.plugins]\ncegppo = cegppo.integrations.verl" in entry_points
    assert "cegppo = cegppo.cli:main" in entry_points
    with tarfile.open(dist / SDIST) as archive:
        sdist = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for path in ("configs/paper_1p5b.yaml", "examples/verl/run_1.5b.sh", "examples/trl/train_ce_gppo.py",
                 "MANIFEST.in", "docs/scaling.md", "tests/test_packaging.py"):  # fmt: skip
        assert path in sdist, path
    assert {f"src/{path}" for path in PACKAGE_DATA} <= sdist


@pytest.mark.slow
def test_the_installed_wheel_runs(installed: Path) -> None:
    bin_dir = installed / "bin"
    assert "usage: cegppo" in run(bin_dir / "cegppo", "--help", env=VENV_ENV).stdout
    assert "--config" in run(bin_dir / "cegppo", "train", "--help", env=VENV_ENV).stdout
    probe = (
        "import importlib.util, cegppo\n"
        "from importlib.metadata import entry_points\n"
        "from importlib.resources import files\n"
        "(plugin,) = [ep for ep in entry_points(group='verl.plugins') if ep.name == 'cegppo']\n"
        "print(cegppo.__file__)\n"
        "print(importlib.util.find_spec(plugin.module).origin)\n"
        "print(files('cegppo').joinpath('configs/paper_1p5b.yaml').is_file())\n"
        "if importlib.util.find_spec('verl'):\n"
        "    import verl  # verl imports its verl.plugins entry points\n"
        "    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY\n"
        "    print('ce_gppo' in POLICY_LOSS_REGISTRY)\n"
    )
    lines = run(bin_dir / "python", "-c", probe, env=VENV_ENV).stdout.split()
    site_packages = str(installed / "lib")
    assert lines[0].startswith(site_packages), lines  # cegppo from the wheel, not from this checkout
    assert lines[1].startswith(site_packages) and lines[1].endswith("integrations/verl.py"), lines
    # The packaged config; then, where verl is installed (`make test-verl`), `import verl` loaded the plug-in.
    assert lines[2:] == ["True"] * (2 if importlib.util.find_spec("verl") else 1), lines


# A requirement naming cegppo itself (`cegppo`, `"cegppo[trl]"`): cegppo is on no package index.
INDEX_REQUIREMENT = re.compile(r"""(?<![\w./-])["']?cegppo(\[[\w,-]+\])?["']?(?=\s|$|`)""")


def test_no_install_line_in_the_docs_asks_a_package_index_for_cegppo() -> None:
    """Every `pip install` line installs cegppo from a checkout (`.`) or from its wheel, never by name."""
    documents = [
        REPO / "README.md",
        *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "examples").rglob("*")),
    ]
    offending = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in documents
        if path.is_file()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "pip install" in line and INDEX_REQUIREMENT.search(line.split("pip install", 1)[1].split("#")[0])
    ]
    assert not offending, "\n".join(offending)
