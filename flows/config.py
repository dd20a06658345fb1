"""Build a parameter model from defaults, a YAML file and `--set key.path=value` overrides, with errors that
name the field."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ParamError(ValueError):
    """Parameters were rejected before any work started."""


def parse_overrides(items: list[str]) -> dict:
    """["scenes.threshold=30", "workers=4"] -> {"scenes": {"threshold": 30}, "workers": 4} (values parsed as YAML)."""
    tree: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ParamError(f"--set expects key=value (e.g. scenes.threshold=30), got {item!r}")
        node = tree
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamError(f"--set {key}: {part} is a value, not a section")
        node[leaf] = _parse_value(raw)
    return tree


class _YamlLoader(yaml.SafeLoader):
    """YAML with only true/false as booleans (as YAML 1.2): `mixed_precision: no` is the word "no", not False."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str):
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506  (a SafeLoader subclass)


def _parse_value(raw: str):
    """YAML scalars and lists ('30', 'true', 'null', '[a, b]'); anything else, e.g. a caption template like
    '{trigger}, {sidecar}' (a YAML mapping, or not YAML at all), stays the string it was typed as."""
    if not raw.strip():
        return ""
    try:
        value = load_yaml(raw)
    except yaml.YAMLError:
        return raw
    return raw if isinstance(value, dict) else value


def deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = (
            deep_merge(merged[key], value) if isinstance(merged.get(key), dict) and isinstance(value, dict) else value
        )
    return merged


def format_validation_error(exc: ValidationError, section: str | None = None) -> str:
    """One line per error, naming the field (inside `section`, e.g. a flow's `params`, when given)."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in ((section,) if section else ()) + tuple(err["loc"])) or "parameters"
        message = err["msg"].removeprefix("Value error, ")
        got = (
            f" (got {err['input']!r})"
            if err["type"] not in ("missing", "extra_forbidden")
            and "input" in err
            and not isinstance(err["input"], dict)
            else ""
        )
        if err["type"] == "extra_forbidden":
            message = "unknown parameter"
        lines.append(f"  {field}: {message}{got}")
    return "invalid parameters:\n" + "\n".join(lines)


def load_values(*, base: dict, config: Path | None = None, overrides: list[str] = ()) -> dict:
    """The parameters of a YAML file, `base` (a command's arguments) and `--set` overrides, merged in that order."""
    values: dict = {}
    if config is not None:
        try:
            loaded = load_yaml(Path(config).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ParamError(f"--config {config}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ParamError(f"--config {config}: expected a mapping of parameters at the top level")
        values = deep_merge(values, loaded)
    return deep_merge(deep_merge(values, base), parse_overrides(list(overrides)))  # arguments beat the file


def build_params(model: type[M], *, base: dict, config: Path | None = None, overrides: list[str] = ()) -> M:
    values = load_values(base=base, config=config, overrides=overrides)
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise ParamError(format_validation_error(exc)) from None


def describe_params(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every leaf parameter of `model`, nested sections flattened."""
    rows = []
    for name, field in model.model_fields.items():
        section = next(
            (
                t
                for t in (field.annotation, *typing.get_args(field.annotation))
                if isinstance(t, type) and issubclass(t, BaseModel)
            ),
            None,
        )
        if section is not None:  # a section, or an optional one (finetune's `curate`)
            if not field.is_required() and field.get_default(call_default_factory=True) is None:
                rows.append((f"{prefix}{name}", "None", field.description or ""))
            rows += describe_params(section, f"{prefix}{name}.")
            continue
        default = "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))
        rows.append((f"{prefix}{name}", default, field.description or ""))
    return rows
