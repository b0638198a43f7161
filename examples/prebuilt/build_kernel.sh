#!/bin/sh
# Build the prebuilt kernel of this example: kernels/add_custom.c -> an object file, with
# the system C compiler and pto's kernel header (pto.include_dir()), outside pto.compile.
#
#   sh examples/prebuilt/build_kernel.sh [OUT.o]      (default: add_custom.o here)
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-$HERE/add_custom.o}
PYTHON=${PYTHON:-python3}
INCLUDE=$("$PYTHON" -c 'import pto; print(pto.include_dir())')
${CC:-cc} -O2 -fPIC -I "$INCLUDE" -c "$HERE/kernels/add_custom.c" -o "$OUT"
echo "built $OUT"
