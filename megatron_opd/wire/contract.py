"""SGLang's own request schemas (its OpenAPI, v0.5.23, vendored in ``contracts/``) as validators.

Both sides use them: the client checks every body it sends, the embedded server rejects bodies that
SGLang itself would reject, so the CPU server cannot drift from the real one.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

CONTRACT = Path(__file__).parent / "contracts" / "sglang-0.5.23-openapi-subset.json"


class ContractError(ValueError):
    """A request body does not match SGLang's schema."""


@lru_cache(maxsize=1)
def _document() -> dict[str, Any]:
    return json.loads(CONTRACT.read_text())


@lru_cache(maxsize=None)
def _validator(path: str) -> Any:
    import jsonschema

    doc = _document()
    if path not in doc["paths"]:
        raise KeyError(f"{path} is not in the SGLang contract")
    operation = doc["paths"][path].get("post") or doc["paths"][path].get("get")
    body = operation.get("requestBody")
    if body is None:
        return None
    schema = body["content"]["application/json"]["schema"]
    return jsonschema.Draft202012Validator({**schema, "components": doc["components"]})


def validate_request(path: str, body: Any) -> None:
    """Raise :class:`ContractError` naming the offending field when ``body`` breaks the schema."""
    validator = _validator(path)
    if validator is None:
        return
    errors = sorted(validator.iter_errors(body), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        where = ".".join(str(p) for p in first.path) or "<body>"
        raise ContractError(f"{path}: {where}: {first.message}")


def paths() -> list[str]:
    return list(_document()["paths"])
