"""Release artifacts of scripts/build_wheels.sh: the repaired wheel and the sdist in wheelhouse/.

Checks, for the repaired wheel: a manylinux tag (file name and WHEEL) no newer than
manylinux_2_28 (torch's own policy), nothing grafted by auditwheel (no ``kfac_fast.libs/``), the
``readelf -d`` NEEDED entries of ``_C*.so`` (only glibc/libstdc++/libgcc; never libtorch, libc10,
libcudart, libcuda: a CUDA build opens libcuda.so.1 with dlopen at the first CUDA op), no
RPATH/RUNPATH into a build machine's folders, every imported symbol version (GLIBC, GLIBCXX,
CXXABI, GCC) within manylinux_2_28 and within the tag, only ``PyInit__C`` exported, the build
record, and the ``Requires-Dist`` bound on torch (present, justified by the APIs the code uses,
satisfied by the installed torch). For the sdist: sources present, build outputs absent.

The wheelhouse is $KFAC_FAST_WHEELHOUSE (default: wheelhouse/ of the repository). Without one the
tests skip, unless KFAC_FAST_REQUIRE_WHEEL=1 (scripts/test.sh sets it), which makes them fail.
The checker functions are also tested on inputs that must be rejected, the raw linux_x86_64
wheel (dist/) included when it is there.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE = Path(os.environ.get("KFAC_FAST_WHEELHOUSE", ROOT / "wheelhouse"))
REQUIRED = os.environ.get("KFAC_FAST_REQUIRE_WHEEL", "0") not in ("", "0")

# The oldest torch with torch.library.custom_op and .register_fake (every kernel family is a
# custom op with a fake implementation): 2.4. Nothing else used by python/kfac_fast is newer.
TORCH_API_FLOOR = Version("2.4")
# What the native module may link: glibc, libstdc++, libgcc (a subset of every manylinux policy).
ALLOWED_NEEDED = {"libc.so.6", "libm.so.6", "libgcc_s.so.1", "libstdc++.so.6", "ld-linux-x86-64.so.2",
                  "libpthread.so.0", "libdl.so.2", "librt.so.1"}
BANNED_NEEDED = re.compile(r"libtorch|libc10|libcudart|libcuda\b|libcuda\.so|libcublas|libnvrtc|libpython")
MANYLINUX = re.compile(r"^manylinux_(\d+)_(\d+)_x86_64$")
# The release target: torch's own wheels are manylinux_2_28 (glibc >= 2.28: RHEL 8, Ubuntu 20.04).
TARGET_GLIBC = (2, 28)
# The newest symbol version of each library that manylinux_2_28 allows on x86_64, from
# auditwheel's policy/manylinux-policy.json ("symbol_versions", auditwheel 6.8.2): glibc 2.28 and
# the libstdc++/libgcc of its toolchain (GCC 8's GLIBCXX_3.4.25 is already out: the policy stops at
# GLIBCXX_3.4.24 and CXXABI_1.3.11). test_pinned_limits_match_auditwheel_policy re-reads the JSON
# wherever auditwheel is installed. Non-numeric versions (CXXABI_FLOAT128, CXXABI_TM_1) are allowed.
MANYLINUX_2_28_MAX = {"GLIBC": (2, 28), "GLIBCXX": (3, 4, 24), "CXXABI": (1, 3, 11), "GCC": (7, 0, 0)}
# What _C may export: the module's init function only (csrc/compat/exports.map), so its local
# copies of libstdc++ functions never stand in for libstdc++'s own.
ALLOWED_EXPORTS = {"PyInit__C"}


# ---------------------------------------------------------------------------- checkers
def wheel_tag_problems(filename: str, wheel_file_text: str) -> list[str]:
    """Problems with the platform tags of a wheel's file name and its WHEEL file."""
    problems = []
    plats = filename[:-len(".whl")].split("-")[-1].split(".")
    for plat in plats:
        if not MANYLINUX.match(plat):
            problems.append(f"file name platform tag {plat!r} is not manylinux_X_Y_x86_64")
    tags = [line.split(":", 1)[1].strip() for line in wheel_file_text.splitlines() if line.startswith("Tag:")]
    if not tags:
        problems.append("WHEEL has no Tag lines")
    for tag in tags:
        if not MANYLINUX.match(tag.split("-")[-1]):
            problems.append(f"WHEEL tag {tag!r} is not manylinux")
    if "Root-Is-Purelib: false" not in wheel_file_text:
        problems.append("WHEEL does not say Root-Is-Purelib: false")
    return problems


def needed_problems(needed: list[str]) -> list[str]:
    """Problems with the NEEDED entries of the native module."""
    problems = [f"links {n}" for n in needed if BANNED_NEEDED.search(n)]
    problems += [f"needs {n}, outside glibc/libstdc++/libgcc" for n in needed
                 if n not in ALLOWED_NEEDED and not BANNED_NEEDED.search(n)]
    return problems


def runpath_problems(dynamic_section: str) -> list[str]:
    """RPATH/RUNPATH entries other than $ORIGIN-relative ones (a build machine's folders)."""
    problems = []
    for kind, paths in re.findall(r"\((RPATH|RUNPATH)\)\s+Library (?:rpath|runpath): \[([^\]]*)\]", dynamic_section):
        problems += [f"{kind} {p}" for p in paths.split(":") if p and not p.startswith("$ORIGIN")]
    return problems


def glibc_problems(glibc_versions: set[tuple[int, int]], plat: str) -> list[str]:
    """Symbol versions GLIBC_2.Y newer than the manylinux_2_Y tag allows."""
    m = MANYLINUX.match(plat)
    if not m:
        return [f"{plat!r} is not a manylinux tag"]
    limit = (int(m.group(1)), int(m.group(2)))
    return [f"references GLIBC_{a}.{b} > tag {plat}" for a, b in sorted(glibc_versions) if (a, b) > limit]


def target_tag_problems(plat: str) -> list[str]:
    """The wheel's manylinux tag must be manylinux_2_28 or older (what torch supports)."""
    m = MANYLINUX.match(plat)
    if not m:
        return [f"{plat!r} is not a manylinux tag"]
    if (int(m.group(1)), int(m.group(2))) > TARGET_GLIBC:
        return [f"tag {plat} is newer than manylinux_{TARGET_GLIBC[0]}_{TARGET_GLIBC[1]} (torch's policy)"]
    return []


def symbol_version_problems(versions: dict[str, set[str]]) -> list[str]:
    """Imported symbol versions ({"GLIBCXX_3.4.29": {symbols}}) beyond manylinux_2_28's limits."""
    problems = []
    for version, symbols in sorted(versions.items()):
        m = re.fullmatch(r"(GLIBC|GLIBCXX|CXXABI|GCC)_([\d.]+)", version)
        if not m:
            if not re.fullmatch(r"CXXABI_(FLOAT128|TM_1)", version):
                problems.append(f"unknown symbol version {version} ({', '.join(sorted(symbols)[:3])})")
            continue
        lib, number = m.group(1), tuple(int(x) for x in m.group(2).split("."))
        limit = MANYLINUX_2_28_MAX[lib]
        if number > limit:
            problems.append(f"{version} > manylinux_2_28's {lib}_{'.'.join(map(str, limit))}: "
                            f"{', '.join(sorted(symbols)[:5])}")
    return problems


def export_problems(exported: set[str]) -> list[str]:
    """Defined dynamic symbols other than the module's init function."""
    return [f"exports {name}" for name in sorted(exported - ALLOWED_EXPORTS)]


def torch_requirement_problems(requires_dist: list[str]) -> list[str]:
    """The Requires-Dist entry for torch must exist and carry a lower bound >= TORCH_API_FLOOR."""
    reqs = [Requirement(r) for r in requires_dist]
    torch_reqs = [r for r in reqs if r.name == "torch" and r.marker is None]
    if len(torch_reqs) != 1:
        return [f"expected one unconditional Requires-Dist on torch, got {[str(r) for r in torch_reqs]}"]
    lows = [Version(s.version) for s in torch_reqs[0].specifier if s.operator in (">=", ">", "~=", "==")]
    if not lows:
        return [f"torch requirement {torch_reqs[0]} has no lower bound"]
    if max(lows) < TORCH_API_FLOOR:
        return [f"torch lower bound {max(lows)} is below {TORCH_API_FLOOR} (torch.library.custom_op)"]
    return []


# ---------------------------------------------------------------------------- ELF helpers
def readelf(args: list[str], path: Path) -> str:
    return subprocess.run(["readelf", *args, str(path)], capture_output=True, text=True, check=True).stdout


def needed_of(so: Path) -> list[str]:
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", readelf(["-d", "-W"], so))


def glibc_versions_of(so: Path) -> set[tuple[int, int]]:
    """GLIBC_X.Y versions of the undefined (imported) dynamic symbols."""
    out = readelf(["--dyn-syms", "-W"], so)
    return {(int(a), int(b)) for a, b in re.findall(r"\bUND\s+\S+@GLIBC_(\d+)\.(\d+)", out)}


def symbol_versions_of(so: Path) -> dict[str, set[str]]:
    """{version: imported symbols} of the undefined dynamic symbols that carry a version."""
    versions: dict[str, set[str]] = {}
    for name, version in re.findall(r"\bUND\s+([^\s@]+)@(\S+)", readelf(["--dyn-syms", "-W"], so)):
        versions.setdefault(version, set()).add(name)
    return versions


def exports_of(so: Path) -> set[str]:
    """Defined GLOBAL/WEAK dynamic symbols (what other objects could bind to)."""
    out = readelf(["--dyn-syms", "-W"], so)
    return {m.group(1).split("@")[0] for m in re.finditer(
        r"^\s*\d+:\s+\S+\s+\d+\s+\S+\s+(?:GLOBAL|WEAK)\s+DEFAULT\s+(?!UND)\S+\s+(\S+)", out, re.M)}


def extract_so(whl: Path, dest: Path) -> Path:
    with zipfile.ZipFile(whl) as z:
        names = [n for n in z.namelist() if re.fullmatch(r"kfac_fast/_C[^/]*\.so", n)]
        assert len(names) == 1, f"{whl.name}: expected one kfac_fast/_C*.so, got {names}"
        z.extract(names[0], dest)
    return dest / names[0]


def wheel_text(whl: Path, member: str) -> str:
    with zipfile.ZipFile(whl) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/" + member))
        return z.read(name).decode()


def requires_dist(metadata: str) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]


def all_problems(whl: Path, tmp: Path) -> list[str]:
    problems = wheel_tag_problems(whl.name, wheel_text(whl, "WHEEL"))
    with zipfile.ZipFile(whl) as z:
        problems += [f"auditwheel grafted {n}" for n in z.namelist() if n.startswith("kfac_fast.libs/")]
    so = extract_so(whl, tmp)
    problems += needed_problems(needed_of(so))
    problems += runpath_problems(readelf(["-d", "-W"], so))
    plat = whl.name[:-len(".whl")].split("-")[-1].split(".")[0]
    problems += glibc_problems(glibc_versions_of(so), plat)
    problems += target_tag_problems(plat)
    problems += symbol_version_problems(symbol_versions_of(so))
    problems += export_problems(exports_of(so))
    problems += torch_requirement_problems(requires_dist(wheel_text(whl, "METADATA")))
    return problems


# ---------------------------------------------------------------------------- fixtures
def _one(pattern: str) -> Path:
    found = sorted(WHEELHOUSE.glob(pattern))
    if not found:
        msg = f"no {pattern} in {WHEELHOUSE}; run scripts/build_wheels.sh"
        if REQUIRED:
            pytest.fail(msg)
        pytest.skip(msg)
    assert len(found) == 1, f"several {pattern} in {WHEELHOUSE}: {found}"
    return found[0]


@pytest.fixture
def wheel() -> Path:
    return _one("kfac_fast-*.whl")


@pytest.fixture
def sdist() -> Path:
    return _one("kfac_fast-*.tar.gz")


# ---------------------------------------------------------------------------- the release wheel
def test_repaired_wheel_has_no_problems(wheel, tmp_path):
    assert all_problems(wheel, tmp_path) == []


def test_auditwheel_report_matches_the_tag(wheel):
    report = WHEELHOUSE / "auditwheel_show.txt"
    if not report.exists():
        msg = f"{report} missing (scripts/build_wheels.sh writes it; cibuildwheel does not)"
        if REQUIRED:
            pytest.fail(msg)
        pytest.skip(msg)
    plat = wheel.name[:-len(".whl")].split("-")[-1].split(".")[0]
    text = " ".join(report.read_text().split())
    assert f'consistent with the following platform tag: "{plat}"' in text, text


def test_build_record_matches_build_info(wheel):
    record = json.loads(wheel_text(wheel, "kfac_fast_build.json"))
    with zipfile.ZipFile(wheel) as z:
        build_info_py = z.read("kfac_fast/_build_info.py").decode()
    ns: dict = {}
    exec(build_info_py, ns)
    assert record["links_libtorch"] is False
    assert record["cuda"] == ns["CUDA_VERSION"] and record["cuda_archs"] == ns["CUDA_ARCHS"]
    if record["cuda"] != "none":
        assert re.fullmatch(r"\d+\.\d+\.\d+", record["cuda"]), record
        assert re.fullmatch(r"\d+[a-z]?(,\d+[a-z]?)*", record["cuda_archs"]), record


def test_installed_torch_satisfies_the_bound(wheel):
    import torch

    (req,) = [Requirement(r) for r in requires_dist(wheel_text(wheel, "METADATA")) if r.startswith("torch")]
    installed = Version(torch.__version__)
    assert req.specifier.contains(Version(installed.base_version), prereleases=True), (req, torch.__version__)


def test_sdist_is_complete(sdist):
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
        pkg_info = t.extractfile(next(m for m in t.getmembers() if m.name.endswith("/PKG-INFO"))).read().decode()
    for need in ("pyproject.toml", "CMakeLists.txt", "csrc/bindings.cpp", "python/kfac_fast/__init__.py",
                 "python/kfac_fast/_native.py", "requirements-build.txt", "cmake/embed_fatbins.cmake",
                 "csrc/compat/manylinux_compat.h", "csrc/compat/manylinux_compat.cpp", "csrc/compat/exports.map",
                 "csrc/cuda/driver.cpp"):
        assert need in names, f"sdist lacks {need}"
    assert any(n.startswith("csrc/cuda/") and n.endswith(".cu") for n in names), "sdist lacks csrc/cuda/*.cu"
    assert any(n.startswith("csrc/cpu/") and n.endswith(".cpp") for n in names), "sdist lacks csrc/cpu/*.cpp"
    stray = [n for n in names if n.split("/")[0] in ("build", "dist", "wheelhouse", ".cache") or n.endswith(".so")]
    assert not stray, f"sdist carries build outputs: {stray[:5]}"
    assert torch_requirement_problems(requires_dist(pkg_info)) == []


# ---------------------------------------------------------------------------- the checkers can fail
def test_checkers_reject_bad_inputs():
    assert wheel_tag_problems("kfac_fast-0.1.0-cp311-cp311-linux_x86_64.whl",
                              "Root-Is-Purelib: false\nTag: cp311-cp311-linux_x86_64\n")
    assert not wheel_tag_problems("kfac_fast-0.1.0-cp311-cp311-manylinux_2_28_x86_64.whl",
                                  "Root-Is-Purelib: false\nTag: cp311-cp311-manylinux_2_28_x86_64\n")
    for lib in ("libcudart.so.13", "libcuda.so.1", "libtorch_cpu.so", "libc10.so", "libgomp.so.1"):
        assert needed_problems(["libc.so.6", lib]), lib
    assert not needed_problems(["libstdc++.so.6", "libm.so.6", "libgcc_s.so.1", "libc.so.6"])
    assert runpath_problems(" 0x1d (RUNPATH)  Library runpath: [/usr/local/cuda/lib64:$ORIGIN/../kfac_fast.libs]") == [
        "RUNPATH /usr/local/cuda/lib64"]
    assert not runpath_problems(" 0x1d (RUNPATH)  Library runpath: [$ORIGIN/../kfac_fast.libs]")
    assert glibc_problems({(2, 17), (2, 34)}, "manylinux_2_28_x86_64") == [
        "references GLIBC_2.34 > tag manylinux_2_28_x86_64"]
    assert not glibc_problems({(2, 17), (2, 34)}, "manylinux_2_34_x86_64")
    assert target_tag_problems("manylinux_2_34_x86_64")
    assert not target_tag_problems("manylinux_2_28_x86_64") and not target_tag_problems("manylinux_2_17_x86_64")
    # What GCC 12 on glibc 2.36 emits without csrc/compat (the manylinux_2_34 wheel of before).
    too_new = {"GLIBC_2.34": {"pthread_once", "dlopen"}, "GLIBC_2.32": {"__libc_single_threaded"},
               "GLIBCXX_3.4.29": {"_ZSt28__throw_bad_array_new_lengthv"},
               "CXXABI_1.3.13": {"_ZNSt15__exception_ptr13exception_ptr9_M_addrefEv"}, "GLIBCXX_3.4.25": {"x"},
               "CXXABI_1.3.12": {"y"}, "GLIBC_2.29": {"exp"}, "GCC_12.0.0": {"z"}, "FOO_1.0": {"w"}}
    assert len(symbol_version_problems(too_new)) == len(too_new)
    assert not symbol_version_problems({"GLIBC_2.28": {"fcntl64"}, "GLIBC_2.2.5": {"pthread_once"},
                                        "GLIBCXX_3.4.24": {"a"}, "CXXABI_1.3.11": {"b"}, "GCC_7.0.0": {"c"},
                                        "CXXABI_FLOAT128": {"d"}, "CXXABI_TM_1": {"e"}})
    assert export_problems({"PyInit__C", "_ZNSt15__exception_ptr13exception_ptr9_M_addrefEv"}) == [
        "exports _ZNSt15__exception_ptr13exception_ptr9_M_addrefEv"]
    assert not export_problems({"PyInit__C"})
    assert torch_requirement_problems(["torch", "numpy>=1.23"])
    assert torch_requirement_problems(["torch>=2.0"])
    assert torch_requirement_problems(["numpy>=1.23"])
    assert not torch_requirement_problems(["torch>=2.4", "numpy>=1.23"])


def test_pinned_limits_match_auditwheel_policy():
    """MANYLINUX_2_28_MAX is the newest numeric version per library in auditwheel's policy."""
    try:
        import auditwheel
    except ImportError:
        pytest.skip("auditwheel not installed here (scripts/build_wheels.sh's interpreter has it)")
    policy_file = Path(auditwheel.__file__).parent / "policy" / "manylinux-policy.json"
    policies = {p["name"]: p for p in json.loads(policy_file.read_text())}
    allowed = policies["manylinux_2_28"]["symbol_versions"]["x86_64"]
    newest = {lib: max(tuple(int(x) for x in v.split(".")) for v in versions if re.fullmatch(r"[\d.]+", v))
              for lib, versions in allowed.items() if lib in MANYLINUX_2_28_MAX}
    assert newest == MANYLINUX_2_28_MAX
    for lib in ("libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1", "libpthread.so.0", "libdl.so.2"):
        assert lib in policies["manylinux_2_28"]["lib_whitelist"], lib


def test_cuda_build_opens_the_driver_lazily(wheel, tmp_path):
    """A CUDA build names libcuda.so.1 for dlopen, never as NEEDED, and carries fatbins, no runtime."""
    record = json.loads(wheel_text(wheel, "kfac_fast_build.json"))
    if record["cuda"] == "none":
        pytest.skip("CPU-only wheel")
    so = extract_so(wheel, tmp_path)
    data = so.read_bytes()
    assert b"libcuda.so.1\0" in data
    assert not [n for n in needed_of(so) if "cuda" in n]
    assert data.count(b"\x50\xed\x55\xba") >= 2, "expected the embedded fatbins (magic 0xBA55ED50)"
    assert b"cudaGetErrorString" not in data and b"libcudart" not in data, "CUDA runtime code linked in"


def test_checker_rejects_the_unrepaired_wheel(tmp_path):
    raw = sorted((ROOT / "dist").glob("kfac_fast-*-linux_x86_64.whl"))
    if not raw:
        pytest.skip("no unrepaired wheel in dist/ (scripts/build_wheels.sh leaves one)")
    problems = all_problems(raw[0], tmp_path)
    assert any("linux_x86_64" in p for p in problems), problems
