#!/bin/sh
# Builds the credlock Lambda layer zip from a credlock binary that is already built; no network.
#
#   layer/build.sh [-b BINARY] [-c CONFIG] [-o OUT.zip] [-n]
#
#   -b  the credlock binary (default: target/x86_64-unknown-linux-musl/release/credlock if
#       present, else target/release/credlock); it must be built for the function's
#       architecture (x86_64 or arm64) and run on the runtime's Amazon Linux (Amazon Linux 2:
#       glibc 2.26; Amazon Linux 2023: glibc 2.34), or be a static musl binary
#   -c  the credlock.toml to ship (default: layer/credlock.toml)
#   -o  the zip to write (default: target/credlock-layer.zip)
#   -n  do not strip: by default a stripped copy of the binary is shipped when `strip`
#       (binutils) is here; the unzipped layer must fit Lambda's 250 MB ("Lambda quotas",
#       AWS Lambda Developer Guide), which an unstripped debug build does not
#
# The zip's layout, unpacked by Lambda under /opt ("Packaging your layer content", AWS Lambda
# Developer Guide):
#   extensions/credlock        started by Lambda as the external extension "credlock"
#   credlock-wrapper           the AWS_LAMBDA_EXEC_WRAPPER script
#   credlock/credlock          the binary
#   credlock/credlock.toml     its configuration (CREDLOCK_CONFIG overrides the path)
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
binary=""
config="$here/credlock.toml"
out="$repo/target/credlock-layer.zip"
strip_it=1
while getopts b:c:o:n opt; do
    case "$opt" in
        b) binary="$OPTARG" ;;
        c) config="$OPTARG" ;;
        o) out="$OPTARG" ;;
        n) strip_it=0 ;;
        *) echo "usage: $0 [-b BINARY] [-c CONFIG] [-o OUT.zip] [-n]" >&2; exit 2 ;;
    esac
done
if [ -z "$binary" ]; then
    for candidate in "$repo/target/x86_64-unknown-linux-musl/release/credlock" \
        "$repo/target/release/credlock"; do
        if [ -x "$candidate" ]; then binary="$candidate"; break; fi
    done
fi
if [ -z "$binary" ] || [ ! -f "$binary" ] || [ ! -x "$binary" ]; then
    echo "build.sh: no credlock binary (${binary:-none found}): build it first, or pass -b" >&2
    exit 1
fi
if [ ! -f "$config" ]; then
    echo "build.sh: no config file $config" >&2
    exit 1
fi
mkdir -p "$(dirname "$out")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [ "$strip_it" = 1 ] && command -v strip >/dev/null 2>&1; then
    strip -o "$work/credlock" "$binary"
    binary="$work/credlock"
fi
size=$(wc -c <"$binary")
if [ "$size" -gt $((250 * 1024 * 1024)) ]; then
    echo "build.sh: $binary is $size bytes: more than Lambda's 250 MB for a layer unzipped" >&2
    exit 1
fi
# Python's zipfile, so that no zip tool is needed; modes are kept (Lambda runs the extension
# and the wrapper as executables).
python3 - "$out" "$binary" "$config" "$here" <<'PY'
import os, shutil, stat, sys, zipfile

out, binary, config, here = sys.argv[1:]
entries = [
    ("extensions/credlock", os.path.join(here, "extensions", "credlock"), 0o755),
    ("credlock-wrapper", os.path.join(here, "credlock-wrapper"), 0o755),
    ("credlock/credlock", binary, 0o755),
    ("credlock/credlock.toml", config, 0o644),
]
tmp = out + ".tmp"
with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
    for directory in ("extensions/", "credlock/"):
        info = zipfile.ZipInfo(directory, date_time=(2020, 1, 1, 0, 0, 0))
        info.external_attr = (stat.S_IFDIR | 0o755) << 16
        zf.writestr(info, b"")
    for name, path, mode in entries:
        info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
        info.external_attr = (stat.S_IFREG | mode) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        info.file_size = os.path.getsize(path)
        with open(path, "rb") as src, zf.open(info, "w") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
os.replace(tmp, out)
print(out)
PY
