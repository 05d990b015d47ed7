"""Merging: ``enigma merge`` vs ``mergekit-yaml``'s engine on the same models and YAML — time and peak memory.

Writes three random Llamas (``--hidden`` wide, ``--layers`` deep, fp32;
~680 MB each at the defaults) and merges them with ``--method`` (TIES by
default: the method that holds the most per tensor), once with enigma and
once with mergekit's ``run_merge``, each in a fresh process that samples its
own anonymous resident memory (``RssAnon``: the heap, not the page cache of
memory-mapped inputs) every 2 ms. Prints each side's seconds and peak, the
model's size, the largest tensor's, and checks that the outputs are equal.

    python benchmarks/merge.py [--hidden 1536] [--layers 8] [--method ties] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, threading, time, torch
torch.set_num_threads(int(sys.argv[4]))
peak = 0
done = threading.Event()
def rss_anon():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
def sample():
    global peak
    while not done.is_set():
        peak = max(peak, rss_anon())
        time.sleep(0.002)
tool, config_path, out = sys.argv[1:4]
import yaml
config = yaml.safe_load(open(config_path))
if tool == "mergekit":
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
else:
    from enigma.merging import MergeConfig, merge
baseline = rss_anon()
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
if tool == "mergekit":
    run_merge(MergeConfiguration.model_validate(config), out, options=MergeOptions(quiet=True, write_model_card=False))
else:
    merge(MergeConfig.from_dict(config), output=out)
elapsed = time.perf_counter() - start
done.set()
print(json.dumps({"seconds": elapsed, "peak": max(peak, rss_anon()) - baseline}))
"""


def make_models(root: Path, hidden: int, layers: int) -> list[Path]:
    from enigma.testing import make_tiny_llama

    return [make_tiny_llama(root / f"m{i}", seed=i, layers=layers, hidden_size=hidden) for i in range(3)]


def config_for(method: str, models: list[Path]) -> dict:
    a, b, c = (str(m) for m in models)
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}],
                "parameters": {"t": [0, 0.5, 1]}}
    if method == "linear":
        return {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1}} for m in (a, b, c)]}
    return {"merge_method": method, "base_model": a, "models": [
        {"model": b, "parameters": {"weight": 0.6, "density": 0.5}},
        {"model": c, "parameters": {"weight": 0.4, "density": 0.5}}]}


def run(tool: str, config: Path, out: Path, threads: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, tool, str(config), str(out), str(threads)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--method", default="ties")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    import yaml
    from safetensors import safe_open
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="enigma-merge-bench-") as tmp:
        root = Path(tmp)
        models = make_models(root, args.hidden, args.layers)
        config = root / "merge.yml"
        config.write_text(yaml.safe_dump(config_for(args.method, models)))
        size = (models[0] / "model.safetensors").stat().st_size
        with safe_open(str(models[0] / "model.safetensors"), framework="pt") as handle:
            largest = max(torch.Size(handle.get_slice(k).get_shape()).numel() for k in handle.keys()) * 4
        ours = run("enigma", config, root / "enigma", args.threads)
        theirs = run("mergekit", config, root / "mergekit", args.threads)
        a, b = load_file(root / "enigma" / "model.safetensors"), load_file(root / "mergekit" / "model.safetensors")
        worst = max((a[k] - b[k]).abs().max().item() for k in b)
    mb = 1e6
    print(f"model {size / mb:.0f} MB fp32 (largest tensor {largest / mb:.1f} MB), {args.method} of "
          f"{3 if args.method != 'slerp' else 2} models, {args.threads} threads")
    print(f"enigma    {ours['seconds']:6.1f} s   peak RssAnon {ours['peak'] / mb:7.0f} MB "
          f"({ours['peak'] / size:.2f}x one model, {ours['peak'] / largest:.1f}x the largest tensor)")
    print(f"mergekit  {theirs['seconds']:6.1f} s   peak RssAnon {theirs['peak'] / mb:7.0f} MB "
          f"({theirs['peak'] / size:.2f}x one model)")
    randomized = args.method.startswith(("dare", "della"))
    difference = ("random drops: not comparable run to run (tests/core/test_merging.py compares them per tensor "
                  "with one seed)" if randomized else f"max |difference| {worst:.2e}")
    print(f"time ratio mergekit/enigma {theirs['seconds'] / ours['seconds']:.2f}x, "
          f"memory ratio {theirs['peak'] / max(ours['peak'], 1):.2f}x; {difference}")


if __name__ == "__main__":
    main()
