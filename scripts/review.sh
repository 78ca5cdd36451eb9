#!/usr/bin/env bash
# Reviewer report (markdown on stdout): pipeline status, metrics, params and plots of the
# workspace against <base-rev>. CI posts this as the PR comment; run it locally the same way:
#   scripts/review.sh main > review.md
# Plot images go to [plots-dir] (default dvc_plots/), next to DVC's own HTML plots diff.
set -euo pipefail

base="${1:?usage: scripts/review.sh <base-rev> [plots-dir]}"
plots_dir="${2:-dvc_plots}"
cd "$(git rev-parse --show-toplevel)"
if ! git rev-parse --verify -q "${base}^{commit}" >/dev/null; then
  echo "review.sh: unknown git revision '${base}' (fetch it first, e.g. git fetch origin ${base})" >&2
  exit 2
fi
python="${PYTHON:-python}"
export DVC_NO_ANALYTICS=1

section() { printf '\n## %s\n\n' "$1"; }
or_none() { if [ -n "$1" ]; then printf '%s\n' "$1"; else printf '%s\n' "$2"; fi; }

printf '# Pipeline review: workspace vs `%s` (%s)\n' "$base" "$(git rev-parse --short "$base")"

section "Pipeline status"
if ! preflight_error="$("$python" -m triage.preflight 2>&1 >/dev/null)"; then
  printf '**Preflight failed:** %s\n\n' "$preflight_error"
fi
if dvc status -q >/dev/null 2>&1; then
  echo "Up to date: \`dvc status\` is clean (every output matches its inputs)."
else
  echo "**Stale:** some outputs do not match their inputs; results below may be out of date."
  printf '\n```\n%s\n```\n' "$(dvc status 2>&1 | head -40)"
fi
if git diff --quiet HEAD -- dvc.lock 2>/dev/null; then
  echo "The committed \`dvc.lock\` matches the workspace."
else
  echo "**\`dvc.lock\` differs from the commit** (results not committed, or not reproducible):"
  printf '\n```diff\n%s\n```\n' "$(git diff HEAD -- dvc.lock | head -60)"
fi

section "Metrics (\`dvc metrics diff ${base}\`)"
or_none "$(dvc metrics diff "$base" --md --precision 4)" "No metric changed."

section "Params (\`dvc params diff ${base} --deps\`)"
or_none "$(dvc params diff "$base" --md --deps)" "No parameter changed."

section "Plots"
mkdir -p "$plots_dir"
dvc plots diff "$base" --out "$plots_dir" >/dev/null 2>&1 \
  && echo "Interactive: \`${plots_dir}/index.html\` (\`dvc plots diff ${base}\`)." \
  || echo "\`dvc plots diff\` failed; see the PNGs below."
"$python" -m scripts.plot_diff "$base" "$plots_dir"
