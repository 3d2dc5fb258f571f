"""The README's families x checks table, generated: `workbench check`'s battery on a tiny seeded model of
every family in ``workbench/models/families.py`` (saved with save_pretrained, loaded as a user's
checkpoint), and the one-line refusal of each undeclared MoE family.

    .venv/bin/python scripts/family_matrix.py            # prints the markdown table (~40 s)
    .venv/bin/python scripts/family_matrix.py --readme   # also replaces the table in README.md

Cells: ok, - (does not apply; the check's own line says why), FAIL.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workbench.check import run_checks  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.models.families import DENSE, MOE_DECLARED, MOE_INFERRED, MOE_UNDECLARED, MOE_ZOO, save_tiny  # noqa: E402
from workbench.models.gguf import tokenizer_dir  # noqa: E402
from workbench.models.specs import _tokenizer, load  # noqa: E402

CHECKS = ("hooks fire", "hooks are read-only", "dense MLP output", "routing", "block rebuilt", "zero is exact",
          "planted super expert found", "study runs", "attention probabilities", "circuit graph")
BEGIN, END = "<!-- family-matrix:begin -->", "<!-- family-matrix:end -->"


def _row(name: str, results) -> str:
    by = {c.name: c for c in results}
    ad = by["adapter"].detail.split(":")[0]
    cells = [{True: "ok", None: "-", False: "**FAIL**"}[by[c].ok] if c in by else "?" for c in CHECKS]
    return f"| {name} | {'inferred' if '(inferred)' in ad else 'declared'} | " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", action="store_true", help="replace the table between the markers in README.md")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    tok = _tokenizer(tokenizer_dir())
    lines = ["| family | adapter | " + " | ".join(CHECKS) + " |", "| --- | --- | " + " | ".join("---" for _ in CHECKS) + " |"]
    for mt in DENSE + MOE_DECLARED + MOE_INFERRED:
        with tempfile.TemporaryDirectory() as d:
            lines.append(_row(mt, run_checks(load(str(save_tiny(mt, d, tok))))))
    for name in MOE_ZOO:
        lines.append(_row(f"{name} (zoo)", run_checks(load(f"zoo:{name}"))))
    refused = []
    for mt in MOE_UNDECLARED:
        with tempfile.TemporaryDirectory() as d:
            try:
                load(str(save_tiny(mt, d, tok)))
                refused.append(f"{mt} (loaded: update this list)")
            except WorkbenchError as e:
                why = "hybrid layers without attention" if "no attention module" in str(e) else "MoE routing not declared"
                refused.append(f"{mt} ({why})")
    table = "\n".join(lines) + "\n\nRefused with a one-line error (need a declared adapter): " + ", ".join(refused) + "."
    print(table)
    if args.readme:
        readme = ROOT / "README.md"
        text = readme.read_text()
        if BEGIN not in text or END not in text:
            raise SystemExit(f"error: README.md has no {BEGIN} ... {END} markers")
        readme.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda m: f"{BEGIN}\n{table}\n{END}", text,
                                 flags=re.S))
        print("replaced the table in README.md")


if __name__ == "__main__":
    main()
