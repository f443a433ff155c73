# Validate the config first, then derive every target from it (no path is spelled out twice).
from snakemake.utils import validate


validate(config, schema="../schemas/config.schema.yaml")


wildcard_constraints:
    arch="|".join(config["models"]),


def model_dir(arch):
    return f"results/models/{arch}"


def all_targets():
    return [f"{model_dir(arch)}/summary.json" for arch in config["models"]]


def directory_of_model(wildcards):
    return model_dir(wildcards.arch)
