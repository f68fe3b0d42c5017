"""Twenty JSON schemas for the structured-output tests (nested objects, arrays, enums, numbers with
ranges, required fields), each with the request it answers. Strings and arrays are bounded so that
every output completes within the tests' ``max_tokens``."""

from __future__ import annotations

from typing import Any


def _obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None
            else required}


def _str(max_length: int = 12, **kw: Any) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_length, **kw}


def _int(lo: int, hi: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": lo, "maximum": hi}


SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("a person", _obj({"name": _str(), "age": _int(0, 120)})),
    ("a product", _obj({"id": _int(1, 9999), "price": {"type": "number", "minimum": 0, "maximum": 1000},
                        "in_stock": {"type": "boolean"}})),
    ("a color", _obj({"color": {"enum": ["red", "green", "blue"]}})),
    ("a point", _obj({"x": _int(-100, 100), "y": _int(-100, 100)})),
    ("tags of a blog post",
     _obj({"tags": {"type": "array", "items": _str(8), "minItems": 1, "maxItems": 3}})),
    ("an address",
     _obj({"street": _str(16), "city": _obj({"name": _str(), "zip": _str(5, pattern="[0-9]{5}")})})),
    ("a movie rating", _obj({"score": _int(1, 5), "comment": _str(20)})),
    ("account flags", _obj({"active": {"type": "boolean"}, "admin": {"type": "boolean"}})),
    ("a difficulty level", _obj({"level": {"enum": [1, 2, 3]}})),
    ("the weather", _obj({"temperature": {"type": "number", "minimum": -50, "maximum": 50},
                          "unit": {"enum": ["C", "F"]}})),
    ("a shopping list", _obj({"items": {"type": "array", "maxItems": 2,
                                        "items": _obj({"name": _str(8), "qty": _int(1, 10)})}})),
    ("a book", _obj({"title": _str(16), "year": _int(1900, 2025),
                     "authors": {"type": "array", "items": _str(12), "maxItems": 2}})),
    ("an event", _obj({"type": {"const": "event"}, "id": _int(0, 999)})),
    ("a setting", _obj({"a": _int(0, 9), "b": _str(5)}, required=["a"])),
    ("a small matrix", _obj({"rows": {"type": "array", "maxItems": 2,
                                      "items": {"type": "array", "items": _int(0, 9), "maxItems": 2}}})),
    ("a user", _obj({"role": {"enum": ["admin", "user", "guest"]},
                     "email": {"type": "string", "pattern": "[a-z]{1,8}@[a-z]{1,8}\\.com"}})),
    ("a note that may be empty", _obj({"note": {"type": ["string", "null"], "maxLength": 10}})),
    ("a date", _obj({"date": {"type": "string", "pattern": "20[0-9]{2}-[01][0-9]-[0-3][0-9]"}})),
    ("a nested value", _obj({"a": _obj({"b": _obj({"c": _int(0, 9)})})})),
    ("some lottery numbers", {"type": "array", "items": _int(0, 99), "minItems": 1, "maxItems": 4}),
]
