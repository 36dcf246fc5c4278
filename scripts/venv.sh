# Sourced by run-site and test: make ./.venv hold p2psip (with the given extras), installing
# or updating it when it is missing or pyproject.toml changed since the last install.
ensure_venv() {
    local spec=$1 py=${PYTHON:-python3}
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "p2psip needs Python 3.11 or newer as $py (set PYTHON=...)" >&2
        exit 2
    fi
    if ! "$py" -c 'import ensurepip, venv' 2>/dev/null; then
        # Debian and Ubuntu ship venv separately.
        if [ "$(id -u)" -ne 0 ]; then
            echo "please install python3-venv (sudo apt-get install -y python3-venv)" >&2
            exit 2
        fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    local base=".venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
    local stamp="$base-${spec//[^a-z]/}"
    # The test install is a superset of the plain one.
    if [ ! -f "$stamp" ] && ! { [ "$spec" = . ] && [ -f "$base-test" ]; }; then
        [ -x .venv/bin/python ] || "$py" -m venv .venv
        .venv/bin/pip install --quiet --upgrade pip
        .venv/bin/pip install --quiet -e "$spec"
        rm -f .venv/.installed-*
        touch "$stamp"
    fi
}
