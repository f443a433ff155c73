# Reading the config before anything is derived from it: command-line values typed as the schema expects, then ONE
# short error per mistake (the key, what is wrong, the fix) instead of Snakemake's dump of the whole schema.
import copy
import csv
import math
import re
from pathlib import Path

import jsonschema
import yaml
from snakemake.utils import update_config
from bsq.methods import method_names

CONFIG_SCHEMA = "workflow/schemas/config.schema.yaml"  # relative to the Snakefile's folder, as messages show it
BASELINES_SCHEMA = "workflow/schemas/published_baselines.schema.yaml"
_NUMBER = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")
_FREE = {"type": ["null", "boolean", "integer", "number"]}  # a stage section's values: YAML scalars, else text


def check_yaml_file(path):
    """Snakemake reports a YAML syntax error without file or line; say both (and what YAML found there)."""
    if not Path(path).is_file():
        return  # Snakemake names a missing config file itself
    try:
        with open(path, encoding="utf-8") as stream:
            yaml.safe_load(stream)
    except yaml.YAMLError as exc:
        fix = "Fix that line (indent with spaces, close brackets and quotes)."
        raise ValueError(f"{path} is not valid YAML:\n{exc}\n{fix}") from None


def load_schema(name):
    with open(Path(workflow.basedir) / name, encoding="utf-8") as stream:
        return yaml.safe_load(stream)


def _resolve(node, schema):
    """Follow a local `$ref` ("#/$defs/...") to the node it names."""
    while isinstance(node, dict) and "$ref" in node:
        target = schema
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _types(node):
    kinds = node.get("type", [])
    return [kinds] if isinstance(kinds, str) else list(kinds)


def _scalar(text, types):
    """A command-line word as YAML would read it, where the schema rules out a string: `null`, `true`, `8`, `0.1`."""
    word = text.strip().lower()
    if "null" in types and word in ("null", "none", "~"):
        return None
    if "string" in types:
        return text
    if "boolean" in types and word in ("true", "false"):
        return word == "true"
    if "integer" in types and re.fullmatch(r"[-+]?[0-9]+", word):
        return int(word)
    if "number" in types and _NUMBER.fullmatch(word):
        return float(word)
    return text


def _typed(value, node, schema):
    """`value` typed as its schema node expects: text where only text is allowed, else YAML's reading of the text
    (a string stays a string where the schema allows one). Snakemake reads nested
    `--config` values with YAML's BaseLoader, so `fracbits={match: null}` arrives as the text 'null' and
    `stages={fracbits: {optim: {epochs: 1}}}` as '1'. Keys the schema does not know are left to its check."""
    node = _resolve(node, schema)
    if node is None:
        return value
    if isinstance(value, dict):
        known = node.get("properties")
        free = node is _FREE or (known is None and "object" in _types(node))  # a stage section: any key and value
        return {k: _typed(v, _FREE if free else (known or {}).get(k), schema) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v, _FREE if node is _FREE else node.get("items"), schema) for v in value]
    if isinstance(value, str):
        return _scalar(value, _types(node))
    types = _types(node)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and types == ["string"]:
        return str(value)  # `name=2024`: Snakemake reads a number, the key wants its text
    return value


def type_command_line_values(config, schema):
    """Re-apply the `--config` values (Snakemake already merged them as text) typed as the schema expects; values
    from config files keep the types YAML gave them."""
    given = workflow.config_settings.config
    typed = _typed({key: copy.deepcopy(given[key]) for key in given}, schema, schema)
    update_config(config, typed)


# ---- schema errors in a few lines -------------------------------------------------------------------------------
def _where(path):
    """config path ['stages', 'search', 'optim'] / ['seeds', 0] -> 'stages.search.optim' / 'seeds[0]'."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")


def _description(path, schema):
    """The schema's description of the innermost named key on `path` (what the key means, in the user's words)."""
    node, found = schema, ""
    for part in path:
        node = _resolve(node, schema)
        node = node.get("items", {}) if isinstance(part, int) else node.get("properties", {}).get(part, {})
        node = _resolve(node, schema)
        found = " ".join(node.get("description", "").split()) or found
    return found


def _unknown_keys(error, schema):
    where = _where(error.absolute_path)
    allowed = list(error.schema.get("properties", {}))
    unknown = sorted(set(error.instance) - set(allowed))
    named = ", ".join(f"{where}.{k}" if where else k for k in unknown)
    top = schema["properties"]
    at_top = [k if k in top else f"{k}s" for k in unknown if k in top or f"{k}s" in top]
    hint = f" (use the top-level {', '.join(at_top)})" if where and at_top else ""
    under = f" under {where}" if where else ""
    return (
        f"unknown config key {named}{hint}. Allowed keys{under}: {', '.join(allowed)}. "
        f"Check the spelling; every key is described in {CONFIG_SCHEMA}."
    )


def schema_error(error, schema):
    """One short message for a jsonschema error: which key, what was wrong, what the key expects, where that is."""
    if error.validator == "additionalProperties":
        return _unknown_keys(error, schema)
    where = _where(error.absolute_path) or "(the whole config)"
    expected = _description(error.absolute_path, schema)
    expected = f" Expected: {expected}" if expected else ""
    return f"config {where}: {error.message}.{expected} (schema: {CONFIG_SCHEMA})"


def check_schema(config, schema):
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(config))
    if error is not None:
        raise ValueError(schema_error(error, schema))


# ---- lists whose values name folders: one run per distinct value ------------------------------------------------
def _repeats(values, number):
    """Groups of values that are the same number (e.g. '1', '1.0', 1e0), in the order given."""
    groups = {}
    for value in values:
        groups.setdefault(number(value), []).append(value)
    return [(key, group) for key, group in groups.items() if len(group) > 1]


def _whole(value):
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, str) and value.strip().isdigit()
    )


def _float_or_none(value):
    try:
        return float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def check_distinct(config):
    """Reject repeats hidden by spelling (alphas '1' and '1.0', seeds 1 and '01'): each would run the same jobs
    twice, and repeated seeds make a mean ± std over copies. Shapes and patterns are left to the schema."""
    lists = {
        "seeds": (config.get("seeds"), "seed", int),
        "uniform_bits": (config.get("uniform_bits"), "bit-width", int),
        "alphas": (config.get("alphas"), "alpha", float),
        **{
            f"{method}.targets": ((config.get(method) or {}).get("targets"), "target", float)
            for method in method_names()  # each method's explicit targets (`<method>: {targets: [...]}`)
        },
    }
    for key, (values, what, kind) in lists.items():
        if not isinstance(values, list):
            continue
        if kind is int:
            bad = [v for v in values if not _whole(v)]
            if bad:
                raise ValueError(f"{key} must be whole numbers >= 0 such as [1, 2, 3]; {bad[0]!r} is not")
            number = int
        else:
            values = [v for v in values if _float_or_none(v) is not None and math.isfinite(_float_or_none(v))]
            number = float
        for same, group in _repeats(values, number):
            spelled = ", ".join(repr(v) for v in group)
            harm = "one seed would count as several in the mean ± std" if key == "seeds" else "same jobs, two folders"
            raise ValueError(
                f"{key} lists the same {what} more than once: {spelled} are all {same:g} ({harm}). Keep one of them"
            )


# ---- stage settings the workflow sets itself: a user's value would be overwritten or contradict the top level ----
WORKFLOW_SET = {  # the workflow's own; each method declares the keys its points set (Method.workflow_keys)
    "model.arch": "the model comes from the top-level `arch`",
    "model.width": "the width comes from the top-level `width`",
    "data.name": "the dataset comes from the top-level `dataset`",
    "data.root": "the data folder comes from the top-level `data_root`",
    "data.download": "downloading is the top-level `download`",
}


def workflow_set_keys():
    """Dotted stage-config key -> where the workflow takes its value from: the methods' keys, then the workflow's."""
    from bsq.methods import registry

    keys = {}
    for method in registry().values():
        keys.update(method.workflow_keys)
    return {**keys, **WORKFLOW_SET}


def check_workflow_set_keys(config):
    """Refuse stage settings the workflow overwrites per job (or that would make paths and labels lie)."""
    for stage, section in (config.get("stages") or {}).items():
        for dotted, source in workflow_set_keys().items():
            group, key = dotted.split(".", 1)
            values = (section or {}).get(group) or {}
            if isinstance(values, dict) and key in values:
                path = f"stages.{stage}.{dotted}"
                value = values[key]
                raise ValueError(f"{path} ({value!r}) is set by the workflow for each job: {source}. Remove {path}")


# ---- the published baselines sheet -------------------------------------------------------------------------------
def _data_lines(path):
    """File line where each data row starts (a quoted cell may span lines; blank lines hold no row)."""
    starts, line = [], 1
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.reader(stream)
        for row in reader:
            if row:
                starts.append(line)
            line = reader.line_num + 1
    return starts[1:]


def read_baselines(path):
    """The published numbers, checked row by row against their schema; errors name the file, line and column."""
    import pandas as pd

    if not Path(path).is_file():
        raise ValueError(f"baselines: {path} not found; point it at config/published_baselines.csv")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise ValueError(f"baselines: cannot read {path}: {str(exc).strip()}. Quote cells that hold commas") from None
    schema = load_schema(BASELINES_SCHEMA)
    validator = jsonschema.Draft202012Validator(schema)
    for i, record in enumerate(frame.to_dict("records")):
        given = {column: value for column, value in record.items() if pd.notna(value)}  # empty = not reported
        error = jsonschema.exceptions.best_match(validator.iter_errors(given))
        if error is not None:
            column = _where(error.absolute_path) or "(row)"
            raise ValueError(
                f"baselines: {path} line {_data_lines(path)[i]}, column {column}: {error.message} "
                f"(columns are described in {BASELINES_SCHEMA})"
            )
    return frame
