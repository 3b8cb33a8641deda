"""A config dataclass as JSON: what a checkpoint stores beside the weights, so that loading needs
only the file."""

import json
from dataclasses import asdict, fields
from typing import ClassVar


class JSONConfig:
    """Gives a config dataclass `to_json` and `from_json`; fields this version does not know are refused.

    `FILE_DEFAULTS`: values for fields that files written before the field existed lack, where the
    field's default would change what such a file describes.
    """

    FILE_DEFAULTS: ClassVar[dict] = {}

    def to_json(self):
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text):
        values = {**cls.FILE_DEFAULTS, **json.loads(text)}
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}: written by a newer version?")
        return cls(**values)
