"""The iptables render alone: full render time, incremental one-Service re-render, sizes.

    python bench/render.py [--counts 1000 5000 10000] [--baseline REV] [--repeat 3]
                           [--apply legacy nft]

The Python that turns N Services (2 endpoints each, bench/services.py's synthetic set)
into the iptables-restore payload; no root needed unless --apply.

* ``before``: ``render()`` of the modules as they were at git revision ``--baseline``
  (loaded from git beside the current ones: the plain render before it was made
  faster). ``full``: the current ``render()``, cold (its memo caches emptied first);
  ``warm``: again with the caches of the previous call (a full resync). Before and
  after run in turns, best of --repeat, and their outputs are checked byte for byte.
* ``plain partial``: ``render(..., changed={one Service})`` after that Service's
  endpoints changed (what bench/services.py times as the partial render).
* ``incr own fp`` / ``incr given fp``: the same partial sync through
  ``IncrementalRenderer``, fingerprinting every Service itself, or handed the
  fingerprints (the caller refreshes the changed Service's one), median of --changes;
  each output is checked against ``render()``.
* sizes: lines and MB of the full payload and of the partial one.
* ``--apply FLAVOUR...`` (root): the end-to-end one-Service change with
  ``IncrementalRenderer`` (given fingerprints): render plus ``iptables-restore`` of the
  partial payload into a namespace holding the N Services, and the restore alone.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import os
import secrets
import statistics
import subprocess
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from services import SETTINGS, restore, synthetic  # noqa: E402

from kproxy.proxy import netutil  # noqa: E402
from kproxy.proxy.types import service_fingerprints  # noqa: E402

r = importlib.import_module("kproxy.proxy.iptables.render")   # the module (the package exports render())

# The last commit before the render was sped up: the "before" figures.
DEFAULT_BASELINE = "629b317"
_BASELINE_FILES = ("netutil", "types", "endpoints", "render")
_PATHS = {"netutil": "kproxy/proxy/netutil.py", "types": "kproxy/proxy/types.py",
          "endpoints": "kproxy/proxy/endpoints.py", "render": "kproxy/proxy/iptables/render.py"}
KEY = "bench/svc-0"


def load_baseline(rev: str) -> types.ModuleType:
    """kproxy's render, types, endpoints and netutil modules as they were at ``rev``
    (read with ``git show``), imported under the package ``_kproxy_baseline`` so they
    run beside the current ones. Returns the render module."""
    pkg = types.ModuleType("_kproxy_baseline")
    pkg.__path__ = []
    sys.modules[pkg.__name__] = pkg
    mod = None
    for key in _BASELINE_FILES:
        src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:{_PATHS[key]}"], check=True,
                             capture_output=True, text=True).stdout
        for other in _BASELINE_FILES:
            src = src.replace(f"from kproxy.proxy.{other} import", f"from _kproxy_baseline.{other} import")
        mod = types.ModuleType(f"_kproxy_baseline.{key}")
        mod.__file__ = f"<{rev}:{_PATHS[key]}>"
        sys.modules[mod.__name__] = mod
        setattr(pkg, key, mod)
        exec(compile(src, mod.__file__, "exec"), mod.__dict__)
    return mod


def clear_caches() -> None:
    """Empty every memo the current render keeps between calls (for cold timings)."""
    r.clear_caches()
    netutil.clear_caches()


def timed(fn, cold=None) -> float:
    if cold is not None:
        cold()
    gc.collect()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def changes(slices, count: int):
    """``count`` successive changes of the first Service's endpoints: (slices, the
    changed slice) each time."""
    slices = list(slices)
    for i in range(count):
        _, changed = synthetic(1, generation=100 + i % 50)
        slices[0] = changed[0]
        yield slices, changed[0]


def incremental(services, slices, count: int, given: bool, check: bool = True, after=None):
    """Median seconds of ``count`` one-Service partial syncs through an
    IncrementalRenderer (``after(payload)`` timed with each), and the last payload."""
    renderer = r.IncrementalRenderer(SETTINGS)
    prints = service_fingerprints(services, slices) if given else None
    renderer.render(services, slices, fingerprints=prints)           # the first, full sync
    times, payload = [], ""
    for i, (now, changed_slice) in enumerate(changes(slices, count)):
        if given:        # the caller's own bookkeeping: the changed Service's fingerprint
            prints = dict(prints)
            prints[KEY] = service_fingerprints(services[:1], [changed_slice])[KEY]
        gc.collect()
        t = time.perf_counter()
        payload = renderer.render(services, now, changed={KEY}, fingerprints=prints)
        if after is not None:
            after(payload)
        times.append(time.perf_counter() - t)
        if check and i == 0:
            assert payload == r.render(services, now, SETTINGS, changed={KEY}), "incremental != render()"
    return statistics.median(times), payload


def render_figures(args, base) -> None:
    print("# iptables render of N Services with 2 endpoints each (bench/services.py's synthetic set)")
    print(f"# before = plain render() at {args.baseline or '-'}; full = render() now, cold; warm = with its "
          "memo caches; partial = one Service's endpoints changed, changed={it} (median ms)")
    print(f"{'services':>8} {'lines':>7} {'MB':>5} {'before s':>8} {'full s':>7} {'speedup':>7} {'warm s':>7} "
          f"{'plain partial ms':>16} {'incr own fp ms':>14} {'incr given fp ms':>16} {'partial lines':>13} "
          f"{'partial MB':>10}")
    for n in args.counts:
        services, slices = synthetic(n)
        text = r.render(services, slices, SETTINGS)
        base_settings = base.NodeSettings(**_settings_kwargs()) if base is not None else None
        if base is not None:
            assert base.render(services, slices, base_settings) == text, "the render differs from the baseline's"
        # before and after in turns, so that a busy machine slows both alike
        t_full = t_before = t_warm = float("inf")
        for _ in range(args.repeat):
            t_full = min(t_full, timed(lambda: r.render(services, slices, SETTINGS), clear_caches))
            t_warm = min(t_warm, timed(lambda: r.render(services, slices, SETTINGS)))
            if base is not None:
                t_before = min(t_before, timed(lambda: base.render(services, slices, base_settings)))
        if base is None:
            t_before = float("nan")
        plain = []
        for now, _ in changes(slices, max(3, args.repeat)):
            plain.append(timed(lambda: r.render(services, now, SETTINGS, changed={KEY})))
        own, _ = incremental(services, slices, args.changes, given=False)
        given, partial = incremental(services, slices, args.changes, given=True)
        print(f"{n:>8} {text.count(chr(10)):>7} {len(text) / 1e6:>5.2f} {t_before:>8.3f} {t_full:>7.3f} "
              f"{t_before / t_full:>6.1f}x {t_warm:>7.3f} {statistics.median(plain) * 1000:>16.1f} "
              f"{own * 1000:>14.1f} {given * 1000:>16.1f} {partial.count(chr(10)):>13} {len(partial) / 1e6:>10.2f}")


def apply_figures(args) -> None:
    from cni import netns

    print("# end to end, one Service's endpoints changed: IncrementalRenderer (given fingerprints) + "
          "iptables-restore of the partial payload into a namespace holding the N Services (median ms)")
    print(f"{'flavour':>7} {'services':>8} {'render+restore ms':>17} {'restore ms':>10} {'empty nat restore ms':>20}")
    for flavour in args.apply:
        for n in args.counts:
            services, slices = synthetic(n)
            ns = f"kpr{secrets.token_hex(3)}"
            netns.create(ns)
            try:
                restore(ns, r.render(services, slices, SETTINGS), flavour)
                restores = []
                total, payload = incremental(services, slices, args.changes, given=True, check=False,
                                             after=lambda p: restores.append(restore(ns, p, flavour)))
                empty = statistics.median(restore(ns, "*nat\nCOMMIT\n", flavour) for _ in range(3))
                print(f"{flavour:>7} {n:>8} {total * 1000:>17.1f} {statistics.median(restores) * 1000:>10.1f} "
                      f"{empty * 1000:>20.1f}")
            finally:
                netns.delete(ns)


def _settings_kwargs() -> dict:
    return {f: getattr(SETTINGS, f) for f in SETTINGS.__dataclass_fields__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[1000, 5000, 10000])
    ap.add_argument("--baseline", default=DEFAULT_BASELINE,
                    help="git revision of the plain render to time as 'before' ('' to skip)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per full-render figure (the best is printed)")
    ap.add_argument("--changes", type=int, default=20, help="one-Service changes timed per N (the median)")
    ap.add_argument("--apply", nargs="*", default=[], choices=["legacy", "nft"],
                    help="also time render + iptables-restore end to end with these flavours (root)")
    ap.add_argument("--no-render", action="store_true", help="only the --apply figures")
    args = ap.parse_args()
    if not args.no_render:
        render_figures(args, load_baseline(args.baseline) if args.baseline else None)
    if args.apply:
        if os.geteuid() != 0:
            sys.exit("--apply needs root")
        apply_figures(args)


if __name__ == "__main__":
    main()
