"""Retention: remove prediction CSVs and rotated audit files older than a number of days.

    python scripts/purge.py [--older-than DAYS] [--predictions DIR] [--dry-run]

Removes ``*.csv`` files under the predictions folder (params ``inference.predictions_dir``,
searched recursively) and the rotated audit files ``<audit>.1 ... .N`` (triage.audit_trail)
whose last change is older than DAYS (default: params ``inference.retention_days``). The
live audit file is never removed. Prints the counts and the names of the files it removed
(never their contents) and appends a ``purge`` line to the audit trail (counts only); when
that line cannot be written nothing is removed and the command exits 1.
"""
import argparse
import time
from pathlib import Path

from triage.audit_trail import AuditError, AuditTrail, rotated_files, user_and_host
from triage.checkout import require_own_checkout
from triage.errors import PipelineError
from triage.io import run_stage
from triage.params import load_params

DAY = 86400


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                    help="age in days (default: params inference.retention_days)")
    ap.add_argument("--predictions", default=None, metavar="DIR",
                    help="folder of prediction CSVs (default: params inference.predictions_dir)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    return ap.parse_args(argv)


def expired(paths, cutoff: float) -> list[Path]:
    """Plain files (not symlinks) last modified before ``cutoff`` (epoch seconds)."""
    out = []
    for p in paths:
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue
        if p.is_file() and not p.is_symlink() and st.st_mtime < cutoff:
            out.append(p)
    return sorted(out)


def main(argv=None) -> None:
    require_own_checkout(__file__)
    args = parse(argv)
    params = load_params(args.params)
    inf = params["inference"]
    days = inf["retention_days"] if args.older_than is None else args.older_than
    if days < 0:
        raise PipelineError(f"--older-than must be >= 0 days, got {days}")
    folder = Path(args.predictions or inf["predictions_dir"]).expanduser()
    if folder.resolve() in (Path("/"), Path.home().resolve()):
        raise PipelineError(f"refusing to purge CSV files under {folder}: point --predictions "
                            f"at the folder of prediction CSVs")
    trail = AuditTrail.from_params(params)
    cutoff = time.time() - days * DAY
    csvs = expired(folder.rglob("*.csv"), cutoff) if folder.is_dir() else []
    audits = expired(rotated_files(trail.path), cutoff)
    verb = "would remove" if args.dry_run else "removed"
    if not args.dry_run:
        try:
            trail.check()  # an unaudited purge removes nothing
        except AuditError as exc:
            raise PipelineError(f"{exc}. A purge is audited: nothing was removed.") from None
        for p in csvs + audits:
            p.unlink(missing_ok=True)
    for p in csvs:
        print(f"{verb} prediction CSV: {p}")
    for p in audits:
        print(f"{verb} rotated audit file: {p}")
    print(f"purge: {verb} {len(csvs)} prediction CSV(s) under {folder} and {len(audits)} rotated "
          f"audit file(s) older than {days:g} days")
    if not args.dry_run:
        try:
            trail.write({"event": "purge", **user_and_host(), "older_than_days": days,
                         "removed_predictions": len(csvs), "removed_audit_files": len(audits)})
        except AuditError as exc:
            raise PipelineError(f"{exc}. The files above were removed but the purge is not "
                                f"audited.") from None


if __name__ == "__main__":
    run_stage(main)
