#!/bin/sh
# Mutation testing (issue 23, "Measure it"): mutmut on one module with only the tests that cover it.
# usage: [SAMPLE=N] [REV=commit] bench/mutation.sh beam|cider|migrations|writes [scratch-dir]
# SAMPLE=N: only every N-th mutant (a fixed sample); REV: mutate and test that commit's tree.
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
         tests='"tests/test_old_databases.py"' ;;
  writes) module=sat_cli/store/writes.py
         tests='"tests/test_old_databases.py", "tests/test_store_errors.py", "tests/test_store_writes.py", "tests/test_store_batches.py", "tests/test_caption.py::test_caption_folder_stores_captions_scores_nbest_and_attention", "tests/test_caption.py::test_rerun_skips_force_redoes_and_new_settings_recaption", "tests/test_caption.py::test_failures_are_rows_the_run_goes_on_and_exit_status_is_1", "tests/test_caption.py::test_same_content_twice_is_captioned_once", "tests/test_storage.py::test_a_database_locked_by_another_program", "tests/test_storage.py::test_read_only_database_and_folder", "tests/test_storage.py::test_a_damaged_database_gives_one_clear_message", "tests/test_storage.py::test_a_held_migration_lock_and_a_database_name_that_is_not_utf8"' ;;
  *) echo "unknown module $name" >&2; exit 2 ;;
esac
rm -rf "$scratch"; mkdir -p "$scratch"
if [ -n "${REV:-}" ]; then  # the tree of that commit (e.g. the tests before new ones), else the working tree
  git -C "$root" archive "$REV" | tar -xf - -C "$scratch"
else
  (cd "$root" && git ls-files -co --exclude-standard | grep -v '^mutants/' | tar -cf - -T -) | tar -xf - -C "$scratch"
fi
ln -sfn "$(cd "$root/../shared" && pwd)" "$scratch/shared"  # tests read ../shared from mutants/
cat >> "$scratch/pyproject.toml" <<TOML

[tool.mutmut]
source_paths = ["sat_cli"]
only_mutate = ["$module"]
pytest_add_cli_args_test_selection = [$(cd "$scratch" && for t in $(echo "$tests" | tr -d '",'); do [ -e "${t%%::*}" ] && printf '"%s", ' "$t"; done)]
pytest_add_cli_args = ["-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly"]
process_isolation = "forkserver"
also_copy = ["examples", "plugins", "bench", "docs", "README.md", "CHANGELOG.md", "DEVELOPERS.md", ".ci"]
use_git_change_detection = false
TOML
cd "$scratch"
if [ "$name" = migrations ]; then
  # mutmut 3.8 leaves decorated functions unmutated: register the migrations after their
  # definitions instead of with @migration (same functions, same order) in this copy only
  "${PYTHON:-$root/.venv/bin/python}" - <<'PY'
import re
p = "sat_cli/store/migrations.py"
s = open(p).read()
names = re.findall(r"@migration\ndef (\w+)\(", s)
s = s.replace("@migration\n", "")
s = s.replace("\ndef apply_migrations(", "\nfor _fn in (" + ", ".join(names) + ",):\n    migration(_fn)\n\n\ndef apply_migrations(")
open(p, "w").write(s)
PY
fi
python=${PYTHON:-$root/.venv/bin/python}
if [ -n "${SAMPLE:-}" ]; then
  # every SAMPLE-th mutant (in file order) only: a fixed sample for a module too big to run whole
  nice -n 19 "$python" -m mutmut run --max-children 1 "no-such-mutant" >/dev/null 2>&1 || true
  names=$("$python" - "$module" "$SAMPLE" <<'PY'
import re, sys
module, step = sys.argv[1], int(sys.argv[2])
text = open("mutants/" + module).read()
prefix = module[:-3].replace("/", ".")
names = [prefix + "." + m for m in re.findall(r"^\s*def (x\S*?__mutmut_\d+)\(", text, re.M)]
print(" ".join(names[::step]))
PY
)
  echo "sample: $(echo $names | wc -w) mutants" >&2
  nice -n 19 "$python" -m mutmut run --max-children 1 $names || true
else
  nice -n 19 "$python" -m mutmut run --max-children 1 || true
fi
"$python" -m mutmut results --all true > results.txt 2>&1 || "$python" -m mutmut results > results.txt 2>&1 || true
"$python" - <<'PY'
import collections, re
counts = collections.Counter()
for line in open("results.txt"):
    m = re.match(r"\s*(\S+): (\S+)", line)
    if m and "__mutmut_" in m.group(1):
        counts[m.group(2)] += 1
total = sum(counts.values()) - counts["not"]  # "not checked": outside a sample
print(dict(counts), "checked", total)
if total:
    print(f"killed share: {counts['killed'] / total:.1%}")
PY
