# CRIU detection, sourced by deploy/install (and by tests/test_installer.sh-style tests).
# gfvm needs CRIU >= 4 whose `criu check` passes; Debian 12's 3.17 fails on new kernels
# ("vdso: Unexpected rt vDSO area bounds"), so such a system criu is ignored and a
# known-good release is built instead.

GFVM_CRIU_MIN_MAJOR=4

# criu_version BIN: prints "MAJOR.MINOR[.SUBLEVEL]" of BIN, or nothing when BIN does not run.
criu_version() {
    local out
    out=$("$1" --version 2>/dev/null) || return 1
    printf '%s\n' "$out" | sed -n 's/^Version: *\([0-9][0-9.]*\).*/\1/p' | head -n 1
}

# criu_usable BIN: succeeds when BIN is CRIU >= 4 and `BIN check` passes. Says why not on stderr.
criu_usable() {
    local bin=$1 version major
    if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "$bin" ]; then
        echo "criu: $bin not found" >&2
        return 1
    fi
    version=$(criu_version "$bin")
    if [ -z "$version" ]; then
        echo "criu: $bin --version printed no version" >&2
        return 1
    fi
    major=${version%%.*}
    if [ "$major" -lt "$GFVM_CRIU_MIN_MAJOR" ]; then
        echo "criu: $bin is version $version, gfvm needs >= $GFVM_CRIU_MIN_MAJOR" >&2
        return 1
    fi
    if ! "$bin" check >/dev/null 2>&1; then
        echo "criu: $bin (version $version) fails \`criu check\` on this kernel" >&2
        return 1
    fi
    return 0
}

# criu_choose SYSTEM_BIN BUILT_BIN: prints "system" (the distribution's criu is usable),
# "built" (a cached earlier build is usable) or "build" (nothing usable: build it).
criu_choose() {
    local system_bin=$1 built_bin=$2
    if criu_usable "$system_bin"; then
        echo system
    elif [ -x "$built_bin" ] && criu_usable "$built_bin"; then
        echo built
    else
        echo build
    fi
}
