"""Zero-filled weights against random weights, same shape, on this machine's CPU (issue 12 item 3).

Three files of one qwen35moe shape: ``random`` (every tensor random), ``zeros`` (a sparse file, all holes) and
``routed`` (holes but random token embeddings and routers, what ``tuner calibrate`` writes). One llama-server per
file, all up at once; measured with tuner bench's own code (:func:`tuner.bench.measure_once`), interleaved
random → zeros → routed for every repeat and depth, so drift hits all three alike. Writes a JSON document with every
sample, the medians and spreads, and the machine's load average before and after.

    .venv/bin/python tools/zero_vs_random.py --out bench_results/zero-vs-random/cpu.json --repeat 11 \
        --prompt-tokens 128 --gen-tokens 32 --threads 1

One thread per server: on a shared machine a descheduled thread stalls every graph node's barrier, which swamps
what is measured here; one thread per server measures the same data-dependent effects without that.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from tuner.bench import BenchConfig, PromptSource, ServerPool, flagset_from_flags, measure_once, ready
from tuner.build import current_build
from tuner.flags import ServerFlags
from tuner.synth import SynthSpec, write_synthetic_gguf

SHAPE = SynthSpec(
    arch="qwen35moe", name="zero-vs-random", n_layer=8, n_embd=1024, n_head=8, n_head_kv=2, head_dim=128,
    n_expert=64, n_expert_used=8, n_ff_exp=512, n_ff_shexp=512, ssm_d_state=64, ssm_n_group=8, ssm_dt_rank=16,
    types={"matrix": "q8_0", "experts": "q4_0", "embd": "f16", "output": "f16"}, seed=7)
VARIANTS = {"random": replace(SHAPE, fill="random"), "zeros": replace(SHAPE, fill="zeros"),
            "routed": replace(SHAPE, fill="zeros", random_roles=frozenset({"embd", "router"}))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--depths", default="0,2048")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="llama-server --threads (0: its default)")
    ns = ap.parse_args()
    depths = tuple(int(d) for d in ns.depths.split(","))
    cfg = BenchConfig(depths=depths, repeat=ns.repeat, prompt_tokens=ns.prompt_tokens, gen_tokens=ns.gen_tokens)
    flags = ServerFlags(ctx_size=4096, parallel=1, flash_attn="on")
    extra = ("--fit", "off", *(("--threads", str(ns.threads)) if ns.threads else ()))
    fs = flagset_from_flags("plan", flags, extra)
    build = current_build(None)
    load_before = os.getloadavg()
    samples: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="zvr-") as tmp:
        paths = {}
        for name, spec in VARIANTS.items():
            (paths[name],) = write_synthetic_gguf(Path(tmp) / f"{name}.gguf", spec)
        pools = {name: ServerPool(build.server_bin, paths[name]) for name in VARIANTS}
        try:
            prompts = PromptSource(seed=cfg.seed)
            lives = {name: ready(pool, prompts, cfg, fs) for name, pool in pools.items()}
            for rep in range(cfg.repeat):
                for di, depth in enumerate(depths):
                    for name, live in lives.items():
                        s = measure_once(live, prompts, cfg, depth=depth, repeat=rep, seq=len(samples),
                                         key=("zvr", di, rep))
                        samples.append({"variant": name, **asdict(s), "loadavg": os.getloadavg()[0]})
                        print(f"{name:7s} depth {depth:5d} #{rep + 1}: pp {s.pp_tok_s:8.1f}  tg {s.tg_tok_s:6.2f}",
                              flush=True)
        finally:
            for pool in pools.values():
                pool.close()
        file_bytes = {n: p.stat().st_size for n, p in paths.items()}
    summary: dict[str, dict[str, object]] = {}
    for name in VARIANTS:
        for depth in depths:
            rows = [s for s in samples if s["variant"] == name and s["depth"] == depth]
            out = {}
            for metric in ("pp_tok_s", "tg_tok_s"):
                vals = sorted(float(r[metric]) for r in rows)
                out[metric] = {"median": statistics.median(vals), "min": vals[0], "max": vals[-1], "n": len(vals)}
            summary[f"{name}@{depth}"] = out
    ratios = {}
    for name in ("zeros", "routed"):
        for depth in depths:
            for metric in ("pp_tok_s", "tg_tok_s"):
                paired = [float(a[metric]) / float(b[metric]) for a in samples for b in samples
                          if a["variant"] == name and b["variant"] == "random" and a["depth"] == b["depth"] == depth
                          and a["repeat"] == b["repeat"]]
                paired.sort()
                ratios[f"{name}/random@{depth}:{metric}"] = {"median": statistics.median(paired), "min": paired[0],
                                                             "max": paired[-1], "n": len(paired)}
    doc = {"what": __doc__.strip().splitlines()[0], "shape": asdict(SHAPE) | {"random_roles": []},
           "file_bytes": file_bytes, "flags": list(fs.args), "config": asdict(cfg),
           "build": {"commit": build.commit, "cuda": build.cuda}, "cpu_count": os.cpu_count(),
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "summary": summary, "ratios_to_random": ratios, "samples": samples}
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(doc, indent=2, default=list) + "\n")
    print(json.dumps(ratios, indent=1))


if __name__ == "__main__":
    main()
