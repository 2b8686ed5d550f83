#!/usr/bin/env bash
# Runs every test, from a fresh machine (Debian 12, Python 3.11, pip, apt, root):
#
#   bash test.sh
#
# 1. installs Bazel from Debian (bazel-bootstrap, bazel-rules-java) if absent;
# 2. creates a virtualenv ($XRAPTURE_VENV, default .venv-test; reused on rerun);
# 3. installs xrapture into it, non-editable, with its test extras;
# 4. runs pytest from a temporary directory against the installed package, so
#    that a file missing from the package fails the tests instead of being
#    picked up from the source tree;
# 5. runs `bazel test //xrapture_test/...` with the virtualenv's python.
set -euo pipefail

readonly REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "${REPO}"
source "${REPO}/tools/install.sh"

step "Bazel"
if ! command -v bazel >/dev/null 2>&1 || [[ ! -d /usr/share/bazel/rules/java ]]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q bazel-bootstrap bazel-rules-java
fi

install_xrapture "${XRAPTURE_VENV:-${REPO}/.venv-test}" ".[tests,experiments,peft]"

step "pytest (installed package, from outside the source tree)"
TMP_DIR="$(mktemp -d)"
trap 'rm -rf "${TMP_DIR}"' EXIT
cd "${TMP_DIR}"
# The repository must not be importable: only the installed copy of xrapture.
"${VENV}/bin/python" -c 'import xrapture; print("xrapture", xrapture.__version__, "from", xrapture.__file__)'
set +e
XRAPTURE_EXPECT_INSTALLED=1 "${VENV}/bin/python" -m pytest \
  -p no:cacheprovider -n auto -q "${REPO}/xrapture_test"
pytest_status=$?
set -e
cd "${REPO}"
# 5 means no tests were collected: that is a failure too.
if [[ "${pytest_status}" -ne 0 ]]; then
  echo "pytest failed (exit status ${pytest_status})" >&2
  exit "${pytest_status}"
fi

step "bazel test //xrapture_test/..."
bazel test --test_env=PATH="${VENV}/bin:/usr/bin:/bin" //xrapture_test/...

step "All tests passed"
