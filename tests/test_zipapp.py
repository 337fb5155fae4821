"""The shipped file: dist/memory-backfill as built by build_zipapp.sh."""

import hashlib
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, build_zipapp

PYENV = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
MAX_SIZE = 1_500_000


def pyenv_python(minor: str):
    """The newest pyenv python3.<minor>, if this machine has one."""
    found = sorted(PYENV.glob("3.%s.*/bin/python3" % minor)) if PYENV.is_dir() else []
    return str(found[-1]) if found else None


def run(python, path, *args, env=None):
    """Run the file isolated: no site-packages, no environment but `env`."""
    return subprocess.run(
        [python, "-I", "-S", str(path), *args],
        capture_output=True,
        text=True,
        env=env or {},
        timeout=60,
    )


def test_two_builds_in_different_folders_are_byte_identical(tmp_path, zipapp_file):
    again = build_zipapp(tmp_path / "elsewhere" / "memory-backfill")
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (zipapp_file, again)]
    assert digest[0] == digest[1]


def test_file_shape(zipapp_file):
    data = zipapp_file.read_bytes()
    assert data.startswith(b"#!/usr/bin/env python3\n")
    assert os.stat(zipapp_file).st_mode & 0o111 == 0o111
    assert len(data) < MAX_SIZE
    with zipfile.ZipFile(zipapp_file) as archive:
        names = archive.namelist()
        infos = archive.infolist()
        contents = b"".join(archive.read(n) for n in names)
    assert names == sorted(names)
    assert "__main__.py" in names and "memory_backfill.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    for package in ("pg8000", "scramp", "urllib3", "asn1crypto", "dateutil", "six"):
        assert any(n.startswith(package) for n in names), package
    assert any(re.match(r"pg8000-[\d.]+\.dist-info/METADATA", n) for n in names)
    assert any(re.match(r"scramp-[\d.]+\.dist-info/METADATA", n) for n in names)
    assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert {i.compress_type for i in infos} == {zipfile.ZIP_DEFLATED}
    assert str(ROOT).encode() not in contents and b"/tmp/tmp" not in contents


def test_version_with_nothing_installed(zipapp_file):
    done = subprocess.run(
        ["env", "-i", sys.executable, "-I", "-S", str(zipapp_file), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(
        r"memory-backfill \S+ \(pg8000 1\.31\.5, urllib3 2\.8\.0, Python 3\.\d+\.\d+\)\n",
        done.stdout,
    )


@pytest.mark.parametrize("minor", ["10", "11", "12", "13"])
def test_every_mode_runs_on_every_python_from_3_10(zipapp_file, legacy, plugin, minor):
    python = pyenv_python(minor)
    if python is None:
        pytest.skip("no Python 3.%s on this machine" % minor)
    done = run(python, zipapp_file, "--version")
    assert done.returncode == 0 and "Python 3.%s." % minor in done.stdout, done.stderr
    legacy.create_schema()
    root = legacy.workspace()
    ids = [
        legacy.memory(root, "fact %d for the tenant" % i, scope)
        for i, scope in enumerate(["LOCAL", "TEAM", "GLOBAL"])
    ]
    env = {"DATABASE_URL": legacy.url, "MEMORY_PLUGIN_URL": plugin.url}
    done = run(python, zipapp_file, "-dry-run", env=env)
    assert done.returncode == 0 and plugin.count() == 0, done.stderr
    done = run(python, zipapp_file, "-apply", env=env)
    assert done.returncode == 0 and sorted(plugin.records()) == sorted(ids), done.stderr
    done = run(python, zipapp_file, "-verify", env=env)
    assert done.returncode == 0 and "matches=3 mismatches=0 errors=0" in done.stdout, done.stderr
    done = run(python, zipapp_file, "-rollback", "--yes", env=env)
    assert done.returncode == 0 and plugin.count() == 0, done.stderr


@pytest.mark.parametrize("minor", ["8", "9"])
def test_refuses_python_before_3_10_in_one_sentence(zipapp_file, minor):
    python = pyenv_python(minor)
    if python is None:
        pytest.skip("no Python 3.%s on this machine" % minor)
    found = python.split("/")[-3]
    for args in (["--version"], ["--help"], ["-apply"]):
        done = run(python, zipapp_file, *args)
        assert (done.returncode, done.stdout) == (2, "")
        assert done.stderr == (
            "memory-backfill: needs Python 3.10 or newer, this is %s; run it with a newer python3: "
            "in the tenant image, Alpine's python3 package; on RHEL-family 9 hosts (whose python3 "
            "is 3.9), python3.11 or python3.12 (dnf install python3.12); elsewhere, your "
            "distribution's newer python3 package.\n" % found
        )


def test_help_and_version_import_neither_driver(zipapp_file):
    for flag in ("--help", "--version"):
        done = subprocess.run(
            [sys.executable, "-I", "-X", "importtime", str(zipapp_file), flag],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0
        imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines()}
        assert not {m for m in imported if m.split(".")[0] in ("pg8000", "urllib3")}, flag
    assert "exit statuses:" in done.stdout or flag == "--version"


def test_help_of_the_file_is_the_modules_own(zipapp_file):
    """The file prints a help text rendered at build time; it must be the module's."""
    module = subprocess.run(
        [sys.executable, "-I", str(ROOT / "memory_backfill.py"), "--help"],
        capture_output=True,
        text=True,
        env={"COLUMNS": "80"},
        timeout=60,
    )
    for flag in ("--help", "-h"):
        assert run(sys.executable, zipapp_file, flag).stdout == module.stdout


def test_help_a_newcomer_can_act_on(zipapp_file):
    done = run(sys.executable, zipapp_file, "--help")
    assert done.returncode == 0
    for text in (
        "-dry-run",
        "-apply",
        "-verify",
        "-workspace UUID",
        "-limit N",
        "-verify-sample N",
        "--database-url",
        "--plugin-url",
        "--json",
        "--no-redact",
        "DATABASE_URL",
        "MEMORY_PLUGIN_URL",
        "exit statuses:",
        "  3    a dependency is unusable",
        "--checkpoint FILE",
        "--failures FILE",
        "--max-rate N",
        "--concurrency N",
    ):
        assert text in done.stdout, text


def _unprivileged():
    """(python, subprocess kwargs): a system python3 run as `nobody` when we are root."""
    system_python = "/usr/bin/python3"
    if os.geteuid() != 0 or not os.path.exists(system_python):
        return sys.executable, {}
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        return sys.executable, {}
    return system_python, {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def test_runs_from_a_read_only_folder_as_an_unprivileged_user(zipapp_file, legacy, plugin):
    legacy.create_schema()
    root = legacy.workspace()
    ids = [
        legacy.memory(root, "fact %d for the tenant" % i, scope)
        for i, scope in enumerate(["LOCAL", "TEAM", "GLOBAL"])
    ]
    folder = Path(tempfile.mkdtemp(prefix="memory-backfill-ro-"))  # reachable by `nobody`
    shutil.copy(zipapp_file, folder / "memory-backfill")
    folder.chmod(0o555)
    python, kwargs = _unprivileged()
    env = {
        "DATABASE_URL": legacy.url,
        "MEMORY_PLUGIN_URL": plugin.url,
        "HOME": "/nonexistent",
        "PATH": "/usr/bin:/bin",
    }

    def tool(*args):
        return subprocess.run(
            [python, str(folder / "memory-backfill"), *args],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            **kwargs,
        )

    try:
        assert tool("--help").returncode == 0
        done = tool("-dry-run")
        assert done.returncode == 0 and done.stdout.endswith(
            "Dry run complete (nothing written): scanned=3 copied=3 skipped=0 errors=0\n"
        ), done.stderr
        assert plugin.count() == 0
        done = tool("-apply")
        assert done.returncode == 0, done.stderr
        assert sorted(plugin.records()) == sorted(ids)
        done = tool("-verify")
        assert done.returncode == 0 and done.stdout.endswith(
            "Verify complete: workspaces_sampled=1 matches=3 mismatches=0 errors=0\n"
        ), done.stdout
        assert sorted(p.name for p in folder.iterdir()) == ["memory-backfill"]  # wrote nothing
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)


# --- Dockerfile.tenant (no Docker engine here: check what it says) -------------------


def dockerfile_stages():
    """[(FROM line, [instructions])] with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile.tenant").read_text())
    stages, preamble = [], []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append((line, []))
        elif stages:
            stages[-1][1].append(line)
        else:
            preamble.append(line)
    return preamble, stages


def test_dockerfile_builds_in_alpine_python_and_layers_on_the_tenant_image():
    preamble, stages = dockerfile_stages()
    assert [line for line in preamble if line.startswith("ARG TENANT_IMAGE")]
    (builder_from, builder), (runtime_from, runtime) = stages
    assert re.match(r"FROM python:[\d.]+-alpine[\d.]* AS builder$", builder_from)
    build = " ".join(i for i in builder if i.startswith("RUN"))
    assert "./build_zipapp.sh /out/memory-backfill" in build
    assert "python3 -I /out/memory-backfill --version" in build
    assert runtime_from == "FROM ${TENANT_IMAGE}"
    runs = [i for i in runtime if i.startswith("RUN")]
    assert runs == ["RUN apk add --no-cache python3"]
    copies = [i for i in runtime if i.startswith("COPY")]
    assert copies == [
        "COPY --from=builder --chown=1000:1000 --chmod=0755 /out/memory-backfill /memory-backfill"
    ]
    assert not [i for i in runtime if i.split()[0] in ("ENTRYPOINT", "CMD", "ONBUILD")]
    assert runtime[-1] == "USER 1000"  # back to the unprivileged runtime user (canvas)


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (make lint installs it)")
    done = subprocess.run(
        [hadolint, str(ROOT / "Dockerfile.tenant")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
