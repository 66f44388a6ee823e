"""``runtime cache ls | verify | gc``: look at, check and clean the result store (docs/store.md)."""

from __future__ import annotations

import argparse
import re
import time
from typing import TYPE_CHECKING

from runtime.errors import UsageError

if TYPE_CHECKING:  # the parser is built on every command: the store is imported when used
    from artifacts.store import Entry, Store

DEFAULT_GRACE_MINUTES = 60.0


def add_cache_parser(sub) -> None:
    c = sub.add_parser("cache", help="inspect, check or clean the result cache (docs/store.md)")
    csub = c.add_subparsers(dest="cache_command", metavar="ACTION")

    def cache_arg(p):
        p.add_argument("--cache", metavar="DIR|URI",
                       help="cache folder or URI (default: $RUNTIME_CACHE_DIR or ./.runtime_cache)")

    ls = csub.add_parser("ls", help="entries per stage: count, rows, size, last use, bad entries (cheap check)")
    cache_arg(ls)
    ls.add_argument("--all", action="store_true", help="one line per entry")
    v = csub.add_parser("verify", help="read every entry whole and check its checksum; exit 1 if any is bad")
    cache_arg(v)
    v.add_argument("--remove", action="store_true", help="remove the bad entries found")
    gc = csub.add_parser(
        "gc", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="remove stale temp files, bad entries, and old or excess entries",
        description="Remove temporary files of writers that are gone, entries that fail the cheap check "
        "(or the full one with --verify), superseded copies, then entries chosen by --older-than, --stage and "
        "--max-size. An entry used within the grace period is never removed (runs mark the entries they read as "
        "used), nor a temporary file of a writer still running. Then the index of each stage is compacted.")
    cache_arg(gc)
    gc.add_argument("--older-than", type=float, metavar="DAYS", help="remove entries not used for DAYS days (>= 0)")
    gc.add_argument("--max-size", metavar="SIZE",
                    help="then remove least recently used entries until the cache is under SIZE (e.g. 20G, 500M)")
    gc.add_argument("--stage", metavar="NAME", help="remove every entry of this stage")
    gc.add_argument("--grace", type=float, default=DEFAULT_GRACE_MINUTES, metavar="MINUTES",
                    help=f"never remove what was used or written in the last MINUTES (default {DEFAULT_GRACE_MINUTES:g})")
    gc.add_argument("--verify", action="store_true", help="check every entry whole (reads the whole cache)")
    gc.add_argument("--dry-run", action="store_true", help="only say what would be removed")


def human(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"--max-size: expected a size like 500M or 20G, got '{text}'")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def cache_main(a, store: Store) -> int:
    if a.cache_command is None:
        raise UsageError("runtime cache: choose an action: ls, verify or gc")
    return {"ls": _ls, "verify": _verify, "gc": _gc}[a.cache_command](a, store)


def _ls(a, store: Store) -> int:
    now = time.time()
    entries = list(store.entries())
    problems = {e.rel: store.quick_problem(e) for e in entries}
    print(f"cache: {store.root}")
    if a.all:
        for e in entries:
            meta = (e.indexed or {}).get("meta") or {}
            flag = f"  BAD: {problems[e.rel]}" if problems[e.rel] else ""
            print(f"  {e.stage:<18} {e.key}  node={meta.get('node')} graph={meta.get('graph')} "
                  f"shard={meta.get('shard')} rows={(e.indexed or {}).get('rows')} {human(e.size)}{flag}")
    by_stage: dict[str, list[Entry]] = {}
    for e in entries:
        by_stage.setdefault(e.stage, []).append(e)
    print(f"  {'stage':<18} {'entries':>7} {'rows':>9} {'size':>8} {'last used':>10} {'bad':>5}")
    for stage, es in sorted(by_stage.items()):
        rows = sum(int((e.indexed or {}).get("rows") or 0) for e in es)
        age = (now - max(e.mtime for e in es)) / 86400
        bad = sum(1 for e in es if problems[e.rel])
        print(f"  {stage:<18} {len(es):>7} {rows:>9} {human(sum(e.size for e in es)):>8} {age:>8.1f} d {bad:>5}")
    bad = [e for e in entries if problems[e.rel]]
    unindexed = sum(1 for e in entries if e.indexed is None and e.checksum)
    print(f"  total: {len(entries)} entries, {human(sum(e.size for e in entries))}; {len(bad)} bad; "
          f"{unindexed} not in the index (rows unknown until `cache gc` indexes them); "
          f"{len(store.temp_files())} temporary files")
    for e in bad[:10]:
        print(f"  bad: {store.loc.display(e.rel)}: {problems[e.rel]}")
    if bad:
        print("  `runtime cache gc` removes bad entries (a run also discards them when it meets them)")
    return 0


def _verify(a, store: Store) -> int:
    entries = list(store.entries())
    bad = []
    for e in entries:
        problem = store.verify(e)
        if problem:
            bad.append((e, problem))
            print(f"bad: {store.loc.display(e.rel)}: {problem}")
            if a.remove:
                store.loc.delete(e.rel)
    total = human(sum(e.size for e in entries))
    if not bad:
        print(f"{store.root}: all {len(entries)} entries ({total}) match their checksums")
        return 0
    done = "removed" if a.remove else "found (pass --remove to remove them, or run `runtime cache gc --verify`)"
    print(f"{store.root}: {len(bad)} of {len(entries)} entries are bad; {done}")
    return 0 if a.remove else 1


def _gc(a, store: Store) -> int:
    from stages import STAGES

    if a.older_than is not None and a.older_than < 0:
        raise UsageError(f"--older-than takes a number of days >= 0; got {a.older_than:g}")
    if a.grace < 0:
        raise UsageError(f"--grace takes a number of minutes >= 0; got {a.grace:g}")
    limit = parse_size(a.max_size) if a.max_size else None
    present = store.stages()
    if a.stage and a.stage not in present:
        known = f"; stages in the cache: {', '.join(present)}" if present else "; the cache is empty"
        what = "no entries of stage" if a.stage in STAGES else "no stage"
        raise UsageError(f"--stage {a.stage}: {what} '{a.stage}' in {store.root}{known}")
    now, grace = time.time(), a.grace * 60
    remove: dict[str, tuple[int, str]] = {rel: (0, "temporary file of a writer that is gone")
                                          for rel in store.stale_temp_files(grace, now)}
    groups: dict[tuple[str, str], list[Entry]] = {}
    for e in store.entries():
        problem = store.verify(e) if a.verify else store.quick_problem(e)
        if problem:
            remove[e.rel] = (e.size, f"bad: {problem}")
        else:
            groups.setdefault((e.stage, e.key), []).append(e)
    kept: list[Entry] = []
    for copies in groups.values():
        copies.sort(key=lambda e: e.mtime, reverse=True)
        for older in copies[1:]:  # two files for one key (a rewrite): the newest is read
            if now - older.mtime >= grace:
                remove[older.rel] = (older.size, "superseded copy")
        e = copies[0]
        if now - e.mtime < grace:
            kept.append(e)
        elif a.stage and e.stage == a.stage:
            remove[e.rel] = (e.size, f"stage {a.stage}")
        elif a.older_than is not None and now - e.mtime > a.older_than * 86400:
            remove[e.rel] = (e.size, f"not used for {a.older_than:g} days")
        else:
            kept.append(e)
    if limit is not None:
        total = sum(e.size for e in kept)
        for e in sorted(kept, key=lambda e: e.mtime):
            if total <= limit:
                break
            if now - e.mtime < grace:
                continue
            remove[e.rel] = (e.size, f"over --max-size {a.max_size}")
            total -= e.size
    freed = sum(size for size, _ in remove.values())
    reasons: dict[str, int] = {}
    for _, why in remove.values():
        reasons[why.split(":")[0]] = reasons.get(why.split(":")[0], 0) + 1
    if not a.dry_run:
        for rel in sorted(remove):
            store.loc.delete(rel)
        for stage in store.stages():
            store.compact_index(stage)
    detail = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
    print(f"{'would remove' if a.dry_run else 'removed'} {len(remove)} files, {human(freed)}"
          + (f" ({detail})" if detail else ""))
    return 0
