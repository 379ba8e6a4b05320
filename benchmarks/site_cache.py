"""How long a site's data load takes in a fresh process, decoded vs from the on-disk cache (issue 12).

Generates 12,000 28x28 grey PNGs in an image-folder tree (10 classes) in a temporary folder,
then runs fresh Python processes that each call ``load_site_data`` once, as a deployed
ClientApp does for every Flower message:

1. the first load (list, hash the files, decode every PNG, write the cache);
2. cached loads (list, stat, look up the content index, read the cached tensors), repeated;
3. cached loads with ``verify_cache=True`` (re-hash every file's bytes instead of trusting
   unchanged size + mtime), for comparison.

Reports the ``load_site_data`` call time (what a message pays on top of the interpreter and
torch import, which the ClientApp pays anyway) and the whole process wall time.
Writes docs/benchmarks/site_cache.{json,md}.

    flock /tmp/graftfl-heavy.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/site_cache.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, machine

CHILD = """
import json, sys, time
from graftfl.core.sitedata import SiteDeclaration, load_site_data
started = time.perf_counter()
data = load_site_data(sys.argv[1], SiteDeclaration((1, 28, 28), 10), "bench", verify_cache=sys.argv[2] == "verify")
seconds = time.perf_counter() - started
print(json.dumps({"load_s": seconds, "from_cache": data.from_cache, "rows": len(data), "shape": list(data.x.shape)}))
"""


def generate(root: Path, count: int, seed: int = 0) -> float:
    from PIL import Image

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    # blurred noise, so the PNGs compress like real scans rather than like pure noise
    base = rng.integers(0, 256, size=(count, 14, 14), dtype=np.uint8).repeat(2, axis=1).repeat(2, axis=2)
    for number in range(count):
        folder = root / str(number % 10)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(base[number]).save(folder / f"{number:05d}.png")
    return time.perf_counter() - started


def fresh_load(data_path: Path, mode: str) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(data_path), mode], check=False, capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=600)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=12000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="graftfl-site-cache-") as tmp:
        data_path = Path(tmp) / "site-0"
        generate_s = generate(data_path, args.images)
        size = sum(p.stat().st_size for p in data_path.rglob("*.png"))
        first = fresh_load(data_path, "trust")
        assert not first["from_cache"]
        cached = [fresh_load(data_path, "trust") for _ in range(args.repeats)]
        assert all(run["from_cache"] for run in cached)
        verified = [fresh_load(data_path, "verify") for _ in range(max(1, args.repeats // 2))]
        cache_bytes = sum(p.stat().st_size for p in (data_path / ".graftfl-cache").iterdir())
    result = {
        "measured_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "images": args.images,
        "image_shape": [1, 28, 28],
        "png_bytes_total": size,
        "cache_bytes_total": cache_bytes,
        "generate_s": round(generate_s, 2),
        "first_load": first,
        "cached_loads": cached,
        "cached_load_s_median": statistics.median(r["load_s"] for r in cached),
        "cached_load_s_max": max(r["load_s"] for r in cached),
        "cached_process_s_median": statistics.median(r["process_s"] for r in cached),
        "verified_loads": verified,
        "verified_load_s_median": statistics.median(r["load_s"] for r in verified),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "site_cache.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "site_cache.md").write_text(table(result))
    print(table(result))


def table(r: dict) -> str:
    m = r["machine"]
    return f"""## Site data load: decoded vs cached ({r['images']:,} PNGs of 28x28, fresh process per load)

Measured {r['measured_utc']} on {m['cpus']} CPUs, Python {m['python']} (a machine shared with other work).
Command: `flock /tmp/graftfl-heavy.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/site_cache.py`.
Each load is a new Python process calling `load_site_data` once (as a deployed ClientApp does per
Flower message); "call" is that function's time, "process" adds the interpreter and the torch import.

| load | call s | process s |
|---|---:|---:|
| first (list, hash, decode {r['images']:,} PNGs, write cache) | {r['first_load']['load_s']:.2f} | {r['first_load']['process_s']:.2f} |
| cached, median of {len(r['cached_loads'])} (list + stat, content index, read tensors) | {r['cached_load_s_median']:.3f} | {r['cached_process_s_median']:.2f} |
| cached, slowest | {r['cached_load_s_max']:.3f} | {max(x['process_s'] for x in r['cached_loads']):.2f} |
| cached with `cache-verify=true` (re-hash every file), median | {r['verified_load_s_median']:.3f} | {statistics.median(x['process_s'] for x in r['verified_loads']):.2f} |

PNG files: {r['png_bytes_total'] / 2**20:.1f} MiB; cache folder: {r['cache_bytes_total'] / 2**20:.1f} MiB (uint8 tensors + content index).
Target (issue 12): a cached load of 12,000 28x28 images under 1 s.
"""


if __name__ == "__main__":
    main()
