"""Compare two profile.json files (e.g. the same model profiled on CPU and on a GPU).

Prints, per top-level section, how many numbers were compared and the largest relative difference,
then every leaf that differs by more than ``--rtol`` (relative to the larger magnitude, with an
absolute floor ``--atol``), and whether the super experts (layer, expert, channel) are the same.
Exits 1 when the super experts differ or a leaf is off by more than the tolerance, 2 with one ``error:`` line
when a file is missing or not a JSON object; ``meta`` (times, device, versions) is skipped.

    .venv/bin/python bench/profile_diff.py runs/cpu/profile.json runs/gpu/profile.json [--rtol 1e-3]
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from workbench.args import Number, Parser


def leaves(obj, path=""):
    """(path, value) for every scalar in a JSON tree."""
    if isinstance(obj, dict):
        for k in sorted(obj):
            yield from leaves(obj[k], f"{path}.{k}" if path else k)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, obj


def rel(a: float, b: float, atol: float) -> float:
    if a == b or (math.isnan(a) and math.isnan(b)):
        return 0.0
    return abs(a - b) / max(abs(a), abs(b), atol)


def read(parser: argparse.ArgumentParser, path: str) -> dict:
    """A profile.json's content. A file that is missing or not a JSON object is a usage error: one ``error:``
    line, exit status 2 (1 means the profiles differ)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        parser.error(f"cannot read {path}: {e.strerror}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        parser.error(f"{path} is not JSON: {e}")
    if not isinstance(data, dict):
        parser.error(f"{path} is not a profile.json (not a JSON object)")
    return data


def main(argv=None) -> int:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--rtol", type=Number(float, 0), default=1e-3)
    p.add_argument("--atol", type=Number(float, 0), default=1e-4, help="magnitudes below this compare absolutely")
    args = p.parse_args(argv)
    a, b = (read(p, f) for f in (args.a, args.b))
    bad, worst = [], {}
    for section in sorted(set(a) | set(b)):
        if section == "meta":
            continue
        la, lb = dict(leaves(a.get(section))), dict(leaves(b.get(section)))
        n, top = 0, 0.0
        for key in sorted(set(la) | set(lb)):
            u, v = la.get(key, "<missing>"), lb.get(key, "<missing>")
            if isinstance(u, (int, float)) and isinstance(v, (int, float)) and not isinstance(u, bool):
                n += 1
                r = rel(float(u), float(v), args.atol)
                top = max(top, r)
                if r > args.rtol:
                    bad.append((r, f"{section}.{key}", u, v))
            elif u != v:
                bad.append((math.inf, f"{section}.{key}", u, v))
        worst[section] = (n, top)
    for section, (n, top) in worst.items():
        print(f"{section:<32} {n:>7} numbers  max rel diff {top:.2e}")
    se = [sorted((s["layer"], s["expert"], s.get("channel")) for s in d.get("super_experts", [])) for d in (a, b)]
    print(f"super experts: {'same' if se[0] == se[1] else 'DIFFER'}: {se[0]}" + ("" if se[0] == se[1] else f" vs {se[1]}"))
    for r, key, u, v in sorted(bad, key=lambda t: -t[0])[:25]:
        print(f"  differs ({r:.2e}): {key}: {u!r} vs {v!r}")
    if len(bad) > 25:
        print(f"  ... and {len(bad) - 25} more")
    return 1 if bad or se[0] != se[1] else 0


if __name__ == "__main__":
    sys.exit(main())
