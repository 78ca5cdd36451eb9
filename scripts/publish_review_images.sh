#!/usr/bin/env bash
# Push the review's PNG plots to a branch of the same repository, so the PR comment can
# show them (a comment cannot hold images, and GitHub strips data-URI images):
#   scripts/publish_review_images.sh <plots-dir> <dest-folder> [remote]
# commits <plots-dir>/*.png to <dest-folder>/ on branch $REVIEW_IMAGES_BRANCH (default
# review-plots; created without history the first time) and pushes it. The workflow then
# links them with REVIEW_IMAGE_BASE_URL=<repo>/raw/<branch>/<dest-folder>. The plots are
# aggregate curves (no image, id or path of any patient).
set -euo pipefail

plots_dir="${1:?usage: publish_review_images.sh <plots-dir> <dest-folder> [remote]}"
dest="${2:?usage: publish_review_images.sh <plots-dir> <dest-folder> [remote]}"
remote="${3:-origin}"
branch="${REVIEW_IMAGES_BRANCH:-review-plots}"
shopt -s nullglob
pngs=("$plots_dir"/*.png)
if [ ${#pngs[@]} -eq 0 ]; then
  echo "publish_review_images: no PNG under $plots_dir: nothing to publish" >&2
  exit 0
fi

if git fetch -q "$remote" "$branch" 2>/dev/null; then
  parent=(-p FETCH_HEAD)
  base_tree="FETCH_HEAD^{tree}"
else
  parent=()
  base_tree=""
fi
# Build the commit in a private index: the working tree and HEAD are left alone.
index="$(mktemp)"
trap 'rm -f "$index"' EXIT
export GIT_INDEX_FILE="$index"
if [ -n "$base_tree" ]; then git read-tree "$base_tree"; else git read-tree --empty; fi
for png in "${pngs[@]}"; do
  blob="$(git hash-object -w "$png")"
  git update-index --add --cacheinfo "100644,$blob,$dest/$(basename "$png")"
done
tree="$(git write-tree)"
commit="$(git -c user.name="${GIT_AUTHOR_NAME:-review-bot}" \
             -c user.email="${GIT_AUTHOR_EMAIL:-review-bot@localhost}" \
             commit-tree "$tree" "${parent[@]}" -m "Review plots: $dest")"
git push -q "$remote" "$commit:refs/heads/$branch"
echo "published ${#pngs[@]} image(s) to $branch:$dest"
