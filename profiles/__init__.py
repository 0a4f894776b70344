"""The catalogs tuner ships: the GPU catalog (``gpus.yaml``), the model cards and their quant recipes (``models/``).

This folder is where they are edited; pyproject.toml installs it as the package ``tuner.catalogs``, and
:func:`tuner.paths.catalog_dir` reads it from there with :mod:`importlib.resources`.
"""
