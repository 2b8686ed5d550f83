# Shared by test.sh and run.sh (sourced, not run): virtualenvs with xrapture
# installed non-editable, the way a user gets it.

step() {
  printf '\n==> %s\n' "$*"
}

# python_minor PYTHON: prints PYTHON's "major.minor" (e.g. 3.11).
python_minor() {
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'
}

# make_venv VENV PYTHON
#   Creates the virtualenv VENV with PYTHON unless it exists with the same
#   Python major.minor (otherwise it is recreated). Sets VENV to its absolute
#   path.
make_venv() {
  VENV="$1"
  local python="$2"
  if [[ -x "${VENV}/bin/python" ]] &&
     [[ "$(python_minor "${VENV}/bin/python")" != "$(python_minor "${python}")" ]]; then
    rm -rf "${VENV}"
  fi
  if [[ ! -x "${VENV}/bin/python" ]]; then
    "${python}" -m venv "${VENV}"
    "${VENV}/bin/python" -m pip install -q --upgrade setuptools wheel
  fi
  VENV="$(cd "${VENV}" && pwd)"
}

# build_wheel PYTHON OUT_DIR: builds xrapture's wheel from the repository
# root into OUT_DIR with PYTHON (which has setuptools and wheel); sets WHEEL.
build_wheel() {
  local python="$1" out_dir="$2"
  # setuptools reuses build/ across builds: a module deleted from the source
  # tree would still be packaged from a stale build/lib.
  rm -rf build xrapture.egg-info
  "${python}" -m pip wheel -q --no-deps --no-build-isolation -w "${out_dir}" .
  rm -rf build xrapture.egg-info
  WHEEL="$(ls "${out_dir}"/xrapture-*.whl)"
}

# install_wheel VENV WHEEL EXTRAS [PIP_ARGS...]: installs WHEEL[EXTRAS] and
# its dependencies into VENV, then reinstalls WHEEL itself (a rerun with an
# unchanged version number must not keep the old files).
install_wheel() {
  local venv="$1" wheel="$2" extras="$3"
  shift 3
  "${venv}/bin/python" -m pip install -q "$@" "${wheel}[${extras}]"
  "${venv}/bin/python" -m pip install -q --no-deps --force-reinstall "${wheel}"
}

# install_xrapture VENV REQUIREMENT
#   Creates the virtualenv VENV (with ${PYTHON:-python3}) unless it exists,
#   then pip-installs REQUIREMENT (e.g. ".[tests]") from the repository root
#   into it. Sets VENV.
install_xrapture() {
  local requirement="$2"
  step "virtualenv $1: pip install ${requirement}"
  make_venv "$1" "${PYTHON:-python3}"
  rm -rf build xrapture.egg-info
  "${VENV}/bin/python" -m pip install -q --no-build-isolation "${requirement}"
  rm -rf build xrapture.egg-info
}
