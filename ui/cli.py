"""``workbench ui``: start the Streamlit app on localhost (wire with :func:`add_ui_parser`)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from workbench.args import COUNT, PORT

APP = Path(__file__).resolve().parent / "app.py"


def command(model: str | None, port: int, threads: int | None = None, sae: str | None = None) -> list[str]:
    """The ``streamlit run`` command line that :func:`cmd_ui` executes."""
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false"]
    app_args = ((["--model", model] if model else []) + (["--threads", str(threads)] if threads else [])
                + (["--sae", sae] if sae else []))
    return cmd + (["--", *app_args] if app_args else [])


def cmd_ui(args: argparse.Namespace) -> int:
    print(f"workbench ui: http://127.0.0.1:{args.port}  (Ctrl-C to stop)", file=sys.stderr)
    try:
        return subprocess.call(command(args.model, args.port, args.threads, args.sae))
    except KeyboardInterrupt:
        return 0


def add_ui_parser(subparsers) -> argparse.ArgumentParser:
    u = subparsers.add_parser("ui", help="open the Streamlit workbench app (localhost)",
                              description="Start the Streamlit app (profile, steer, circuits pages) on "
                                          "127.0.0.1:PORT; MODEL is the model picked when the app opens.")
    u.add_argument("--model", default=None, help="model spec selected at start (default: zoo:tiny-moe-se)")
    u.add_argument("--port", type=PORT, default=8501, help="port on 127.0.0.1 (default 8501)")
    u.add_argument("--threads", type=COUNT, default=None,
                   help="torch CPU threads of the app (default: torch's choice); 1 keeps zoo-model "
                        "generation fast on a busy machine")
    u.add_argument("--sae", default=None,
                   help="SAE folder (SAELens' format) entered in the sidebar when the app opens")
    u.set_defaults(func=cmd_ui)
    return u
