"""Stage `summary`: the decision numbers of a run in metrics/summary.json (triage/summary.py)."""
from triage.io import run_stage, write_json
from triage.params import load_params
from triage.summary import OUT, read_metrics, summarise


def main() -> None:
    params = load_params()
    summary = summarise(read_metrics(), params["evaluate"]["target_sensitivity"])
    write_json(summary, OUT)
    print(f"summary: {len(summary)} headline values -> {OUT} "
          f"(`python -m triage.summary` prints them)")


if __name__ == "__main__":
    run_stage(main)
