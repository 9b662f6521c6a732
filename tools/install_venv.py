"""Install the project into a venv: ``python tools/install_venv.py VENV`` (what ``make`` runs).

uv resolves the same pinned versions as pip (docs/MEASURED.md: the two venvs' package lists differ only in
how names are spelled) and installs them in parallel: 2-core machine, measured in docs/MEASURED.md.
pip is the fallback when uv cannot be installed, and ``UNCLIP_INSTALLER=pip`` asks for it.

uv reads neither pip.conf nor PIP_* variables. These machines take torch from a local wheel copy
(``find-links``), two ``file://`` extra indexes and a constraints file that caps torch at what
lies on disk; uv sent to PyPI alone would resolve other versions or none. So pip's own view of
its configuration (``pip config list``: the files, then the environment, which wins) is handed
to uv as flags: index-url, extra-index-url, find-links, constraint, no-index; cert and
default-timeout as uv's variables. Several indexes are searched as pip does, for the best
version across all of them (``--index-strategy unsafe-best-match``).

Bytecode is not compiled here: the imports compile what they use (Makefile,
PYTHONDONTWRITEBYTECODE). img2dataset pulls the Python 3.6 ``dataclasses`` backport, which
shadows the standard library and kills Prefect's local server ("unexpected keyword argument
'slots'"): it is removed after the install.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

UV = "uv==0.13.9"
# what the venv gets: pip itself (for later `pip install '.[spark]'`) and the project with its test extra
REQUIREMENTS = ["pip>=24", "-e", ".[test]"]
SOURCE_FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url",
                "find-links": "--find-links", "constraint": "--constraint"}


def pip_options(listing: str) -> dict[str, str]:
    """``pip config list`` (lines such as ``global.find-links='/opt/wheels'`` and
    ``:env:.find-links='/opt/wheels'``) as {option: value}: the files' global and install
    sections, then the environment on top of them, as pip applies them."""
    files, env = {}, {}
    for line in listing.splitlines():
        key, sep, value = line.partition("=")
        section, _, option = key.rpartition(".")
        if not sep or section not in ("global", "install", ":env:"):
            continue
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            value = value.strip("'\"")
        (env if section == ":env:" else files)[option] = str(value)
    return files | env


def uv_flags(options: dict[str, str]) -> list[str]:
    """uv's source flags for pip's options (pip separates several values by whitespace)."""
    flags = []
    for option, flag in SOURCE_FLAGS.items():
        for value in options.get(option, "").split():
            flags += [flag, value]
    if options.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        flags.append("--no-index")
    return flags


def uv_environment(options: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    if options.get("cert"):
        env.setdefault("SSL_CERT_FILE", options["cert"])
    if options.get("default-timeout"):
        env.setdefault("UV_HTTP_TIMEOUT", options["default-timeout"])
    return env


def run(*cmd, **kw) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run(cmd, check=True, **kw)


def install_with_uv(venv: Path) -> bool:
    """Install through uv; False when uv itself cannot be installed (the caller falls back to pip)."""
    pip, python = venv / "bin" / "pip", venv / "bin" / "python"
    if subprocess.run([pip, "install", "-qq", UV]).returncode != 0:
        print(f"could not install {UV}: installing with pip instead", file=sys.stderr)
        return False
    listing = subprocess.run([pip, "config", "list"], capture_output=True, text=True, check=True).stdout
    options = pip_options(listing)
    uv = [venv / "bin" / "uv", "pip"]
    env = uv_environment(options)
    run(*uv, "install", "--quiet", "--python", python, "--index-strategy", "unsafe-best-match",
        *uv_flags(options), *REQUIREMENTS, env=env)
    subprocess.run([*uv, "uninstall", "--quiet", "--python", python, "dataclasses"], env=env)
    return True


def install_with_pip(venv: Path) -> None:
    pip = venv / "bin" / "pip"
    run(pip, "install", "-q", "--upgrade", "pip>=24")
    # --no-compile: pip would compile all 23,000 files of the venv, one at a time
    run(pip, "install", "-q", "--no-compile", *REQUIREMENTS)
    subprocess.run([pip, "uninstall", "-q", "-y", "dataclasses"])


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        return 2
    venv = Path(argv[1])
    try:
        if os.environ.get("UNCLIP_INSTALLER", "uv") == "pip" or not install_with_uv(venv):
            install_with_pip(venv)
    except subprocess.CalledProcessError as err:
        print(f"installing the venv failed: `{' '.join(map(str, err.cmd))}` exited {err.returncode} (its output is "
              f"above); {venv} is left as it is, and `make` runs this again until it succeeds", file=sys.stderr)
        return err.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
