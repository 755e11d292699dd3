"""YAML config files: the same keys and the same one-line errors as JSON configs (io.parse_json).

PyYAML's SafeLoader is made strict in the ways a JSON config already is: a duplicate key is an error
with its line (PyYAML keeps the last one silently), keys must be strings, only the JSON value kinds
are built (null, bool, int, float, str, list, mapping) and any other tag (!!binary, !!set, !!omap,
a custom tag) is refused with its line, and a timestamp-looking scalar stays a string. Floats written
without a dot (`1e-4`, YAML 1.2 style) are numbers, as a user of axolotl or HF configs expects; YAML
1.1's resolver would make them the string "1e-4". NaN and infinity (.nan, .inf) are parsed here and
refused by config.check_finite, exactly as JSON's NaN / Infinity are. YAML 1.1's other booleans,
unquoted yes / no / on / off, are refused with their line (YAML 1.2 reads them as strings, PyYAML as
booleans: `lora: no` would mean different things to different readers): write true / false, or quote them.
"""

from __future__ import annotations

import re

import yaml

from mftcore.io import MAX_JSON_DEPTH, JsonProblem, decode_utf8, depth_exceeds

YAML_SUFFIXES = (".yaml", ".yml")


class StrictLoader(yaml.SafeLoader):
    """SafeLoader building only JSON's value kinds, refusing duplicate and non-string keys."""

    yaml_constructors = {tag: fn for tag, fn in yaml.SafeLoader.yaml_constructors.items()
                         if tag in {"tag:yaml.org,2002:null", "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int",
                                    "tag:yaml.org,2002:float", "tag:yaml.org,2002:str",
                                    "tag:yaml.org,2002:seq", None}}  # None: any other tag, refused
    yaml_multi_constructors = {}

    def construct_strict_mapping(self, node):
        if not isinstance(node, yaml.MappingNode):
            raise yaml.constructor.ConstructorError(None, None, "expected a mapping", node.start_mark)
        own = {id(k) for k, _ in node.value}
        self.flatten_mapping(node)  # merge keys (<<: *anchor): the merged pairs first, then the mapping's own
        out, seen = {}, set()
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise JsonProblem(f"keys must be strings, got {key!r}"[:200], key_node.start_mark.line + 1)
            if id(key_node) in own:  # a merged key may be overridden by the mapping's own, as YAML says
                if key in seen:
                    raise JsonProblem(f"duplicate key {key!r} (YAML readers disagree on which one counts)",
                                      key_node.start_mark.line + 1)
                seen.add(key)
            out[key] = self.construct_object(value_node, deep=True)
        return out

    def construct_strict_bool(self, node):
        text = self.construct_scalar(node)
        if text.lower() not in ("true", "false"):
            raise JsonProblem(f"{text!r} is a boolean in YAML 1.1 but a string in YAML 1.2: write true or false, "
                              f"or quote it", node.start_mark.line + 1)
        return text.lower() == "true"

    def construct_timestamp_as_text(self, node):
        return self.construct_scalar(node)


StrictLoader.add_constructor("tag:yaml.org,2002:map", StrictLoader.construct_strict_mapping)
StrictLoader.add_constructor("tag:yaml.org,2002:bool", StrictLoader.construct_strict_bool)
StrictLoader.add_constructor("tag:yaml.org,2002:timestamp", StrictLoader.construct_timestamp_as_text)
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def parse_yaml(data) -> object:
    """One YAML document from bytes or text, strictly (module docstring); raises io.JsonProblem."""
    text = decode_utf8(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        value = yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        reason = " ".join(str(part) for part in (e.context, e.problem) if part) or "cannot parse"
        raise JsonProblem(f"invalid YAML: {reason}"[:200], mark.line + 1 if mark else None) from None
    except yaml.YAMLError as e:
        raise JsonProblem(f"invalid YAML: {e}".splitlines()[0][:200]) from None
    except RecursionError:
        raise JsonProblem("nested too deeply (YAML lists/mappings inside each other)") from None
    if depth_exceeds(value, MAX_JSON_DEPTH):
        raise JsonProblem(f"nested more than {MAX_JSON_DEPTH} levels deep")
    return value
