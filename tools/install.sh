# Shared by test.sh and run.sh (sourced, not run): installs xrapture into a
# virtualenv, non-editable, the way a user would.

step() {
  printf '\n==> %s\n' "$*"
}

# install_xrapture VENV REQUIREMENT
#   Creates the virtualenv VENV unless it exists, then pip-installs REQUIREMENT
#   (e.g. ".[tests]") from the repository root into it. Sets VENV.
install_xrapture() {
  VENV="$1"
  local requirement="$2"
  step "virtualenv ${VENV}: pip install ${requirement}"
  if [[ ! -x "${VENV}/bin/python" ]]; then
    "${PYTHON:-python3}" -m venv "${VENV}"
    "${VENV}/bin/python" -m pip install -q --upgrade setuptools wheel
  fi
  VENV="$(cd "${VENV}" && pwd)"
  # setuptools reuses build/ across builds: a module deleted from the source
  # tree would still be installed from a stale build/lib.
  rm -rf build xrapture.egg-info
  "${VENV}/bin/python" -m pip install -q --no-build-isolation "${requirement}"
  rm -rf build xrapture.egg-info
}
