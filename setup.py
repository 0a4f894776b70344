"""Only what pyproject.toml cannot say: the packages are tuner's own, as found on disk, and ``tuner.catalogs``, which
pyproject.toml's ``package-dir`` maps onto the top-level ``profiles/`` (tests/test_packaging.py checks the wheel)."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["tuner", "tuner.*"]), "tuner.catalogs"])
