"""The installer, into a scratch root (no user, chown or systemctl there)."""
from __future__ import annotations

import stat
import subprocess

from tests.helpers import ROOT


def test_install_upgrade_uninstall_keeps_config_secrets_and_data(tmp_path):
    root = tmp_path / "root"
    run = lambda *a: subprocess.run(["bash", *a, "--root", str(root)], capture_output=True, text=True,  # noqa: E731
                                    timeout=600, cwd=ROOT)
    first = run("scripts/install.sh")
    assert first.returncode == 0, first.stderr
    etc = root / "etc/orderbook-collector"
    assert "data_dir = /var/lib/orderbook-collector/data" in (etc / "config.ini").read_text()
    assert stat.S_IMODE((etc / "env").stat().st_mode) == 0o600
    assert (root / "etc/systemd/system/orderbook-collector.service").exists()
    template = (root / "etc/systemd/system/orderbook-collector@.service").read_text()
    assert "collector.py run --market %i --config /etc/orderbook-collector/config.ini" in template
    assert (root / "opt/orderbook-collector/.venv/bin/python").exists()
    assert not (root / "opt/orderbook-collector/tests").exists()
    # the stamp relay's compiled loop, where the installed collector looks for it
    where = subprocess.run([str(root / "opt/orderbook-collector/.venv/bin/python"), "-c",
                            "from handlers.ingest.relay import compiled_loop; print(compiled_loop())"],
                           capture_output=True, text=True, timeout=60, cwd=root / "opt/orderbook-collector")
    assert where.stdout.strip() == str(root / "opt/orderbook-collector/.venv/bin/obc-stamp-relay"), where.stderr
    check = subprocess.run([str(root / "opt/orderbook-collector/.venv/bin/python"),
                            str(root / "opt/orderbook-collector/collector.py"), "check-config",
                            "--config", str(etc / "config.ini")], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    (etc / "config.ini").write_text((etc / "config.ini").read_text() + "\n; edited by the operator\n")
    (root / "var/lib/orderbook-collector/data").mkdir()
    second = run("scripts/install.sh")
    assert second.returncode == 0 and "kept" in second.stdout
    assert "edited by the operator" in (etc / "config.ini").read_text()
    gone = run("scripts/uninstall.sh")
    assert gone.returncode == 0
    assert not (root / "opt/orderbook-collector").exists()
    assert not (root / "etc/systemd/system/orderbook-collector.service").exists()
    assert (root / "var/lib/orderbook-collector/data").is_dir() and (etc / "config.ini").exists()
