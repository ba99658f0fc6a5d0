#!/usr/bin/env python
"""The annotation driver at collection scale: memory and planning time over a huge listing.

    python bench/driver_scale.py                      # 1,000,000 listed entries
    python bench/driver_scale.py --entries 10000000   # 10 million (a few minutes)

Nothing is annotated: a generated ``--input-list`` (a text file of relative paths, with a root
that exists) goes through the driver's real code (``annotate.stream_inputs``, the sink's listing
of the output, ``plan.plan_shards`` writing one plan file per shard), each phase in a fresh
subprocess so its peak RSS is its own. Phases:

- ``plan``: a first run over an empty output: stream, fingerprint, write every plan file.
- ``resume``: the same run once every shard is done (a shard file and a stats file per shard, as a
  finished job leaves them): one listing of the output plus the stats reads, and no shard footer.
- ``noop``: the whole rerun, ``annotate.run`` end to end, on that complete manifest (with the duplicates
  table a finished job leaves): it must decide "nothing to do" without starting Ray or redoing the
  duplicates pass, and write the summary. Its time is what a user waits for.
- ``baseline``: the old driver's shape in the same run: the whole listing materialised as
  ``InputItem``s plus one dict spec (lists of ids/sources/sidecars/captions) per shard.

Targets (issues 11, 19): driver peak RSS flat in the collection size and under 512 MB at 1M and 10M
entries; resume planning, and a whole no-op rerun, under 10 s at 1M with no shard footer read and no Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RSS_TARGET_MB = 512
RESUME_TARGET_S = 10.0


def make_listing(path: Path, entries: int) -> None:
    """A text list of ``entries`` relative paths spread over folders, as an S3 inventory would be."""
    with open(path, "w") as f:
        for i in range(entries):
            f.write(f"shoot-{i // 10_000:05d}/IMG_{i:08d}.jpg\n")


def phase(name: str, listing: str, root: str, output: str, shard_size: int) -> dict:
    """Run one phase in this process (called in a subprocess) and return its figures."""
    from manifests import io as mio
    from pipeline import annotate
    from pipeline.config import AnnotateConfig
    from pipeline.plan import plan_shards, run_plan_dir
    from pipeline.reader import ListingStats, iter_input_list

    footer_reads = []
    real_provenance = mio.shard_provenance
    mio.shard_provenance = lambda p, fs=None: footer_reads.append(p) or real_provenance(p, fs)
    import manifests.sink as sink_module
    sink_module.shard_provenance = mio.shard_provenance
    # Every phase builds the job first (imports annotators, pyarrow, ...), so "imports" is the same
    # floor for all and what is above it is the listing's cost.
    config = AnnotateConfig(input=root, input_list=listing, output=output, shard_size=shard_size)
    job = annotate.make_job(config)
    import pyarrow.parquet  # noqa: F401  (plan files)
    rss_before = _peak_rss_mb()
    start = time.perf_counter()
    ray_started = False
    if name == "noop":
        summary = annotate.run(config)
        ray = sys.modules.get("ray")
        ray_started = ray is not None and ray.is_initialized()
        shards, todo, kept = len(summary["shards"]), summary["run"]["shards_written"], summary["run"]["shards_kept"]
        rows = summary["counts"]["rows"]
        plan_s = summary["run"]["plan_s"]
    elif name == "baseline":
        items = list(iter_input_list(listing, root, ListingStats()))
        specs = [{"shard": k, "ids": [i.id for i in items[s:s + shard_size]],
                  "sources": [i.source for i in items[s:s + shard_size]],
                  "sidecars": [i.sidecar for i in items[s:s + shard_size]],
                  "captions": [i.caption for i in items[s:s + shard_size]]}
                 for k, s in enumerate(range(0, len(items), shard_size))]
        shards, todo, kept, rows = len(specs), len(specs), 0, len(items)
    else:
        settings_fp = job.sink.provenance["settings_fingerprint"]
        existing = job.sink.existing(also_ours=annotate.DRIVER_FILES)
        annotate.check_output(config, existing, settings_fp)
        plan = plan_shards(annotate.stream_inputs(config, ListingStats()), shard_size, settings_fp,
                           existing.done, run_plan_dir(output))
        annotate.check_no_rows_dropped(config, existing, plan)
        shards, todo, kept, rows = plan.shards, len(plan.todo), len(plan.kept), plan.rows
        if name == "plan":  # leave the output as a finished job would: a shard and a stats file each
            from manifests.sink import ShardStats
            from manifests.schema import shard_name
            fs, base = mio.resolve(output)
            stats = {}
            for spec in plan.todo:
                open(os.path.join(base, shard_name(spec.index)), "wb").close()
                stats[spec.index] = ShardStats(spec.index, spec.fingerprint, spec.rows, {"ok": spec.rows}, {})
                job.sink._write_stats(fs, base, stats[spec.index])
            write_duplicates_table(output, annotate.shards_digest(stats), config.near_duplicate_distance)
    seconds = time.perf_counter() - start
    return {"phase": name, "entries": rows, "shards": shards, "todo": todo, "kept": kept,
            "seconds": round(seconds, 2), "peak_rss_mb": round(_peak_rss_mb(), 1),
            "rss_after_imports_mb": round(rss_before, 1), "footer_reads": len(footer_reads),
            "ray_started": ray_started, **({"plan_s": plan_s} if name == "noop" else {})}


def write_duplicates_table(output: str, computed_from: str, max_distance: int) -> None:
    """The duplicates table a finished job leaves (none found), made from these shards' stats."""
    import pyarrow.parquet as pq

    from manifests import duplicates

    meta = {"exact": 0, "near": 0, "max_distance": max_distance, "computed_from": computed_from}
    os.makedirs(os.path.join(output, duplicates.DUPLICATES_DIR), exist_ok=True)
    pq.write_table(duplicates.SCHEMA.empty_table().replace_schema_metadata(
        {duplicates.METADATA_KEY: json.dumps(meta)}), os.path.join(output, duplicates.DUPLICATES_FILE))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_phase(name: str, listing: Path, root: Path, output: Path, shard_size: int) -> dict:
    """One phase in a fresh interpreter, so each peak RSS is that phase's alone."""
    out = subprocess.run([sys.executable, __file__, "--phase", name, "--listing", str(listing), "--root", str(root),
                          "--output", str(output), "--shard-size", str(shard_size)],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"phase {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, nargs="+", default=[1_000_000], help="listing sizes to measure")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--skip-baseline", action="store_true", help="leave out the materialised baseline")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--listing", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args.listing, args.root, args.output, args.shard_size)))
        return 0
    results = []
    for entries in args.entries:
        with tempfile.TemporaryDirectory(prefix="driver-scale-") as tmp:
            tmp_path = Path(tmp)
            listing, root, output = tmp_path / "list.txt", tmp_path / "root", tmp_path / "manifest"
            root.mkdir()
            start = time.perf_counter()
            make_listing(listing, entries)
            print(f"\n{entries:,} entries: listing written in {time.perf_counter() - start:.1f} s "
                  f"({listing.stat().st_size / 1e6:.0f} MB)")
            phases = ["plan", "resume", "noop"] + ([] if args.skip_baseline else ["baseline"])
            for name in phases:
                result = run_phase(name, listing, root, output, args.shard_size)
                results.append(result)
                print(f"  {name:9s} {result['seconds']:7.2f} s  peak RSS {result['peak_rss_mb']:7.1f} MB "
                      f"(imports {result['rss_after_imports_mb']:.0f} MB)  shards {result['shards']:,} "
                      f"(todo {result['todo']:,}, kept {result['kept']:,})  footer reads {result['footer_reads']}"
                      + (f"  listing and planning {result['plan_s']:.2f} s, Ray started: {result['ray_started']}"
                         if name == "noop" else ""))
            by = {r["phase"]: r for r in results if r["entries"] == entries}
            if "baseline" in by:
                base, plan = by["baseline"], by["plan"]
                grow = lambda r: r["peak_rss_mb"] - r["rss_after_imports_mb"]  # noqa: E731
                print(f"  memory above imports: streamed plan {grow(plan):.0f} MB, materialised "
                      f"{grow(base):.0f} MB ({grow(base) / max(grow(plan), 1):.1f}x the streamed); "
                      f"{1e6 * grow(plan) / entries / 1e3:.2f} KB vs {1e6 * grow(base) / entries / 1e3:.2f} KB per entry")
    print("\ntargets:")
    ok = True
    for r in results:
        if r["phase"] == "baseline":
            continue
        rss_ok = r["peak_rss_mb"] < RSS_TARGET_MB
        line = f"  {r['phase']:7s} at {r['entries']:,}: peak RSS {r['peak_rss_mb']:.0f} MB < {RSS_TARGET_MB} MB " \
               f"{'met' if rss_ok else 'NOT met'}"
        ok &= rss_ok
        if r["phase"] in ("resume", "noop"):
            fast = r["seconds"] < RESUME_TARGET_S or r["entries"] > 1_000_000
            line += (f"; {r['phase']} {r['seconds']:.1f} s"
                     + (f" < {RESUME_TARGET_S:.0f} s {'met' if fast else 'NOT met'}" if r["entries"] <= 1_000_000 else "")
                     + (f" ({r['seconds'] * 1_000_000 / r['entries']:.1f} s per million)"
                        if r["entries"] != 1_000_000 else "")
                     + f"; footer reads {r['footer_reads']} ({'met' if r['footer_reads'] == 0 else 'NOT met'})")
            ok &= fast and r["footer_reads"] == 0 and r["todo"] == 0
            if r["phase"] == "noop":
                line += f"; Ray started: {r['ray_started']} ({'NOT met' if r['ray_started'] else 'met'})"
                ok &= not r["ray_started"]
        print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
