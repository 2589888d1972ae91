"""The versions of TRL and verl the plug-ins are tested with (pyproject.toml's extras declare the same ranges)."""

from __future__ import annotations

import warnings

from packaging.specifiers import SpecifierSet
from packaging.version import Version

# The plug-ins reach into each trainer's internals (TRL's GRPOTrainer._compute_loss, verl's policy-loss
# registry and ActorConfig), so a release outside the tested range may change what they override.
SUPPORTED = {"trl": SpecifierSet(">=1.16,<1.17"), "verl": SpecifierSet(">=0.9.1,<0.10")}


def warn_if_untested(package: str, version: str) -> None:
    """A visible warning when ``package`` is installed at a version the plug-in was not tested with."""
    if Version(version) not in SUPPORTED[package]:
        warnings.warn(
            f"cegppo's {package} plug-in is tested with {package}{SUPPORTED[package]}, found {package} {version}: "
            f"the parts of {package} it overrides may have changed",
            stacklevel=3,
        )
