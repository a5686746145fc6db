"""How every benchmark hands out a result row: one JSON line on stdout, appended to the `--out` file when given."""

import json


def report(row: dict, out: str | None) -> None:
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
