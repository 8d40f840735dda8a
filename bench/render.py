"""The iptables render alone: full render time, incremental one-Service re-render, sizes.

    python bench/render.py [--counts 1000 5000 10000] [--baseline REV] [--repeat 3]

No root, no kernel: this times only the Python that turns Services and EndpointSlices
(N Services, 2 endpoints each, as bench/services.py makes them) into the
iptables-restore payload.

* ``full``: ``render()`` of N Services from the model objects (service port map,
  endpoints map, every rule), cold: its caches emptied first. ``before`` is the same
  call on the modules as they were at git revision ``--baseline`` (loaded from git, the
  plain pre-optimisation path); both outputs are checked to be byte-identical.
* ``incr``: ``IncrementalRenderer`` at N Services after one Service's endpoints change,
  a partial sync (``changed={that Service}``) as the proxier does it; ``own fp`` with
  the renderer's own fingerprints of every Service, ``given fp`` with fingerprints the
  caller already has (the proxier computes them anyway). Each output is checked
  against ``render(..., changed=...)``.
* sizes: lines and bytes of the full payload and of the partial one.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from services import SETTINGS, synthetic  # noqa: E402

import importlib  # noqa: E402

from kproxy.proxy import netutil  # noqa: E402

r = importlib.import_module("kproxy.proxy.iptables.render")   # the module (the package exports render())

# The last commit before the render was sped up: the "before" figures.
DEFAULT_BASELINE = "629b317"
_BASELINE_FILES = ("netutil", "types", "endpoints", "render")
_PATHS = {"netutil": "kproxy/proxy/netutil.py", "types": "kproxy/proxy/types.py",
          "endpoints": "kproxy/proxy/endpoints.py", "render": "kproxy/proxy/iptables/render.py"}


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
    for fn in (getattr(r, "clear_caches", None), getattr(netutil, "clear_caches", None)):
        if fn is not None:
            fn()


def timed(fn, repeat: int, cold=None) -> float:
    """Best of ``repeat`` (after ``cold()`` before each run, when given)."""
    best = float("inf")
    for _ in range(repeat):
        if cold is not None:
            cold()
        gc.collect()
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[1000, 5000, 10000])
    ap.add_argument("--baseline", default=DEFAULT_BASELINE,
                    help="git revision of the plain render to time as 'before' ('' to skip)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (the best is printed)")
    ap.add_argument("--changes", type=int, default=20, help="one-Service changes timed per N")
    args = ap.parse_args()

    base = load_baseline(args.baseline) if args.baseline else None
    print("# iptables render of N Services with 2 endpoints each (bench/services.py's synthetic set)")
    print("# full: cold render() from model objects; before = plain render at "
          f"{args.baseline or '-'}; incr: one Service's endpoints change, partial sync, "
          "IncrementalRenderer (median)")
    print(f"{'services':>8} {'lines':>7} {'MB':>6} {'before s':>9} {'full s':>7} {'speedup':>7} "
          f"{'incr own fp ms':>14} {'incr given fp ms':>16} {'partial lines':>13} {'partial MB':>10}")
    for n in args.counts:
        services, slices = synthetic(n)
        text = r.render(services, slices, SETTINGS)
        base_settings = base.NodeSettings(**_settings_kwargs()) if base is not None else None
        if base is not None:
            assert base.render(services, slices, base_settings) == text, "the render differs from the baseline's"
        # before and after in turns, so that a busy machine slows both alike
        t_full = t_before = float("inf")
        for _ in range(args.repeat):
            t_full = min(t_full, timed(lambda: r.render(services, slices, SETTINGS), 1, clear_caches))
            if base is not None:
                t_before = min(t_before, timed(lambda: base.render(services, slices, base_settings), 1))
        if base is None:
            t_before = float("nan")
        own, given, partial = incremental_figures(services, slices, args.changes)
        print(f"{n:>8} {text.count(chr(10)):>7} {len(text) / 1e6:>6.2f} {t_before:>9.3f} {t_full:>7.3f} "
              f"{t_before / t_full:>6.1f}x {own * 1000:>14.1f} {given * 1000:>16.1f} "
              f"{partial.count(chr(10)):>13} {len(partial) / 1e6:>10.2f}")


def _settings_kwargs() -> dict:
    return {f: getattr(SETTINGS, f) for f in SETTINGS.__dataclass_fields__}


def incremental_figures(services, slices, changes: int):
    """(median s with own fingerprints, median s with given ones, one partial payload)."""
    from kproxy.proxy.types import service_fingerprints

    results = []
    for given in (False, True):
        slices_now = list(slices)
        renderer = r.IncrementalRenderer(SETTINGS)
        prints = service_fingerprints(services, slices_now) if given else None
        renderer.render(services, slices_now, fingerprints=prints)        # the first, full sync
        times = []
        partial = ""
        for gen in range(changes):
            _, changed_slices = synthetic(1, generation=100 + gen % 50)
            slices_now[0] = changed_slices[0]
            key = "bench/svc-0"
            if given:     # the caller's own bookkeeping: it refreshes the changed Service's print
                prints = dict(prints)
                prints[key] = service_fingerprints([services[0]], [slices_now[0]])[key]
            gc.collect()
            t = time.perf_counter()
            partial = renderer.render(services, slices_now, changed={key}, fingerprints=prints)
            times.append(time.perf_counter() - t)
            if gen == 0:
                assert partial == r.render(services, slices_now, SETTINGS, changed={key}), "incremental != render"
        results.append(statistics.median(times))
    return results[0], results[1], partial


if __name__ == "__main__":
    main()
