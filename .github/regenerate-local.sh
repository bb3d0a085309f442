#!/usr/bin/env bash
# The weekly regeneration workflow (.github/workflows/regenerate.yml), step by step, on this
# machine: in a scratch clone of this repository (never in the work tree), set up, find the
# release, regenerate the ports from it (`porter regen`: the ports, generated/DRIFT.md with the
# release matrix), verify every port in the engine (`make verify-all`, writing the verdicts),
# sweep the coverage of the regenerated tree (`porter coverage`), test everything (`make test`),
# and commit the result on a branch of the scratch clone (what the workflow proposes as a pull
# request). Exit status: non-zero when regen, a verification, the coverage or the tests failed,
# as the workflow's last step.
#
#   .github/regenerate-local.sh [RELEASE] [--scratch DIR] [--venv DIR] [--cache DIR] [--no-tests] [--resume]
#
# RELEASE: the transformers release (default: the newest, asked of the package index with pip).
# --scratch DIR: where to clone (default: a new temporary directory; kept afterwards).
# --venv DIR: use this porter venv (a symlink) instead of building one with `make setup` (the
#   day-zero reference venvs are porter's cache's, shared by every clone), and make is never
#   run (the tests run as `make verify-all` and `make test` run them, without their setup steps).
# --cache DIR: use this porter cache (a .porter-cache, linked): its entries are keyed by the code
#   and files they were computed from, so the release matrix reuses the cells computed already.
# --no-tests: stop after `porter regen` (the drift report, no engine runs, no coverage).
# --resume: go on with an earlier run of the same RELEASE in --scratch DIR (a run cut short: the
#   whole workflow takes about 3 h on a 2-core machine). Its clone is kept, and regen, done, is not
#   run again (its exit status is kept). The verification then verifies the ports without a valid
#   verdict, with no sample of the valid ones: a verdict of the earlier run was written by an engine
#   run of these same bytes and versions, and the store's digest says whether it still holds.
set -uo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
release="" scratch="" venv="" cache="" tests=1 resume=0
while [ $# -gt 0 ]; do
  case "$1" in
    --scratch) scratch="$2"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    --cache) cache="$2"; shift 2 ;;
    --no-tests) tests=0; shift ;;
    --resume) resume=1; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) release="$1"; shift ;;
  esac
done
if [ "$resume" = 1 ] && { [ -z "$scratch" ] || [ ! -d "$scratch/porter/.git" ]; }; then
  echo "--resume needs --scratch DIR holding an earlier run's clone (DIR/porter)" >&2
  exit 2
fi
scratch="${scratch:-$(mktemp -d /tmp/porter-regen-XXXXXX)}"

step() { printf '\n== %s\n' "$*"; }

if [ "$resume" = 1 ]; then
  step "scratch clone (resumed): $scratch/porter"
else
  step "scratch clone: $scratch/porter"
  git clone -q --no-hardlinks "$here" "$scratch/porter" || exit 1
fi
cd "$scratch/porter" || exit 1

step "set up porter and the engines"
if [ -n "$venv" ] && [ "$resume" = 1 ]; then
  export PYTHONPATH="$PWD"  # (the links are the earlier run's)
elif [ -n "$venv" ]; then
  ln -sfn "$venv" .venv
  # the venv's porter is another checkout's: run this clone's code (python -m porter from here)
  export PYTHONPATH="$PWD"
else
  make setup || exit 1
fi

if [ -n "$cache" ]; then
  ln -sfn "$(cd "$cache" && pwd)" .porter-cache
fi

step "find the transformers release"
if [ -z "$release" ]; then
  release="$(.venv/bin/python -m pip index versions transformers 2>/dev/null \
    | sed -n 's/^transformers (\(.*\))$/\1/p' | head -n 1)"
fi
if [ -z "$release" ]; then
  echo "could not determine the newest transformers release" >&2
  exit 1
fi
echo "transformers $release"

state=".git/porter-regen-$release.status"  # regen's exit status, for a resumed run (untracked)
if [ "$resume" = 1 ] && [ -f "$state" ]; then
  regen_status="$(cat "$state")"
  step "regenerate the ports: done by the earlier run (exit $regen_status)"
else
  step "regenerate the ports (porter regen --transformers $release)"
  .venv/bin/python -m porter regen --transformers "$release"
  regen_status=$?
  echo "$regen_status" > "$state"
fi

verify_status=0 coverage_status=0 test_status=0
if [ "$tests" = 1 ]; then
  # what `make verify-all` and `make test` run; with --venv without make: their setup
  # prerequisites would `pip install -e .` this clone into the shared venv (the clone's
  # pyproject.toml is newer than the venv's stamp)
  step "verify every port in the engine, writing the verdicts (make verify-all)"
  if [ "$resume" = 1 ]; then
    echo "(resumed: the ports without a valid verdict)"
    PORTER_VERDICT_SAMPLE=0 .venv/bin/python -m pytest -q -n 2 \
      tests/test_verify_harness.py tests/test_release_ports.py tests/test_remote_ports.py
  elif [ -n "$venv" ]; then
    PORTER_VERIFY_ALL=1 .venv/bin/python -m pytest -q -n 2 \
      tests/test_verify_harness.py tests/test_release_ports.py tests/test_remote_ports.py
  else
    make verify-all
  fi
  verify_status=$?
  step "coverage of the regenerated tree (porter coverage --jobs 2)"
  .venv/bin/python -m porter coverage --jobs 2
  coverage_status=$?
  step "test everything (make test)"
  if [ -n "$venv" ]; then
    .venv/bin/python -m pytest -q -n 2 tests
  else
    make test
  fi
  test_status=$?
fi

step "commit on branch porter/regen-transformers-$release (the workflow's pull request)"
git checkout -q -B "porter/regen-transformers-$release"
git add generated
git -c user.name=porter -c user.email=porter@localhost commit -q \
  -m "generated: regenerate ports from transformers $release" || echo "(nothing changed)"
git --no-pager show --stat --oneline HEAD | head -40
echo
echo "drift report: $scratch/porter/generated/DRIFT.md"

if [ "$regen_status" != 0 ] || [ "$verify_status" != 0 ] || [ "$coverage_status" != 0 ] || [ "$test_status" != 0 ]; then
  echo "porter regen exit $regen_status; make verify-all exit $verify_status;" \
    "porter coverage exit $coverage_status; make test exit $test_status (see generated/DRIFT.md)" >&2
  exit 1
fi
