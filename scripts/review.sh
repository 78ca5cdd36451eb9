#!/usr/bin/env bash
# Reviewer report (markdown on stdout) of the workspace against <base-rev>. CI posts it as
# the PR comment; run it locally the same way:
#   scripts/review.sh main > review.md
# First screen: the verdict table (the decision numbers, base -> workspace, with CIs),
# warnings, whether the results are fresh, the params that changed and the ROC/PR images.
# Then the details: every metric (wall-clock runtime figures left out), dvc.lock diff.
# Plot images go to [plots-dir] (default dvc_plots/), next to DVC's own HTML plots diff;
# REVIEW_IMAGE_BASE_URL=<url> links them as <url>/<name>.png (where CI uploaded them) and
# REVIEW_IMAGES=inline embeds them as data URIs (a self-contained file).
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
LOCK_LINES=60

section() { printf '\n## %s\n\n' "$1"; }
or_none() { if [ -n "$1" ]; then printf '%s\n' "$1"; else printf '%s\n' "$2"; fi; }

printf '# Pipeline review: workspace vs `%s` (%s)\n\n' "$base" "$(git rev-parse --short "$base")"
"$python" -m triage.summary "$base"

# Freshness in one line each; the details are below.
if ! preflight_error="$("$python" -m triage.preflight 2>&1 >/dev/null)"; then
  printf '\n**Preflight failed:** %s\n' "$preflight_error"
fi
fresh=yes
dvc status -q >/dev/null 2>&1 || fresh=no
lock_same=yes
git diff --quiet HEAD -- dvc.lock 2>/dev/null || lock_same=no
if [ "$fresh" = yes ] && [ "$lock_same" = yes ]; then
  printf '\nResults are fresh: `dvc status` is clean and the committed `dvc.lock` matches.\n'
else
  [ "$fresh" = no ] && printf '\n**Stale:** some outputs do not match their inputs (details below).\n'
  [ "$lock_same" = no ] && printf '\n**`dvc.lock` differs from the commit** (details below).\n'
fi

section "Params changed (\`dvc params diff ${base} --deps\`)"
or_none "$(dvc params diff "$base" --md --deps)" "No parameter changed."

section "Curves"
mkdir -p "$plots_dir"
dvc plots diff "$base" --out "$plots_dir" >/dev/null 2>&1 \
  && echo "Interactive, offline: \`${plots_dir}/index.html\` (\`dvc plots diff ${base}\`)." \
  || echo "\`dvc plots diff\` failed; see the PNGs below."
"$python" -m scripts.plot_diff "$base" "$plots_dir"

printf '\n---\n\n# Details\n'
section "Pipeline status"
if [ "$fresh" = yes ]; then
  echo "\`dvc status\` is clean (every output matches its inputs)."
else
  printf '```\n%s\n```\n' "$(dvc status 2>&1 | head -40)"
fi
if [ "$lock_same" = no ]; then
  lock_diff="$(git diff HEAD -- dvc.lock)"
  total=$(printf '%s\n' "$lock_diff" | wc -l)
  shown=$(( total < LOCK_LINES ? total : LOCK_LINES ))
  printf '\n`git diff HEAD -- dvc.lock` (first %s of %s lines):\n\n```diff\n%s\n```\n' \
    "$shown" "$total" "$(printf '%s\n' "$lock_diff" | head -"$LOCK_LINES")"
fi

# Every metrics file of dvc.yaml except the wall-clock ones (metrics/runtime/: they vary
# from run to run and decide nothing).
mapfile -t targets < <("$python" - <<'EOF'
import yaml
for path in yaml.safe_load(open("dvc.yaml"))["metrics"]:
    if not path.startswith("metrics/runtime/"):
        print(path)
EOF
)
section "All metrics (\`dvc metrics diff ${base}\`, runtime figures left out)"
or_none "$(dvc metrics diff "$base" --md --precision 4 --targets "${targets[@]}")" "No metric changed."
