"""``python -m deepflow.finetune.fresh NAME ARGS_JSON RESULT_JSON``: one fine-tuning operator
body in a new interpreter (``operators.in_new_process`` says why). Writes ``{"output": ...}``
or ``{"error": "Type: message"}`` to RESULT_JSON; the traceback goes to stderr (the log)."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path


def main(argv: list[str]) -> int:
    name, request, result = argv
    from deepflow.finetune import operators

    args = json.loads(Path(request).read_text())
    try:
        output = operators.BODIES[name](args)
    except Exception as exc:
        traceback.print_exc()
        Path(result).write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    Path(result).write_text(json.dumps({"output": output}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
