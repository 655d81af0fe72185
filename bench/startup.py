"""Where a worker's start-up goes: the imports a cold worker pays and a warm fork of the node's
prefork server does not, each in a fresh interpreter, with the collector on and paused.

    .venv/bin/python bench/startup.py [--repeat 5]

Each row is the median over `--repeat` fresh interpreters of the time one import statement takes
after `import torch` (itself measured alone). Ends with one JSON line. The figures back the
choices in elastic_train/node/prefork.py (what the server preloads, and when) and
elastic_train/startup.py (imports with the collector paused).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

PROBE = """
import gc, sys, time
paused = sys.argv[2] == "paused"
if sys.argv[1] != "torch":
    import torch  # noqa: F401 - measured apart: every worker, warm or cold, has it
if paused:
    gc.disable()
t0 = time.perf_counter()
exec(sys.argv[1] if sys.argv[1] != "torch" else "import torch")
print(time.perf_counter() - t0)
"""

IMPORTS = {
    "torch": "torch",
    "trainer": "import elastic_train.trainer",
    "trainer + dynamo": "import elastic_train.trainer, torch._dynamo",
    "s3fs": "import s3fs",
    "gcsfs": "import gcsfs",
}


def measure(statement: str, mode: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", PROBE, statement, mode], check=True,
                             capture_output=True, text=True,
                             env={"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                                  "PATH": "/usr/bin:/bin"})
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    result: dict[str, dict[str, float]] = {}
    print(f"{'import':<18} {'collector on':>13} {'paused':>8}")
    for name, statement in IMPORTS.items():
        on = measure(statement, "on", args.repeat)
        paused = measure(statement, "paused", args.repeat)
        result[name] = {"on_s": round(on, 3), "paused_s": round(paused, 3)}
        print(f"{name:<18} {on:>12.2f}s {paused:>7.2f}s", flush=True)
    print(json.dumps({"bench": "startup", "repeat": args.repeat, "imports": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
