#!/bin/sh
# Mutation testing (issue 23, "Measure it"): mutmut on one module with only the tests that cover it.
# usage: bench/mutation.sh beam|cider|migrations|writes [scratch-dir]
# Runs in a scratch copy of the working tree (mutmut writes mutants/ beside pyproject.toml), at
# nice 19 and one worker; prints mutmut's per-mutant results and the killed share.
set -eu
name=$1
root=$(cd "$(dirname "$0")/.." && pwd)
scratch=${2:-/tmp/sat-mutation/$name}
case $name in
  beam) module=sat_cli/model/beam.py; tests='"tests/test_beam.py"' ;;
  cider) module=sat_cli/evaluation/cider.py
         tests='"tests/test_train.py::test_cider_d_matches_pycocoevalcap", "tests/test_metrics.py"' ;;
  migrations) module=sat_cli/store/migrations.py
         tests='"tests/test_old_databases.py", "tests/test_storage.py", "tests/test_file_index.py"' ;;
  writes) module=sat_cli/store/writes.py
         tests='"tests/test_old_databases.py", "tests/test_storage.py", "tests/test_file_index.py", "tests/test_caption.py"' ;;
  *) echo "unknown module $name" >&2; exit 2 ;;
esac
rm -rf "$scratch"; mkdir -p "$scratch"
(cd "$root" && git ls-files -co --exclude-standard | grep -v '^mutants/' | tar -cf - -T -) | tar -xf - -C "$scratch"
ln -sfn "$(cd "$root/../shared" && pwd)" "$scratch/shared"  # tests read ../shared from mutants/
cat >> "$scratch/pyproject.toml" <<TOML

[tool.mutmut]
source_paths = ["sat_cli"]
only_mutate = ["$module"]
pytest_add_cli_args_test_selection = [$tests]
pytest_add_cli_args = ["-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly"]
process_isolation = "forkserver"
also_copy = ["examples", "plugins", "bench", "docs", "README.md", "CHANGELOG.md", "DEVELOPERS.md", ".ci"]
use_git_change_detection = false
TOML
cd "$scratch"
python=${PYTHON:-$root/.venv/bin/python}
nice -n 19 "$python" -m mutmut run --max-children 1 || true
"$python" -m mutmut results --all true > results.txt 2>&1 || "$python" -m mutmut results > results.txt 2>&1 || true
"$python" - <<'PY'
import collections, re
counts = collections.Counter()
for line in open("results.txt"):
    m = re.match(r"\s*(\S+): (\S+)", line)
    if m and "__mutmut_" in m.group(1):
        counts[m.group(2)] += 1
total = sum(counts.values())
print(dict(counts), "total", total)
if total:
    print(f"killed share: {counts['killed'] / total:.1%}")
PY
