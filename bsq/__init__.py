"""bsq-repro: a faithful, fast reimplementation of BSQ (Yang et al., ICLR 2021) and its baselines.

The library knows nothing of Snakemake or MLflow servers: every stage is an importable function, and the
workflow only calls the `bsq` command line.
"""

__version__ = "0.1.0"
