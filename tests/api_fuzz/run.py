#!/usr/bin/env python3
"""Fuzzes conveyor's HTTP API against its own OpenAPI document.

Starts `conveyor dev` (the embedded cluster, a worker and the gateway) with
fuzz.toml, then runs schemathesis with every check against the document the
gateway serves at /openapi.json: no 5xx, every schema-valid request accepted,
every schema-invalid one refused, every response as documented. Exits with
schemathesis's status.

    python3 tests/api_fuzz/run.py --conveyor target/debug/conveyor

Needs schemathesis (tests/api_fuzz/requirements.txt).
"""

import argparse
import os
import pathlib
import subprocess
import sys
import threading

HERE = pathlib.Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conveyor", default="target/debug/conveyor", help="the conveyor binary")
    parser.add_argument("--max-examples", default="60", help="examples per operation and phase")
    args = parser.parse_args()

    dev = subprocess.Popen(
        [args.conveyor, "dev", "--config", str(HERE / "fuzz.toml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    api = None
    lines = []
    ready = threading.Event()

    def read() -> None:
        nonlocal api
        assert dev.stdout is not None
        for line in dev.stdout:
            lines.append(line.rstrip())
            if line.strip().startswith("gateway: http://"):
                api = line.split()[1]
            if "Ctrl-C stops" in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(120) or api is None or dev.poll() is not None:
            print("api-fuzz: conveyor dev did not start:\n" + "\n".join(lines), file=sys.stderr)
            return 1
        print(f"api-fuzz: schemathesis against {api}/openapi.json (conveyor dev)", flush=True)
        env = dict(os.environ, SCHEMATHESIS_HOOKS="hooks", PYTHONPATH=str(HERE))
        return subprocess.call(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "--config-file",
                str(HERE / "schemathesis.toml"),
                "run",
                f"{api}/openapi.json",
                "--checks",
                "all",
                "--max-examples",
                args.max_examples,
                "--seed",
                "1",
                "--suppress-health-check",
                "all",
            ],
            env=env,
            cwd=str(HERE),
        )
    finally:
        dev.terminate()
        try:
            dev.wait(30)
        except subprocess.TimeoutExpired:
            dev.kill()


if __name__ == "__main__":
    sys.exit(main())
