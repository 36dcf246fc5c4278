"""Benchmarks, run by hand (never under pytest's clock). ``python -m bench`` runs the
side-by-side comparison with Kamailio (bench/__main__.py); the other scripts here run on
their own, ``python bench/register_rate.py`` and so on (bench/README.md)."""
