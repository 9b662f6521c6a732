"""tools/install_venv.py, the venv's installer (`make`): pip's package sources handed to uv, and
pip as the fallback. The venv's pip and uv are stand-ins that log their arguments, so nothing is
installed and nothing reaches a registry."""
from __future__ import annotations

import importlib.util
import stat
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("install_venv", REPO / "tools" / "install_venv.py")
install_venv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install_venv)

LISTING = """\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.default-timeout='180'
:env:.find-links='/opt/wheels'
global.cert='/etc/ssl/certs/other.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/srv/ignored-by-env'
user.index-url='https://not.read/simple'
"""


def test_pip_options_take_the_environment_over_the_files():
    options = install_venv.pip_options(LISTING)
    assert options["find-links"] == "/opt/wheels"                  # PIP_FIND_LINKS beats pip.conf
    assert options["cert"] == "/etc/ssl/certs/ca-certificates.crt"
    assert options["extra-index-url"] == "file:///opt/pypi/simple file:///opt/pypi-more/simple"
    assert "index-url" not in options                              # only global, install and the environment


def test_every_source_becomes_a_uv_flag(monkeypatch):
    flags = install_venv.uv_flags(install_venv.pip_options(LISTING))
    assert flags == ["--extra-index-url", "file:///opt/pypi/simple", "--extra-index-url", "file:///opt/pypi-more/simple",
                     "--find-links", "/opt/wheels", "--constraint", "/etc/xdg/pip/constraints.txt"]
    assert install_venv.uv_flags({"no-index": "true", "index-url": "file:///mirror"}) == \
        ["--index-url", "file:///mirror", "--no-index"]
    monkeypatch.delenv("UV_HTTP_TIMEOUT", raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", "/mine.crt")                 # the user's own setting is kept
    env = install_venv.uv_environment(install_venv.pip_options(LISTING))
    assert env["UV_HTTP_TIMEOUT"] == "180" and env["SSL_CERT_FILE"] == "/mine.crt"


def fake_venv(tmp_path: Path, uv_installs: bool, uv_exit: int = 0) -> tuple[Path, Path]:
    """A venv whose pip and uv log each call to calls.log; pip fails to install uv unless
    ``uv_installs``; uv exits with ``uv_exit``."""
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    listing = LISTING.replace("'", "'\"'\"'")
    scripts = {
        "pip": f"""#!/bin/sh
echo "pip $*" >> {log}
if [ "$1" = config ]; then printf '%s' '{listing}'; exit 0; fi
case "$*" in *uv==*) exit {0 if uv_installs else 1};; esac
exit 0
""",
        "uv": f"""#!/bin/sh
echo "uv $* SSL_CERT_FILE=$SSL_CERT_FILE" >> {log}
exit {uv_exit}
""",
    }
    for name, text in scripts.items():
        path = venv / "bin" / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return venv, log


def test_uv_installs_the_project_from_pips_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("UNCLIP_INSTALLER", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    venv, log = fake_venv(tmp_path, uv_installs=True)
    assert install_venv.main(["install_venv.py", str(venv)]) == 0
    calls = log.read_text().splitlines()
    install = next(c for c in calls if c.startswith("uv pip install"))
    assert "--find-links /opt/wheels" in install and "--constraint /etc/xdg/pip/constraints.txt" in install
    assert "--index-strategy unsafe-best-match" in install
    assert install.split(" SSL_CERT_FILE=")[0].endswith("pip>=24 -e .[test]")
    assert install.endswith("SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt")
    assert any(c.startswith("uv pip uninstall") and "dataclasses" in c for c in calls)
    assert not any(c.startswith("pip install") and ".[test]" in c for c in calls)


@pytest.mark.parametrize("why", ["uv does not install", "asked for pip"])
def test_pip_is_the_fallback(tmp_path, monkeypatch, why):
    venv, log = fake_venv(tmp_path, uv_installs=why == "asked for pip")
    if why == "asked for pip":
        monkeypatch.setenv("UNCLIP_INSTALLER", "pip")
    else:
        monkeypatch.delenv("UNCLIP_INSTALLER", raising=False)
    assert install_venv.main(["install_venv.py", str(venv)]) == 0
    calls = log.read_text().splitlines()
    assert not any(c.startswith("uv ") for c in calls)
    assert "pip install -q --no-compile pip>=24 -e .[test]" in calls
    assert any(c.startswith("pip uninstall") and "dataclasses" in c for c in calls)


def test_a_failed_install_says_which_command_failed(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("UNCLIP_INSTALLER", raising=False)
    venv, _ = fake_venv(tmp_path, uv_installs=True, uv_exit=3)
    assert install_venv.main(["install_venv.py", str(venv)]) == 3
    err = capsys.readouterr().err
    assert "installing the venv failed" in err and "uv pip install" in err and "exited 3" in err
