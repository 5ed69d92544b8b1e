"""params.yaml and the profiles: one set of defaults, and files that hold only what they change.

Every default lives in `dmat.config` (each field with its one-line doc). `params.yaml` — what DVC tracks and
`dvc exp run -S` edits — is rendered from those defaults (`dmat params render`; a test holds the committed
file equal to the rendering). A profile (profiles/*.yaml) holds only the keys it changes, as dotted keys, each
with a one-line reason in its comment:

    train.model: wrn-28-10      # the paper's network
    evaluate.threats: {linf: {norm: Linf, eps: 8/255}}   # a mapping value replaces the default mapping

`dmat params apply PROFILE` writes the complete params.yaml it makes (defaults, the profile's changes, and
`base.profile` naming the profile, so that runs label their variants relative to it); `dmat queue` does the
same for a grid's profile while it queues.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import textwrap
import typing
from pathlib import Path
from typing import Any

from dmat.config import Params, ParamsError, as_dict, parse_params, read_yaml

COMMENT_COLUMN = 24  # values and their docs line up, as in a hand-written file
WIDTH = 118
DEFAULTS_TITLE = "DMAT parameters: the CPU default profile (the whole pipeline on a 2-core laptop)."
HEADER = """\
# One section per stage; each stage reads `base` and its own section. Every value is validated when a stage starts:
# a bad one stops it with exit code 2 and a message naming the key. The defaults live in src/dmat/config.py
# (`dmat params render` writes them here; a test holds the two equal). For an experiment, edit values here or use
# `dvc exp run -S key=value`; for a committed recipe, write a profile (profiles/*.yaml: only what it changes, with
# a reason each) and `dmat params apply` it.
"""


def profile_title(profile: str) -> str:
    return (f"DMAT parameters of {profile}, written by `dmat params apply`: the defaults with the profile's changes, "
            "each marked 'profile' with its reason.")


# --- rendering ---------------------------------------------------------------------------------------------


def render(params: Params, reasons: dict[str, str] | None = None, title: str = DEFAULTS_TITLE) -> str:
    """A complete, commented params.yaml for `params`: each key with its doc, or with the profile's reason
    (`reasons`, by dotted key) and the default it replaces."""
    lines = [f"# {line}" for line in textwrap.wrap(title, WIDTH - 2)] + HEADER.rstrip("\n").splitlines() + [""]
    for index, spec in enumerate(dataclasses.fields(params)):
        lines += ([""] if index else []) + _section_lines(getattr(params, spec.name), spec.name, 0, spec.name,
                                                          reasons or {}, _doc(type(getattr(params, spec.name))))
    return "\n".join(lines) + "\n"


def _section_lines(config: Any, name: str, depth: int, dotted: str, reasons: dict[str, str], doc: str) -> list[str]:
    lines = _commented(f"{'  ' * depth}{name}:", doc, above=depth == 0)
    defaults = type(config)()
    hints = typing.get_type_hints(type(config))
    for spec in dataclasses.fields(config):
        value, key = getattr(config, spec.name), f"{dotted}.{spec.name}"
        if dataclasses.is_dataclass(value):
            lines += _section_lines(value, spec.name, depth + 1, key, reasons, spec.metadata.get("doc", ""))
            continue
        if isinstance(value, dict) and value and all(dataclasses.is_dataclass(v) for v in value.values()):
            lines += _commented(f"{'  ' * (depth + 1)}{spec.name}:", _reason(key, reasons, spec, defaults, hints))
            for entry, item in value.items():
                lines += _section_lines(item, entry, depth + 2, f"{key}.{entry}", reasons, "")
            continue
        text = format_value(value, spec.metadata.get("per255", False))
        lines += _commented(f"{'  ' * (depth + 1)}{spec.name}: {text}", _reason(key, reasons, spec, defaults, hints))
    return lines


def _reason(key: str, reasons: dict[str, str], spec: dataclasses.Field, defaults: Any, hints: dict) -> str:
    if key in reasons:
        default = getattr(defaults, spec.name)
        shown = "the default mapping" if isinstance(default, dict) else format_value(default,
                                                                                     spec.metadata.get("per255"))
        return f"{reasons[key]} (profile; default {shown})"
    return spec.metadata.get("doc", "")


def _commented(text: str, doc: str, above: bool = False) -> list[str]:
    """`text` with its doc: aligned after it when both fit, else (or when `above`) as comment lines above it."""
    if not doc:
        return [text]
    indent = " " * (len(text) - len(text.lstrip()))
    if above or len(text) + 1 > COMMENT_COLUMN + 10:
        return [f"{indent}# {chunk}" for chunk in textwrap.wrap(doc, WIDTH - len(indent) - 2)] + [text]
    column = max(COMMENT_COLUMN, len(text) + 1)
    chunks = textwrap.wrap(doc, WIDTH - column - 2) or [doc]
    return [f"{text.ljust(column)}# {chunks[0]}", *(f"{' ' * column}# {chunk}" for chunk in chunks[1:])]


def _doc(cls: type) -> str:
    return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


def format_value(value: Any, per255: bool = False) -> str:
    """A value as YAML 1.2 that reads back equal: lists in flow style, radii as k/255 where they are."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(format_value(v, per255) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v, per255)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        steps = value * 255
        if per255 and 0 < value < 1 and abs(steps - round(steps)) < 1e-9:
            return f"{round(steps)}/255"
        return repr(value)
    if isinstance(value, str):
        return value if _reads_back(value) else json.dumps(value)
    return str(value)


def _reads_back(text: str) -> bool:
    try:
        return read_yaml(f"k: {text}") == {"k": text}
    except ValueError:
        return False


# --- profiles ----------------------------------------------------------------------------------------------


def read_profile(text: str, where: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A profile's changes (dotted key -> value) and each key's reason (its comment). Nested mappings of plain
    params files are accepted too (each leaf is a change, without a reason)."""
    try:
        raw = read_yaml(text)
    except ValueError as err:
        raise ParamsError(f"{where}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping of dotted params keys to values")
    changes = {str(key): value for key, value in raw.items() if "." in str(key)}
    changes.update(_leaves({key: value for key, value in raw.items() if "." not in str(key)}, ""))
    reasons = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z_][\w.]*):[^#]*#\s*(.+)$", line)
        if match and match[1] in changes:
            reasons[match[1]] = match[2].strip()
    return changes, reasons


def _leaves(mapping: dict[str, Any], prefix: str, cls: type = Params) -> dict[str, Any]:
    """The leaves of a nested params mapping as dotted keys; a mapping-valued key (evaluate.threats) is one leaf."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        section = hints.get(key)
        if isinstance(value, dict) and dataclasses.is_dataclass(section):
            out.update(_leaves(value, name, section))
        else:
            out[name] = value
    return out


def apply(changes: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Plain params data: `base` (default: every default) with each dotted key's value replaced (a mapping value
    replaces the whole mapping). A key the params do not have is a ParamsError naming it."""
    out = copy.deepcopy(base if base is not None else as_dict(Params()))
    for dotted, value in changes.items():
        node, *parents, leaf = [out, *dotted.split(".")]
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ParamsError(f"{dotted} is not a known key: there is no section {part!r} there")
            node = node[part]
        if leaf not in node:
            raise ParamsError(f"{dotted} is not a known key")
        node[leaf] = value
    return out


def load_profile(path: str | Path, root: Path | None = None, text: str | None = None) -> tuple[Params, dict[str, str]]:
    """The params a profile makes (validated, `base.profile` naming it) and its reasons. `text`: the profile's
    content when it is not read from disk (e.g. the committed version)."""
    path = Path(path)
    where = str(path)
    if text is None:
        try:
            text = ((root or Path.cwd()) / path).read_text(encoding="utf-8")
        except OSError as err:
            raise ParamsError(f"{where}: cannot read the profile: {err}") from None
    changes, reasons = read_profile(text, where)
    changes["base.profile"] = path.as_posix()
    try:
        return parse_params(apply(changes)), reasons
    except ParamsError as err:
        raise ParamsError(f"{where}: {err}") from None


def is_profile(path: str | Path) -> bool:
    """Whether a params file is a profile (dotted keys: the changes from the defaults) rather than a params file."""
    try:
        raw = read_yaml(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and any("." in str(key) for key in raw)


def load_any(path: str | Path) -> Params:
    """A params file, or the params a profile makes."""
    from dmat.config import load_params

    return load_profile(path)[0] if is_profile(path) else load_params(path)


def profile_changes(params: Params) -> dict[str, Any]:
    """What `params` change from the defaults, as dotted keys (what a profile for them would hold); a mapping-valued
    key (evaluate.threats) is one change."""
    defaults = _leaves(as_dict(Params()), "")
    return {key: value for key, value in _leaves(as_dict(params), "").items() if defaults.get(key) != value}
