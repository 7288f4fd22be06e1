#!/usr/bin/env bash
# Sets up .venv/ (idempotent) and runs the tests. `bash launch/test.sh` is what CI runs.
#   bash launch/test.sh           the whole suite: in parallel (one pytest worker per core, at
#                                 most 4), then the tests marked `alone` (they bound wall-clock
#                                 time, which a busy neighbour would stretch) one at a time
#   bash launch/test.sh --fast    the development lane: the same, without `slow` and `alone`
#   bash launch/test.sh ARGS...   pytest ARGS in one process (e.g. tests/test_text.py -k vocab)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash launch/setup.sh
py=.venv/bin/python
cores="$(nproc)"
# loadgroup: a module whose tests share an expensive module fixture names an xdist_group, so
# its tests run on one worker and the fixture is built once.
parallel=(-n "$(( cores < 4 ? cores : 4 ))" --dist loadgroup)
case "${1:-}" in
  --fast) shift; exec "$py" -m pytest -q "${parallel[@]}" -m "not slow and not alone" "$@" ;;
  "") ;;
  *) exec "$py" -m pytest -q "$@" ;;
esac
status=0
"$py" -m pytest -q "${parallel[@]}" -m "not alone" || status=$?
"$py" -m pytest -q -m alone || { last=$?; [ "$status" -ne 0 ] || status=$last; }
exit "$status"
