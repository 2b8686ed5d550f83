#!/usr/bin/env bash
# Runs every test, from a fresh machine (Debian 12, Python 3.11, pip, apt, root):
#
#   bash test.sh
#
# Three legs, each in its own virtualenv (created on the first run, reused
# after), each against xrapture's installed wheel (pytest runs from a
# temporary directory, so a file missing from the package fails). The suite
# is split, not repeated: every test runs on the newest JAX, except those
# needing torch or the model packages, which run on Python 3.11; the core
# files run again at the floors:
#
#   py312  Python >= 3.12 ($XRAPTURE_PYTHON312; default: pyenv's 3.12.1, else
#          python3.12 or python3.13 on PATH) with the newest jax there
#          (0.12.x) and the tests and experiments extras: pytest, every test
#          file (the library's, the launchers' and benchmarks', the
#          two-process jax.distributed runs included). torch for 3.12 is a
#          multi-GB download: the tests that need it, or the model packages,
#          skip here, are listed, and are recorded (xrapture_test/conftest.py)
#          for py311. Venv $XRAPTURE_VENV_PY312 (.venv-test-py312).
#   floor  Python 3.11 with exactly the lowest versions setup.py admits
#          (tools/floors.py pins install_requires' lower bounds, so the two
#          cannot drift): `bazel test //xrapture_test/...`, the core files
#          listed in xrapture_test/BUILD (_BAZEL_SUITE), with this venv's
#          python3. Bazel is installed from Debian if absent. Venv
#          $XRAPTURE_VENV_FLOOR (.venv-test-floor).
#   py311  Python 3.11 ($XRAPTURE_PYTHON311, default python3) with the newest
#          jax pip serves there (0.10.x) and every extra, torch, PEFT,
#          bitsandbytes and the model packages included: pytest, exactly the
#          tests py312 skipped for a missing extra (if py312 did not pass:
#          every launcher test file and every library file importing torch,
#          PEFT or the model packages). A missing torch is a failure here
#          (XRAPTURE_REQUIRE_TORCH=1). Venv $XRAPTURE_VENV (.venv-test).
#   check  tools/check.sh in py311's venv (the checkers pinned in
#          tools/requirements-check.txt installed there): ruff lint and
#          format, mypy, and the Sphinx API docs with warnings as errors.
#
# The installs run in the background; each leg starts once its venv is ready.
# XRAPTURE_LEGS picks legs (default "py311 py312 floor check"). A leg whose Python
# is missing is skipped with a notice, or fails when CI=true. Every leg runs;
# the exit status is non-zero if any failed (pytest's 5, "no tests ran",
# included).
set -euo pipefail

readonly REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "${REPO}"
source "${REPO}/tools/install.sh"

readonly LEGS="${XRAPTURE_LEGS:-py311 py312 floor check}"
readonly TMP_DIR="$(mktemp -d)"
trap 'rm -rf "${TMP_DIR}"' EXIT
# Each leg ends as one line here: "<leg> <passed|FAILED|skipped> <seconds> <note>".
SUMMARY=()
FAILED=0
START=${SECONDS}

wants() { [[ " ${LEGS} " == *" $1 "* ]]; }

# missing_python LEG WHAT: a skip with a notice, or a failure under CI=true.
missing_python() {
  if [[ "${CI:-}" == "true" ]]; then
    echo "ERROR: leg $1: no $2 (CI=true: every leg must run)." >&2
    SUMMARY+=("$1 FAILED 0 no $2")
    FAILED=1
  else
    echo "NOTICE: leg $1 skipped: no $2 on this machine." >&2
    SUMMARY+=("$1 skipped 0 no $2")
  fi
}

find_python311() {
  local candidate
  for candidate in "${XRAPTURE_PYTHON311:-}" python3 python3.11; do
    if [[ -n "${candidate}" ]] && command -v "${candidate}" >/dev/null 2>&1 &&
       [[ "$(python_minor "${candidate}")" == "3.11" ]]; then
      command -v "${candidate}"
      return 0
    fi
  done
  if [[ -n "${XRAPTURE_PYTHON311:-}" ]]; then
    echo "XRAPTURE_PYTHON311=${XRAPTURE_PYTHON311} is not a Python 3.11" >&2
  fi
  return 1
}

find_python312() {
  local candidates=()
  if [[ -n "${XRAPTURE_PYTHON312:-}" ]]; then
    candidates=("${XRAPTURE_PYTHON312}")
  else
    if command -v pyenv >/dev/null 2>&1 && pyenv prefix 3.12.1 >/dev/null 2>&1; then
      candidates+=("$(pyenv prefix 3.12.1)/bin/python3")
    fi
    candidates+=(python3.12 python3.13)
  fi
  local candidate
  for candidate in "${candidates[@]}"; do
    if command -v "${candidate}" >/dev/null 2>&1 &&
       "${candidate}" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "${candidate}"
      return 0
    fi
  done
  if [[ -n "${XRAPTURE_PYTHON312:-}" ]]; then
    echo "XRAPTURE_PYTHON312=${XRAPTURE_PYTHON312} is not a Python >= 3.12" >&2
  fi
  return 1
}

# ---------------------------------------------------------------------------
step "Interpreters"
PY311="" PY312=""
if wants py311 || wants floor || wants check; then
  PY311="$(find_python311)" || PY311=""
  echo "Python 3.11: ${PY311:-none}"
fi
if wants py312; then
  PY312="$(find_python312)" || PY312=""
  echo "Python >= 3.12: ${PY312:-none}"
fi
BUILD_PYTHON="${PY311:-${PY312:-python3}}"

# ---------------------------------------------------------------------------
# Everything below overlaps where it can: Bazel's apt install and the three
# pip installs run in the background (mostly download and unpack time), and
# each leg's tests start as soon as its own virtualenv is ready, the legs
# with the small installs first.
APT_PID=""
if wants floor && { ! command -v bazel >/dev/null 2>&1 || [[ ! -d /usr/share/bazel/rules/java ]]; }; then
  step "Bazel (apt-get install bazel-bootstrap bazel-rules-java, in the background)"
  (
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q && apt-get install -y -q bazel-bootstrap bazel-rules-java
  ) > "${TMP_DIR}/apt.log" 2>&1 &
  APT_PID=$!
fi

step "xrapture wheel"
BUILD_VENV="${TMP_DIR}/build-venv"
"${BUILD_PYTHON}" -m venv "${BUILD_VENV}"
"${BUILD_VENV}/bin/python" -m pip install -q setuptools wheel
build_wheel "${BUILD_VENV}/bin/python" "${TMP_DIR}/wheel"
echo "${WHEEL}"

declare -A LEG_VENV LEG_PYTHON INSTALL_PID
if wants py311 || wants check; then
  if [[ -n "${PY311}" ]]; then
    LEG_VENV[py311]="${XRAPTURE_VENV:-${REPO}/.venv-test}"; LEG_PYTHON[py311]="${PY311}"
  else
    missing_python py311 "Python 3.11"
  fi
fi
if wants py312; then
  if [[ -n "${PY312}" ]]; then
    LEG_VENV[py312]="${XRAPTURE_VENV_PY312:-${REPO}/.venv-test-py312}"; LEG_PYTHON[py312]="${PY312}"
  else
    missing_python py312 "Python >= 3.12 (set XRAPTURE_PYTHON312)"
  fi
fi
if wants floor; then
  FLOOR_PYTHON="$("${BUILD_PYTHON}" tools/floors.py --python)"
  if [[ -n "${PY311}" && "${FLOOR_PYTHON}" == "3.11" ]]; then
    LEG_VENV[floor]="${XRAPTURE_VENV_FLOOR:-${REPO}/.venv-test-floor}"; LEG_PYTHON[floor]="${PY311}"
  else
    missing_python floor "Python ${FLOOR_PYTHON} (setup.py's python_requires)"
  fi
fi
"${BUILD_PYTHON}" tools/floors.py > "${TMP_DIR}/floors.txt"

install_leg() {
  local leg="$1"
  make_venv "${LEG_VENV[${leg}]}" "${LEG_PYTHON[${leg}]}"
  case "${leg}" in
    py311)
      install_wheel "${VENV}" "${WHEEL}" "tests,experiments,peft,models"
      if wants check; then
        "${VENV}/bin/python" -m pip install -q -r tools/requirements-check.txt
      fi ;;
    py312) install_wheel "${VENV}" "${WHEEL}" "tests,experiments" ;;
    floor) install_wheel "${VENV}" "${WHEEL}" "tests" -c "${TMP_DIR}/floors.txt" ;;
  esac
}

step "virtualenvs: ${!LEG_VENV[*]} (pip install, in the background)"
INSTALL_START=${SECONDS}
for leg in "${!LEG_VENV[@]}"; do
  install_leg "${leg}" > "${TMP_DIR}/install-${leg}.log" 2>&1 &
  INSTALL_PID[${leg}]=$!
done

# ready LEG: waits for LEG's install; false (the leg recorded as failed) if
# it failed or the leg has no virtualenv.
# Asked twice (py311's venv serves the check leg too), it answers the same.
declare -A READY
ready() {
  local leg="$1"
  [[ -n "${LEG_VENV[${leg}]:-}" ]] || return 1
  if [[ -n "${READY[${leg}]:-}" ]]; then
    [[ "${READY[${leg}]}" == yes ]]
    return
  fi
  if wait "${INSTALL_PID[${leg}]}"; then
    READY[${leg}]=yes
    echo "${leg}: ${LEG_VENV[${leg}]} ready after $((SECONDS - INSTALL_START)) s"
    return 0
  fi
  READY[${leg}]=no
  echo "ERROR: leg ${leg}: pip install failed:" >&2
  tail -n 30 "${TMP_DIR}/install-${leg}.log" >&2
  SUMMARY+=("${leg} FAILED 0 pip install failed")
  FAILED=1
  return 1
}

# ---------------------------------------------------------------------------
# Compile-time savers for the tests (about half of the suite's time is XLA
# compiling small programs on CPU): XLA's cheap optimization level, and a
# persistent compilation cache that is fresh per run and per leg (shared by
# the pytest workers and the launcher subprocesses, so a program compiled by
# one test is reused by the next). Neither changes what a test checks;
# benchmark figures are never measured with them (run.sh does not set them).
test_env() {
  local leg="$1"
  export XLA_FLAGS="--xla_force_host_platform_device_count=8"
  export JAX_DISABLE_MOST_OPTIMIZATIONS=1
  export JAX_COMPILATION_CACHE_DIR="${TMP_DIR}/jax-cache-${leg}"
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
  export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
}

# pytest-xdist workers: one more than the cores, so that a core is not idle
# while a test waits on subprocesses (the multi-process tests, the bounded
# waits of the error tests). $XRAPTURE_TEST_WORKERS overrides it.
WORKERS="${XRAPTURE_TEST_WORKERS:-$(( $(nproc) + 1 ))}"

# run_pytest LEG VENV ARGS...: pytest against the installed package, from
# outside the source tree.
run_pytest() {
  local leg="$1" venv="$2"
  shift 2
  local work="${TMP_DIR}/run-${leg}"
  mkdir -p "${work}"
  (
    cd "${work}"
    test_env "${leg}"
    # The repository must not be importable: only the installed copy.
    "${venv}/bin/python" -c 'import sys, jax, xrapture; print("xrapture", xrapture.__version__, "from", xrapture.__file__, "| jax", jax.__version__, "| Python", sys.version.split()[0])'
    XRAPTURE_EXPECT_INSTALLED=1 "${venv}/bin/python" -m pytest \
      -p no:cacheprovider -n "${WORKERS}" -q -rs --durations=10 "$@"
  )
}

# end_leg LEG STATUS START NOTE
end_leg() {
  local seconds=$((SECONDS - $3))
  if [[ "$2" -eq 0 ]]; then
    SUMMARY+=("$1 passed ${seconds} $4")
  else
    SUMMARY+=("$1 FAILED ${seconds} $4 (exit status $2)")
    FAILED=1
  fi
}

ALL_TESTS=("${REPO}"/xrapture_test/*_test.py)
# py311's files when py312 did not pass (so its record of skips may be
# incomplete): those that run experiments/ or benchmarks/, and those with
# tests that need torch, PEFT, bitsandbytes or the third-party model packages.
FALLBACK_TESTS=()
for f in "${ALL_TESTS[@]}"; do
  if grep -qE '^\s*(from|import) (experiments|benchmarks)\b|^\s*import (peft|torch)\b|optional\.(modules|require)\(' "${f}"; then
    FALLBACK_TESTS+=("${f}")
  fi
done

# The tests py312 skipped for a missing extra (xrapture_test/conftest.py
# records them), which py311 then runs; FALLBACK_TESTS there when py312 did
# not pass.
SKIPS_FILE="${TMP_DIR}/py312-skipped-for-extras.txt"
PY312_SKIPS_VALID=0

if wants py312 && ready py312; then
  step "leg py312: every test file on the newest JAX (those needing torch or the model packages skip)"
  leg_start=${SECONDS}
  venv="${LEG_VENV[py312]}"
  echo "NOTICE: no torch/PEFT/bitsandbytes in this leg (a multi-GB download for" \
       "Python >= 3.12): the tests that need them are skipped here, listed below," \
       "and run in the py311 leg."
  status=0
  XRAPTURE_RECORD_SKIPS="${SKIPS_FILE}" run_pytest py312 "${venv}" "${ALL_TESTS[@]}" || status=$?
  [[ "${status}" -eq 0 ]] && PY312_SKIPS_VALID=1
  end_leg py312 "${status}" "${leg_start}" "Python $(python_minor "${venv}/bin/python"), $("${venv}/bin/python" -c 'import jax; print("jax", jax.__version__)')"
fi

if wants floor && ready floor; then
  if [[ -n "${APT_PID}" ]] && ! wait "${APT_PID}"; then
    echo "ERROR: apt-get install bazel-bootstrap bazel-rules-java failed:" >&2
    tail -n 30 "${TMP_DIR}/apt.log" >&2
  fi
  APT_PID=""
  step "leg floor: bazel test //xrapture_test/... at setup.py's lowest versions"
  leg_start=${SECONDS}
  venv="${LEG_VENV[floor]}"
  echo "Pins: $(tr '\n' ' ' < "${TMP_DIR}/floors.txt")"
  status=0
  (
    test_env bazel
    bazel test --test_env=PATH="${venv}/bin:/usr/bin:/bin" --test_env=XLA_FLAGS \
      --test_env=JAX_DISABLE_MOST_OPTIMIZATIONS //xrapture_test/...
  ) || status=$?
  end_leg floor "${status}" "${leg_start}" "$(tr '\n' ' ' < "${TMP_DIR}/floors.txt")"
fi

if wants py311 && ready py311; then
  step "leg py311: the tests py312 skipped for torch, PEFT, bitsandbytes or the model packages"
  leg_start=${SECONDS}
  venv="${LEG_VENV[py311]}"
  TESTS=("${FALLBACK_TESTS[@]}")
  if [[ "${PY312_SKIPS_VALID}" -eq 1 ]]; then
    TESTS=()
    if [[ -s "${SKIPS_FILE}" ]]; then
      mapfile -t TESTS < <(sort -u "${SKIPS_FILE}" | sed "s|^|${REPO}/|")
    fi
    echo "The ${#TESTS[@]} tests (or files) py312 skipped for a missing extra."
  else
    echo "py312 did not pass: every launcher test file, and every library file importing torch, PEFT or the model packages."
  fi
  status=0
  XRAPTURE_REQUIRE_TORCH=1 run_pytest py311 "${venv}" "${TESTS[@]}" || status=$?
  end_leg py311 "${status}" "${leg_start}" "Python 3.11, $("${venv}/bin/python" -c 'import jax; print("jax", jax.__version__)')"
fi

if wants check && [[ -n "${LEG_VENV[py311]:-}" ]] && ready py311; then
  step "leg check: lint, format, types and the API docs (tools/check.sh)"
  leg_start=${SECONDS}
  status=0
  bash tools/check.sh "${LEG_VENV[py311]}" || status=$?
  end_leg check "${status}" "${leg_start}" "$(grep -oE '^[a-z]+==[0-9.]+' tools/requirements-check.txt | tr '\n' ' ')"
fi

# ---------------------------------------------------------------------------
step "Summary ($((SECONDS - START)) s in all)"
printf '  %s\n' "${SUMMARY[@]}"
if [[ "${FAILED}" -ne 0 ]]; then
  echo "FAILED" >&2
  exit 1
fi
step "All tests passed"
