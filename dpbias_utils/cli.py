"""`dpbias`: validate a profile, run its stage graph, print its plan, audit its DP training."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import paths
from .params import ParamsError, load_profile

EXIT_BAD_PARAMS = 2
EXIT_INTERRUPTED = 130  # the shell's convention for SIGINT
INTERRUPTED = "interrupted; run the same command again to resume"


def _load(path: str):
    try:
        return load_profile(path)
    except ParamsError as exc:
        for line in exc.messages:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(EXIT_BAD_PARAMS)


def main(argv: list[str] | None = None) -> int:
    """The `dpbias` command; Ctrl-C anywhere ends it with one line and status 130."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="dpbias", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_val = sub.add_parser("validate", help="validate a profile and exit (2 if invalid); writes nothing")
    p_val.add_argument("params", nargs="?", default=str(paths.DEFAULT_PARAMS))
    p_run = sub.add_parser("run", help="run (or resume) the profile's stage graph")
    p_run.add_argument("params", nargs="?", default=str(paths.DEFAULT_PARAMS))
    p_run.add_argument("--jobs", type=int, default=1, help="independent nodes run in parallel")
    p_run.add_argument("--only", choices=["01", "02", "03", "04", "05"], help="run only this stage's nodes")
    p_run.add_argument("--dry-run", action="store_true", help="print the plan (and cost estimate) and exit")
    p_run.add_argument("--executor", choices=["local", "slurm"], default="local")
    p_run.add_argument("--runs-dir", type=Path, default=None,
                       help="output root, also of the caches unless DPBIAS_CACHE is set (default $DPBIAS_RUNS, else runs/)")
    p_run.add_argument("--rerun-stale", action="store_true",
                       help="redo complete nodes computed by other code (another source hash), and their downstream")
    p_run.add_argument("--notebooks", type=Path, default=None, help="stage notebooks folder (development/tests)")
    p_pre = sub.add_parser("prefetch", help="download every hub asset of the profile into the standard caches, "
                                              "check each loads offline, print what went where (1 if any fails)")
    p_pre.add_argument("params", nargs="?", default=str(paths.DEFAULT_PARAMS))
    p_fl = sub.add_parser("preflight", help="on the machine that will run the profile: assets load offline, a few "
                                            "steps of every way of training it uses on its device, tokens/s and peak "
                                            "memory appended to benchmarks/throughput.csv (the dry run's estimate)")
    p_fl.add_argument("params", nargs="?", default=str(paths.DEFAULT_PARAMS))
    p_fl.add_argument("--steps", type=int, default=3, help="timed optimizer steps per way of training (default 3)")
    p_fl.add_argument("--throughput-csv", type=Path, default=None,
                      help="where the measurements are appended (default benchmarks/throughput.csv)")
    p_fl.add_argument("--no-append", action="store_true", help="measure without appending")
    p_aud = sub.add_parser("audit", help="one-run empirical privacy audit of the profile's DP training "
                                         "(Steinke, Nasr and Jagielski 2023): eps_lower per epsilon (white-box: every "
                                         "step's noisy clipped sum observed; black-box: the final model)")
    p_aud.add_argument("--mode", choices=["white-box", "black-box"], default="white-box",
                       help="white-box (default): canaries through the real steppers, each step's release observed "
                            "(audit_whitebox.csv); black-box: canary sentences, the final model only (audit.csv)")
    p_aud.add_argument("--fault", nargs="+", default=["none"],
                       help="white-box: broken mechanisms to inject (none, noise-off, sigma/10, no-clipping, "
                            "accountant-q/50); each is audited at every epsilon")
    p_aud.add_argument("--method", default=None,
                       help="white-box: the private method audited (dp-adam, dp-sgd, global, global-adapt; "
                            "default dp-adam)")
    p_aud.add_argument("params", nargs="?", default=str(paths.DEFAULT_PARAMS))
    p_aud.add_argument("--epsilon", type=float, nargs="+", default=None,
                       help="target epsilons to audit (default: the DP epsilons of the profile's grid)")
    p_aud.add_argument("--canaries", type=int, default=1000, help="m, the number of canaries (default 1000)")
    p_aud.add_argument("--k-pos", type=int, default=None,
                       help="k+ guesses 'in' (default m // 5 white-box, m // 10 black-box)")
    p_aud.add_argument("--k-neg", type=int, default=None, help="k- guesses 'out' (default 0 white-box, m // 10 black-box)")
    p_aud.add_argument("--seed", type=int, default=0, help="seed of the training units, canaries and run")
    p_aud.add_argument("--out", type=Path, default=None, help="output folder (default <runs>/<profile>/audit)")
    p_aud.add_argument("--runs-dir", type=Path, default=None, help="output root (as for `run`)")
    args = parser.parse_args(argv)

    profile = _load(args.params)
    if args.command == "audit":
        return _audit(profile, args)
    if args.command == "prefetch":
        from .assets import prefetch

        rows = prefetch(profile)
        failed = [r for r in rows if not r["check"].startswith("ok")]
        print(f"prefetch: {len(rows) - len(failed)} of {len(rows)} assets ready"
              + ("; the profile now runs with HF_HUB_OFFLINE=1" if not failed else f"; {len(failed)} FAILED"))
        return 1 if failed else 0
    if args.command == "preflight":
        return _preflight(profile, args)
    if args.command == "validate":
        print(f"{args.params}: valid profile '{profile.name}' with {len(profile.points())} training conditions")
        return 0

    if args.jobs < 1:
        print(f"error: --jobs = {args.jobs}: must be >= 1", file=sys.stderr)
        return EXIT_BAD_PARAMS
    from .pipeline.node import engine

    try:
        engine()
    except ValueError as exc:
        print(f"error: {exc}; nothing was run", file=sys.stderr)
        return EXIT_BAD_PARAMS
    if args.dry_run:
        from . import cost
        from .pipeline.run import describe_plan

        print(describe_plan(profile, args.runs_dir, args.notebooks))
        print(cost.describe_cost(profile))
        return 0
    from .assets import OFFLINE_VARS, needs_hub

    if not needs_hub(profile):  # nothing to download: the Hugging Face libraries never reach for the network
        for var in OFFLINE_VARS:
            os.environ.setdefault(var, "1")
    if args.executor == "local" and profile.train.device == "cuda":  # Slurm nodes check on their GPU node
        from .basemodel import cuda_problem

        problem = cuda_problem()
        if problem:
            print(f"error: {args.params}: field 'train.device' = 'cuda': {problem}; nothing was run", file=sys.stderr)
            return EXIT_BAD_PARAMS
    try:
        result = run(profile, jobs=args.jobs, only=args.only, runs_dir=args.runs_dir, notebooks=args.notebooks,
                     executor=args.executor, rerun_stale=args.rerun_stale)
    except paths.RunsDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_PARAMS
    except OSError as exc:
        err = paths.unwritable_error(exc, paths.profile_dir(profile.name, args.runs_dir))
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_PARAMS
    _summary(result, paths.profile_dir(profile.name, args.runs_dir))
    return 0 if result.ok else 1


def _preflight(profile, args) -> int:
    """`dpbias preflight`: 2 when the profile's device is missing (before any work), 1 when an asset fails."""
    from . import cost
    from .basemodel import ModelError, resolve_device
    from .preflight import preflight

    try:
        resolve_device(profile.train.device)
    except ModelError as exc:
        print(f"error: {args.params}: field 'train.device': {exc}", file=sys.stderr)
        return EXIT_BAD_PARAMS
    target = None if args.no_append else (args.throughput_csv or cost.THROUGHPUT_CSV)
    result = preflight(profile, steps=args.steps, throughput_csv=target)
    return 0 if result["ok"] else 1


def _audit(profile, args) -> int:
    """`dpbias audit`: bad arguments give one line and status 2 before any model is built or trained;
    status 1 when a bound exceeds its epsilon (the implementation is broken)."""
    from .training.audit import audit_profile, check_audit_arguments
    from .training.batching import TrainingError
    from .training.privacy import PrivacyError

    out = args.out or paths.profile_dir(profile.name, args.runs_dir) / "audit"
    try:
        if args.mode == "white-box":
            return _audit_whitebox(profile, args, out)
        epsilons = check_audit_arguments(profile, args.epsilon, args.canaries, args.k_pos, args.k_neg)
    except (TrainingError, PrivacyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_PARAMS
    rows = audit_profile(profile, out, epsilons=epsilons, m=args.canaries, k_pos=args.k_pos, k_neg=args.k_neg,
                         seed=args.seed, runs_dir=args.runs_dir)
    for r in rows:
        verdict = "ok" if r["eps_lower"] <= r["epsilon"] else "BROKEN: eps_lower > epsilon"
        print(f"epsilon {r['epsilon']:g}: {r['correct']}/{r['k_pos'] + r['k_neg']} correct guesses on m={r['m']} "
              f"canaries, eps_lower {r['eps_lower']:.3f} at delta {r['delta']:.3g} ({verdict})")
    print(f"audit: {out / 'audit.csv'}")
    return 0 if all(r["eps_lower"] <= r["epsilon"] for r in rows) else 1


def _audit_whitebox(profile, args, out: Path) -> int:
    """`dpbias audit --mode white-box`: arguments checked before any work (TrainingError / PrivacyError
    reach `_audit`, status 2); status 1 when the correct mechanism's bound exceeds its epsilon."""
    from .training.audit import check_audit_arguments
    from .training.audit_whitebox import audit_profile_whitebox, check_fault, default_k_whitebox
    from .training.loop import resolve_method
    from .training.privacy import PrivacyError

    k_pos, k_neg = default_k_whitebox(args.canaries) if args.canaries >= 2 else (1, 0)
    k_pos = k_pos if args.k_pos is None else args.k_pos
    k_neg = k_neg if args.k_neg is None else args.k_neg
    epsilons = check_audit_arguments(profile, args.epsilon, args.canaries, k_pos, k_neg)
    for f in args.fault:
        check_fault(f)
    if args.method is not None and not resolve_method(1.0, args.method).private:
        raise PrivacyError(f"--method {args.method}: not a private method; allowed: dp-adam, dp-sgd, global, "
                           "global-adapt")

    def report(r):
        verdict = ("ok" if r["eps_lower"] <= r["epsilon"] else "eps_lower > epsilon: "
                   + ("BROKEN" if r["fault"] == "none" else "fault caught"))
        print(f"{r['method']} {r['fault']} epsilon {r['epsilon']:g}: {r['correct']}/{r['k_pos'] + r['k_neg']} correct "
              f"on m={r['m']} canaries ({r['n_sampled_included']} of {r['n_included']} included ever sampled), "
              f"eps_lower {r['eps_lower']:.3f} at delta {r['delta']:.3g}, accountant epsilon {r['epsilon_spent']:.3f} "
              f"({verdict})", flush=True)

    rows = audit_profile_whitebox(profile, out, epsilons=epsilons, m=args.canaries, k_pos=k_pos, k_neg=k_neg,
                                  seed=args.seed, faults=args.fault, method=args.method, runs_dir=args.runs_dir,
                                  on_row=report)
    print(f"audit: {out / 'audit_whitebox.csv'}")
    return 0 if all(r["eps_lower"] <= r["epsilon"] for r in rows if r["fault"] == "none") else 1


def run(profile, **options):
    """Run the profile's stage graph (`pipeline.run.run`, same options) with the two calls into the
    science: the built-in base model built before the local pool, the index page written after."""
    from .pipeline import run as pipeline_run
    from .results.report import write_index
    from .stages.s01_data import prebuild_base

    return pipeline_run.run(profile, prepare=prebuild_base, write_index=write_index, **options)


def _summary(result, profile_dir: Path) -> None:
    print(f"{len(result.completed)} nodes run, {len(result.skipped)} already complete, "
          f"{len(result.elsewhere)} computed by another process, {len(result.failed)} failed, "
          f"{len(result.blocked)} blocked")
    if result.stale_message():
        print(result.stale_message())
    for n in result.failed:
        print(f"FAILED {n.stage}/{n.node_id}: see {n.folder(profile_dir) / 'notebook.ipynb'} and runner.log", file=sys.stderr)
    for n in result.blocked:
        print(f"BLOCKED {n.stage}/{n.node_id}: an upstream node failed or is missing", file=sys.stderr)
    print(f"report: {profile_dir / 'index.html'}")


if __name__ == "__main__":
    sys.exit(main())
