"""memguard as a package and a command: version, --help, completion, man page, journal catalog, wheel.

Real tools throughout: bash (with and without the bash-completion
package) and zsh complete real command lines with the generated scripts;
groff formats the man page; journalctl compiles the catalog; and the
slow test builds the sdist and the wheel with ``python -m build``,
installs the wheel into a fresh virtual environment and runs the installed
``memguard``. A test whose tool is missing skips, saying which.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from daemonkit import HELPERS, MEMGUARD, REPO
from memguard import __version__
from memguard.catalog import ENTRIES, render as render_catalog
from memguard.cli import build_parser
from memguard.commands import completion, helptext, manpage
from memguard.report.journald import MESSAGE_IDS


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)  # type: ignore[call-overload]


# ---------------------------------------------------------------------------
# The command


def test_python_dash_m_memguard_and_one_version() -> None:
    """`python -m memguard` is the command (no console script needed); `--version` prints the version
    written once, in memguard/__init__.py, which is also the installed distribution's version."""
    r = run([sys.executable, "-m", "memguard", "--version"])
    assert r.returncode == 0 and r.stdout.strip() == f"memguard {__version__}", r.stdout + r.stderr
    assert importlib.metadata.version("memguard") == __version__
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    r = run([sys.executable, "-m", "memguard"])
    assert r.returncode == 2 and "COMMAND" in r.stderr


def test_every_subcommand_help_has_a_description_examples_and_defaults() -> None:
    """Every subcommand's --help has a description of its own and an examples section, kept as written
    (line breaks intact); options with a default say it (the daemon's config path, the socket rules)."""
    names = list(helptext.subparsers(build_parser()))
    assert {"daemon", "run", "ctl", "check", "events", "install", "completion"} <= set(names)
    for name in names:
        r = run([*MEMGUARD, name, "--help"])
        assert r.returncode == 0, r.stderr
        out = r.stdout
        sub = helptext.subparsers(build_parser())[name]
        assert sub.description and sub.description.splitlines()[0] in out, name
        assert "examples:" in out, name
        assert "\n  memguard " in out or "\n  source <(memguard completion" in out, name
    daemon = run([*MEMGUARD, "daemon", "--help"]).stdout
    assert "(default:\n" in daemon or "(default: /etc/memguard/memguard.yaml)" in " ".join(daemon.split())
    assert "/etc/memguard/memguard.yaml" in daemon and "78" in daemon
    ctl = " ".join(run([*MEMGUARD, "ctl", "--help"]).stdout.split())
    assert "$MEMGUARD_SOCKET" in ctl and "/run/memguard/control.sock" in ctl and "/tmp/memguard-UID" in ctl
    main_help = run([*MEMGUARD, "--help"]).stdout
    assert "examples:" in main_help and "man memguard" in main_help


#: An instruction that installs the name memguard from the package index (someone else's project).
INDEX_INSTALL = re.compile(r"""pip3? install( -U| --upgrade)? +['"]?memguard(\[[a-z,]+\])?['"]?([^A-Za-z0-9_./-]|$)""")


def test_no_instruction_installs_memguard_from_the_package_index() -> None:
    """No line of README.md, docs/ or examples/ tells anyone to install the name `memguard` from the
    package index, which belongs to an unrelated project; the install docs say so plainly."""
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").rglob("*")), *sorted((REPO / "examples").rglob("*"))]:
        if path.is_file() and path.suffix in (".md", ".txt", ".py", ".yaml", ".yml", ".sh", ""):
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if INDEX_INSTALL.search(line):
                    found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, found
    assert INDEX_INSTALL.search("sudo pip install memguard") and INDEX_INSTALL.search("pip install 'memguard[optuna]'")
    assert not INDEX_INSTALL.search("pip install ./memguard") and not INDEX_INSTALL.search("pip install memguard/dist/x.whl")
    assert "belongs to another, unrelated project" in (REPO / "docs" / "install.md").read_text()


# ---------------------------------------------------------------------------
# Shell completion


def _words(line: str) -> list[str]:
    words = line.split(" ")
    return words


def bash_complete(script: Path, line: str, with_bash_completion: bool) -> list[str]:
    """The matches bash offers after ``line`` (a trailing space: a new word), through the script's
    completion function, as bash's `complete -F` would call it."""
    words = _words(line)
    prelude = "source /usr/share/bash-completion/bash_completion; " if with_bash_completion else ""
    code = (prelude + 'source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; '
            'COMP_POINT=${#COMP_LINE}; _memguard; printf "%s\\n" "${COMPREPLY[@]}"')
    r = run(["bash", "--norc", "--noprofile", "-c", code, "bash", str(script), *words], cwd=REPO)
    assert r.returncode == 0, r.stderr
    return [w for w in r.stdout.splitlines() if w]


# (line, what must be offered, whether nothing else may be)
CASES = [
    ("memguard ", {"daemon", "run", "ctl", "check", "events", "install", "completion"}, False),
    ("memguard --v", {"--version"}, True),
    ("memguard da", {"daemon"}, True),
    ("memguard daemon --log-f", {"--log-format"}, True),
    ("memguard daemon --log-format ", {"auto", "console", "json", "journald"}, True),
    ("memguard ctl ", {"status", "reload", "stop", "start", "restart"}, True),
    ("memguard completion ", {"bash", "zsh"}, True),
    ("memguard check src/memguard/da", {"src/memguard/daemon.py", "src/memguard/data"}, True),
    ("memguard daemon -c src/memguard/data/memguard.y", {"src/memguard/data/memguard.yaml"}, True),
    ("memguard run --memory-max 8GiB -- python3 src/memguard/cli", {"src/memguard/cli.py", "src/memguard/client.py"},
     True),
]


@pytest.mark.parametrize("with_bash_completion", [False, True], ids=["plain-bash", "bash-completion"])
def test_bash_completes_commands_options_choices_and_paths(tmp_path: Path, with_bash_completion: bool) -> None:
    """The generated bash script, sourced into a real bash (alone, and with the bash-completion package's
    helpers loaded), completes the subcommands, each command's options, the choices of an option or a
    positional, paths where a path is expected, and a command name after `memguard run --`."""
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    if with_bash_completion and not os.path.exists("/usr/share/bash-completion/bash_completion"):
        pytest.skip("the bash-completion package is not installed")
    script = tmp_path / "memguard.bash"
    script.write_text(completion.bash_script(build_parser()))
    for line, expected, exact in CASES:
        got = set(bash_complete(script, line, with_bash_completion))
        assert (got == expected) if exact else (expected <= got), (line, got)
    assert "sh" in bash_complete(script, "memguard run -- s", with_bash_completion)


def test_zsh_completes_commands_options_choices_and_paths(tmp_path: Path) -> None:
    """The generated zsh script, loaded by compinit in a real interactive zsh (in a pseudo-terminal,
    tests/helpers/zsh_complete.zsh), completes what the bash one does; an _arguments spec zsh cannot
    parse fails the test."""
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed")
    fdir = tmp_path / "functions"
    fdir.mkdir()
    (fdir / "_memguard").write_text(completion.zsh_script(build_parser()))
    r = run(["zsh", "-n", str(fdir / "_memguard")])
    assert r.returncode == 0, r.stderr
    for line, expected, exact in CASES + [("memguard run -- pytho", {"python3"}, False)]:
        out = tmp_path / "matches"
        out.unlink(missing_ok=True)
        line = re.sub(r"(?<= )(src/)", str(REPO) + "/src/", line)  # zsh runs elsewhere: absolute paths
        r = run(["zsh", "-f", str(HELPERS / "zsh_complete.zsh"), str(fdir), str(out), *_words(line)], cwd=REPO)
        assert r.returncode == 0, (line, r.stderr[-2000:])
        got = set(out.read_text().split("\n")) - {""} if out.exists() else set()
        want = {w.split("/")[-1] for w in expected}  # zsh hands compadd the names, the directory apart
        assert (got == want) if exact else (want <= got), (line, got)


def test_completion_command_prints_the_scripts() -> None:
    """`memguard completion bash|zsh` prints the scripts the install step writes."""
    parser = build_parser()
    assert run([*MEMGUARD, "completion", "bash"]).stdout == completion.bash_script(parser)
    assert run([*MEMGUARD, "completion", "zsh"]).stdout == completion.zsh_script(parser)


# ---------------------------------------------------------------------------
# The man page


def test_man_page_formats_without_warnings_and_covers_every_command(tmp_path: Path) -> None:
    """memguard(8), rendered from the parser, formats with groff's man macros with all warnings on and
    none given; the text names every subcommand and every option, the files and the exit statuses."""
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    page = manpage.render(date="2026-01-01")
    src = tmp_path / "memguard.8"
    src.write_text(page)
    r = run(["groff", "-man", "-Tutf8", "-ww", "-rLL=100n", str(src)], env={**os.environ, "LANG": "C.UTF-8"})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    text = re.sub(r".\x08", "", r.stdout)  # overstrike (bold, underline) to plain text
    assert text.startswith("MEMGUARD(8)")
    for name, sub in helptext.subparsers(build_parser()).items():
        assert f"memguard {name}" in text, name
        for action in sub._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            for flag in action.option_strings:
                assert flag in text, (name, flag)
    for needle in ("/etc/memguard/memguard.yaml", "/run/memguard/control.sock", "EXIT STATUS", "78", "SIGHUP",
                   "MEMGUARD_SOCKET", "journalctl"):
        assert needle in text, needle


def test_man_page_escapes_troff_syntax() -> None:
    """Text that would be troff syntax (a leading dot or quote, backslashes, hyphens) is escaped."""
    assert manpage.escape(".hidden") == "\\&.hidden"
    assert manpage.escape("'quoted") == "\\&'quoted"
    assert manpage.escape("a\\b --x") == "a\\eb \\-\\-x"


# ---------------------------------------------------------------------------
# The journal message catalog


def test_catalog_has_an_entry_for_every_message_id() -> None:
    """Every MESSAGE_ID memguard sends has a catalog entry (subject, and a body saying what to do), and
    the catalog has no entry for an id memguard does not send."""
    assert set(ENTRIES) == set(MESSAGE_IDS)
    text = render_catalog()
    ids = re.findall(r"^-- ([0-9a-f]{32})$", text, re.M)
    assert sorted(ids) == sorted(MESSAGE_IDS.values())
    for event, (subject, body) in ENTRIES.items():
        assert subject and len(body.split("\n\n")) >= 2, event


def test_journalctl_compiles_and_lists_the_catalog(tmp_path: Path) -> None:
    """`journalctl --update-catalog` (with --root, on a tree laid out by `memguard install --root`)
    compiles memguard.catalog from /usr/local/lib/systemd/catalog/ without complaint; `--list-catalog`
    then lists every memguard MESSAGE_ID with its subject and `--dump-catalog` gives the text."""
    if shutil.which("journalctl") is None:
        pytest.skip("journalctl is not installed")
    r = run([*MEMGUARD, "install", "--root", str(tmp_path)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "usr/local/lib/systemd/catalog/memguard.catalog").exists()
    r = run(["journalctl", "--root", str(tmp_path), "--update-catalog"])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    listed = run(["journalctl", "--root", str(tmp_path), "--list-catalog"]).stdout
    found = dict(line.split(" ", 1) for line in listed.splitlines() if line.strip())
    for event, mid in MESSAGE_IDS.items():
        assert found.get(mid) == f"memguard: {ENTRIES[event][0]}", (event, found.get(mid))
    dump = run(["journalctl", "--root", str(tmp_path), "--dump-catalog", MESSAGE_IDS["reload_failed"]]).stdout
    assert "memguard check /etc/memguard" in dump and "Documentation: man:memguard(8)" in dump


# ---------------------------------------------------------------------------
# The distribution


def _no_host_checks() -> list[str]:
    """`--no-host-checks` where `memguard check` has it: the shipped example runs as user `ml`, which a
    test machine need not have."""
    return ["--no-host-checks"] if "--no-host-checks" in run([*MEMGUARD, "check", "--help"]).stdout else []


@pytest.mark.slow
def test_built_wheel_installs_into_a_fresh_venv_and_runs(tmp_path: Path) -> None:
    """`python -m build` makes an sdist (with LICENSE, the docs and the whole test-suite: helpers,
    configurations, kits) and a wheel built from that sdist (with LICENSE, the unit, the default
    configuration and the catalog). Installed into a fresh virtual environment, the wheel's `memguard`
    reports the version, installs itself into a directory tree, checks the configuration it installed,
    and the test-suite's configuration tests pass when run from the unpacked sdist."""
    dist = tmp_path / "dist"
    r = run([sys.executable, "-m", "build", "--outdir", str(dist), str(REPO)], cwd=tmp_path)
    if r.returncode != 0 and re.search(r"No matching distribution|Could not find a version|network", r.stdout
                                       + r.stderr):
        pytest.skip(f"python -m build needs setuptools from a package index: {r.stdout[-500:]}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sdist = next(dist.glob("memguard-*.tar.gz"))
    wheel = next(dist.glob("memguard-*.whl"))

    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for needed in ("LICENSE", "README.md", "pyproject.toml", "MANIFEST.in", "docs/service.md",
                   "tests/daemonkit.py", "tests/corekit.py", "tests/controlkit.py", "tests/userkit.py",
                   "tests/helpers/worker_mem.py", "tests/helpers/zsh_complete.zsh",
                   "tests/configs/good/memguard.yaml", "tests/configs/broken/typo_key.yaml",
                   "systemd/memguard.service", "config/demo/memguard.yaml", "constraints/oldest.txt",
                   "src/memguard/data/memguard.catalog"):
        assert needed in names, needed
    assert not [n for n in names if "__pycache__" in n]
    with zipfile.ZipFile(wheel) as zf:
        wnames = set(zf.namelist())
        meta = zf.read(next(n for n in wnames if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wnames), sorted(wnames)
    for data in ("memguard.service", "memguard.yaml", "workloads.d/example.yaml", "memguard.catalog"):
        assert f"memguard/data/{data}" in wnames, data
    assert "memguard/__main__.py" in wnames and "memguard/py.typed" in wnames
    assert f"Version: {__version__}" in meta and "License-Expression: Apache-2.0" in meta
    assert "Classifier: Operating System :: POSIX :: Linux" in meta

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    r = run([str(py), "-m", "pip", "install", "--disable-pip-version-check", str(wheel), "pytest"],
            cwd=tmp_path)
    if r.returncode != 0 and re.search(r"No matching distribution|Could not find a version", r.stdout + r.stderr):
        pytest.skip(f"the wheel's dependencies are not reachable from here: {r.stdout[-500:]}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # A dependency without a wheel (sdnotify) is built as a wheel, never installed by the legacy setup.py path.
    assert "setup.py install" not in r.stdout + r.stderr, r.stdout[-3000:]

    mg = env_dir / "bin" / "memguard"
    r = run([str(mg), "--version"], cwd=tmp_path)
    assert r.stdout.strip() == f"memguard {__version__}"
    root = tmp_path / "root"
    r = run([str(mg), "install", "--root", str(root)], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run([str(mg), "check", *_no_host_checks(), str(root / "etc/memguard")], cwd=tmp_path)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr

    src = tmp_path / "sdist"
    with tarfile.open(sdist) as tf:
        tf.extractall(src, filter="data") if sys.version_info >= (3, 12) else tf.extractall(src)
    tree = next(src.iterdir())
    r = run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_config.py"],
            cwd=tree, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
