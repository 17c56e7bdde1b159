"""Write the published JSON Schema files (`python -m portq.tasks.core.schema_files`); a test keeps them current."""

from __future__ import annotations

import json
from pathlib import Path

from portq.tasks.core.contract import SCHEMAS, json_schema

SCHEMA_DIR = Path(__file__).parent / "schemas"


def write_all(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(exist_ok=True)
    written = []
    for filename, model in SCHEMAS.items():
        path = directory / filename
        path.write_text(json.dumps(json_schema(model), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_all():
        print(p)
